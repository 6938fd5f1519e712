"""INT6 symmetric weights (FlexQ): w ≈ scale · q, q ∈ [−31, 31], per output row and group of K.

- scale = absmax / 31 over the group's real weights, rounded to fp16 in `fit` (so RTN and GPTQ quantize
  against the stored value); an all-zero group gets scale 1.0, an fp16 underflow 2^-24.
- codes (the `WeightFormat` interface) are offset-binary: c = q + 32 ∈ [1, 63] (the `int` format's symmetric
  convention, zero point 32 implied); dequantize is (c − 32) · scale. The range is symmetric ±31 as in FlexQ:
  code 0 (q = −32) is never produced, and it is the padding code.

Stored (docs/FORMAT.md, section `int6`): `qweight uint8 [N, ceil(Kp/128)·96]` and `scales fp16 [groups, N]`.
Each output row's codes are contiguous along K, cut into blocks of 128 (96 bytes each): the codes c[0..128) of
a block form four planes of 32 (plane j = c[32j .. 32j+32)); byte 32·r + i of the block (r ∈ {0, 1, 2}) holds
plane r's code in its low 6 bits and two bits of plane 3's code in its top 2 bits:

    qweight[n, 96·b + 32·r + i] = c[32·r + i] | ((c[96 + i] >> 2r) & 3) << 6          i ∈ [0, 32)

so a kernel unpacks three [BLOCK_N, 32] byte tiles with masks and shifts alone into four K-contiguous code
tiles (no interleaving). K-contiguous rows (not N-contiguous as in `int`) because int8 tensor cores want the
weight tile K-major in shared memory: the unpacked bytes are then stored 16 at a time, not one by one (the
N-contiguous variant of this layout measured 3.4x slower than cuBLAS bf16 at M = 4096 on an H200 for that
reason: 64 byte-wide shared stores per thread and block).
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import Params, WeightFormat, register_format
from quantkit.recipe import register_format_limits

SCALE_DTYPE = torch.float16
QMAX = 31
ZERO = 32  # offset of the codes: c = q + 32
BLOCK = 128  # K values per packing block
BLOCK_BYTES = 96  # bytes per block and column

register_format_limits("int6", 6, 6, 16)


def pack_int6(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in [0, 64) → `uint8 [N, ceil(K/128)·96]` (K zero-padded to whole 128-blocks)."""
    n, k = codes.shape
    if codes.numel() and (codes.min() < 0 or codes.max() > 63):
        raise ValueError("int6 codes must be in [0, 64)")
    blocks = -(-k // BLOCK)
    c = torch.zeros(n, blocks * BLOCK, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    c = c.view(n, blocks, 4, 32)
    hi = c[:, :, 3]  # plane 3, spread over the top bits of planes 0..2
    rows = [c[:, :, r] | (((hi >> (2 * r)) & 3) << 6) for r in range(3)]
    out = torch.stack(rows, dim=2).reshape(n, blocks * BLOCK_BYTES)  # [N, blocks·96]
    return out.to(torch.uint8).contiguous()


def unpack_int6(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_int6`: `uint8 [N, ceil(K/128)·96]` → codes `uint8 [N, k]`."""
    n, cols = qweight.shape
    blocks = cols // BLOCK_BYTES
    if cols != blocks * BLOCK_BYTES or blocks * BLOCK < k:
        raise ValueError(f"int6 qweight of {cols} bytes per row does not hold K={k} codes")
    b = qweight.to(torch.int32).view(n, blocks, 3, 32)
    lo = b & 63
    hi = ((b[:, :, 0] >> 6) | ((b[:, :, 1] >> 6) << 2) | ((b[:, :, 2] >> 6) << 4)).unsqueeze(2)
    c = torch.cat([lo, hi], dim=2).reshape(n, blocks * BLOCK)
    return c[:, :k].to(torch.uint8)


@register_format
class Int6(WeightFormat):
    """INT6 symmetric (always: `symmetric` is accepted for the recipe interface and ignored)."""

    name = "int6"

    def __init__(self, bits: int = 6, group_size: int | None = 128, symmetric: bool = True):
        if bits != 6:
            raise QuantkitError(f"format 'int6' needs bits = 6, got {bits}")
        if group_size is not None and group_size < 16:
            raise QuantkitError(f"format 'int6' needs group_size >= 16 or per-channel, got {group_size}")
        super().__init__(6, group_size)
        self.symmetric = True

    def fit(self, w: torch.Tensor) -> Params:
        amax = w.float().abs().amax(dim=-1)
        scale = amax / QMAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        fmax = torch.finfo(SCALE_DTYPE).max
        scale = scale.clamp(max=fmax).to(SCALE_DTYPE).float()
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow guard
        return {"scale": scale}

    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        s = params["scale"].unsqueeze(-1)
        return (torch.clamp(torch.round(w.float() / s), -QMAX, QMAX) + ZERO).to(torch.int64)

    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return (codes.float() - ZERO) * params["scale"].unsqueeze(-1)

    def pack(self, codes: torch.Tensor, params: Params, k: int) -> dict[str, torch.Tensor]:
        return {
            "qweight": pack_int6(self.pad_codes(codes, k)),
            "scales": params["scale"].t().to(SCALE_DTYPE).contiguous(),
        }

    def unpack(self, packed: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, Params]:
        codes = unpack_int6(packed["qweight"], k).to(torch.int64)
        return codes, {"scale": packed["scales"].float().t()}
