"""Single-token GQA attention kernel (kernels/decode_attention.py) against its torch reference and float64.
Without a GPU it runs in Triton's interpreter on small shapes."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from quantkit.kernels.decode_attention import decode_attention, decode_attention_ref, supports

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float16


def _inputs(b, h, hk, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, h, d, generator=g).transpose(1, 2)  # [B, H, 1, D] as transformers makes it
    k = torch.randn(b, hk, n, d, generator=g)
    v = torch.randn(b, hk, n, d, generator=g)
    return [t.to(DEV, DT) for t in (q, k, v)]


@pytest.mark.parametrize("b,h,hk,d,n", [(2, 8, 2, 32, 100), (1, 4, 4, 16, 64), (3, 12, 1, 64, 7)])
@pytest.mark.parametrize("mask_kind", ["none", "prefix", "per_row"])
def test_decode_attention_matches_reference(b, h, hk, d, n, mask_kind):
    q, k, v = _inputs(b, h, hk, d, n)
    scale = d ** -0.5
    if mask_kind == "none":
        mask = None
    elif mask_kind == "prefix":  # a static cache filled up to some position: one row broadcast over the batch
        mask = (torch.arange(n + 5) < n - 3)[None].to(DEV)  # longer than the keys: the tail is not read
    else:  # per batch row, the first block entirely masked in row 0 (the online softmax's -inf start)
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(b, n, generator=g) < 0.6
        mask[0, : min(n, 70)] = False
        mask[:, -1] = True
        mask = mask.to(DEV)
    assert supports(q, k, v, mask)
    out = decode_attention(q, k, v, mask, scale)
    exact = decode_attention_ref(q.double(), k.double(), v.double(), mask, scale)
    ref = decode_attention_ref(q, k, v, mask, scale)
    assert out.shape == (b, 1, h, d) and out.dtype == DT
    err = (out.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err <= 2 * err_ref + 1e-3, (err, err_ref)  # as close to float64 as the reference's own rounding


def test_decode_attention_op_registration():
    q, k, v = _inputs(2, 8, 2, 32, 40)
    mask = (torch.arange(40) < 33)[None].to(DEV)
    torch.library.opcheck(torch.ops.quantkit.decode_attention, (q, k, v, mask, 0.125),
                          test_utils=("test_schema", "test_faketensor"))
    assert not supports(q.expand(2, 8, 2, 32), k, v, mask)  # two query tokens: not a decode step
    assert not supports(q, k, v, mask.float())  # additive masks stay on the torch path
    assert not supports(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), mask)  # V's head_dim strided
    assert not supports(q, k, v.float(), mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decode_attention_real_shape():
    """Llama-3-8B: 32 query heads over 8 KV heads, head_dim 128, a 640-position static cache filled to 600."""
    q, k, v = _inputs(1, 32, 8, 128, 640)
    mask = (torch.arange(640, device=DEV) < 600)[None]
    out = decode_attention(q, k, v, mask, 128 ** -0.5)
    exact = decode_attention_ref(q.double(), k.double(), v.double(), mask, 128 ** -0.5)
    rel = ((out.double() - exact).norm() / exact.norm()).item()
    assert rel < 1e-2, rel
