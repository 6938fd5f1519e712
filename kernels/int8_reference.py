"""Torch reference of the int8-tensor-core W{4,6}A{4,6,8} kernels in `int8_gemm.py`, and the weight preparation
both share (pure torch, any device).

Activations (per token, per group of 128 channels, symmetric; quantkit.formats.act_int):

    x [M, K] (optionally gathered: x[:, perm])  →  qa int8 [M, Kp], a_scale fp32 [M, G], a_sum int32 [M, G]

Kp = G·128 (zero-padded), a_sum[m, g] = Σ_{k∈g} qa[m, k] (used to remove the weights' zero point).

Weights (`LowbitWeight`): unsigned codes c ∈ [0, 2^b) with a zero point z (per (group, column), or the
symmetric constant 2^(b−1)) and fp16 scales, w[n, k] = w_scale[g, n] · (c[n, k] − z[g, n]):
- INT6 (`prepare_int6`): the `int6` format's stored tensors, used as they are (docs/format.md, `int6`).
- INT4 (`prepare_int4`): the `int` format's 4-bit bitstream repacked once into nibble planes (below).

GEMM, per 128-channel block g of the activations (weight groups must be whole multiples of 128, or per-channel):

    I[m, n, g] = Σ_{k∈g} qa[m, k] · (c[n, k] − z[g', n])  =  Σ_{k∈g} qa·c − z·a_sum[m, g]      (exact int32)
    Y[m, n]    = Σ_g a_scale[m, g] · w_scale[g', n] · I[m, n, g]  (+ bias[n])                     (fp32)

with g' = g·128 // weight group size. The kernels accumulate the fp32 sum in increasing g (split-K: per slice,
then the slices in order), so they differ from this reference by fp32 rounding only.

INT4 kernel layout (`pack_nibble_planes`): `uint8 [N, ceil(K/128)·64]`, rows contiguous along K; per block of
128 K, 64 bytes; byte 32·j + i (j ∈ {0, 1}, i ∈ [0, 32)) holds c[32·j + i] in its low nibble and
c[64 + 32·j + i] in its high nibble, so the kernel gets four K-contiguous [BLOCK_N, 32] code tiles from two byte
tiles with one mask or shift each (K-contiguous as the int6 layout, for the same reason: see docs/format.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.formats.act_int import quantize_act_int
from quantkit.formats.int6 import unpack_int6
from quantkit.formats.packing import unpack_codes

ACT_GROUP = 128


@dataclass
class LowbitWeight:
    """Kernel-ready weight of one Linear [N, K]."""

    bits: int  # 4 or 6
    k: int
    n: int
    qweight: torch.Tensor  # uint8 [N, >= ceil(K/128)·16·bits]: int6 stored layout, or int4 nibble planes
    scales: torch.Tensor  # fp16 [groups, N]
    zeros: torch.Tensor | None  # uint8 [groups, N], or None: symmetric, z = 2^(bits−1)
    group_size: int | None  # weight group size along K (a multiple of 128), None = per-channel
    scales_f32: torch.Tensor | None = field(default=None, repr=False, compare=False)  # cache (int8_prefill)

    @property
    def blocks(self) -> int:
        return -(-self.k // ACT_GROUP)


def _check_group(group_size: int | None) -> None:
    if group_size is not None and group_size % ACT_GROUP:
        raise ValueError(f"the int8 kernels need weight groups that are multiples of {ACT_GROUP} (or "
                         f"per-channel), got {group_size}")


def prepare_int6(packed: dict[str, torch.Tensor], k: int, group_size: int | None) -> LowbitWeight:
    """The `int6` format's stored tensors (`qweight`, `scales`) → LowbitWeight (views, no copy). Columns past
    ceil(K/128)·96 bytes (K padded to a whole weight group larger than 128) are never read."""
    _check_group(group_size)
    qw = packed["qweight"]
    if qw.dtype != torch.uint8 or qw.shape[1] % 96 or qw.shape[1] < -(-k // ACT_GROUP) * 96:
        raise ValueError(f"int6 qweight of shape {tuple(qw.shape)} / {qw.dtype} does not hold K={k}")
    return LowbitWeight(6, k, qw.shape[0], qw.contiguous(), packed["scales"].contiguous(), None, group_size)


def pack_nibble_planes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in [0, 16) → `uint8 [N, ceil(K/128)·64]` (the INT4 kernel layout, zero-padded)."""
    n, k = codes.shape
    blocks = -(-k // ACT_GROUP)
    c = torch.zeros(n, blocks * ACT_GROUP, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    # byte row 32·j + i: lo nibble c[32j + i], hi nibble c[64 + 32j + i]
    c = c.view(n, blocks, ACT_GROUP)
    b = (c[:, :, :64] | (c[:, :, 64:] << 4)).reshape(n, blocks * 64)
    return b.to(torch.uint8).contiguous()


def unpack_nibble_planes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_nibble_planes` → codes `uint8 [N, k]`."""
    n, cols = qweight.shape
    blocks = cols // 64
    b = qweight[:, : blocks * 64].to(torch.int32).view(n, blocks, 2, 32)
    lo, hi = (b & 15).reshape(n, blocks, 64), (b >> 4).reshape(n, blocks, 64)
    return torch.cat([lo, hi], dim=2).reshape(n, blocks * ACT_GROUP)[:, :k].to(torch.uint8)


def prepare_int4(packed: dict[str, torch.Tensor], k: int, group_size: int | None,
                 symmetric: bool) -> LowbitWeight:
    """The `int` format's 4-bit stored tensors (`qweight int32` bitstream, `scales`, `zeros` unless symmetric)
    → LowbitWeight with the codes repacked into nibble planes (one copy, 0.5 byte per weight)."""
    _check_group(group_size)
    codes = unpack_codes(packed["qweight"], 4, k)
    zeros = None if symmetric else packed["zeros"].contiguous()
    return LowbitWeight(4, k, codes.shape[0], pack_nibble_planes(codes), packed["scales"].contiguous(), zeros,
                        group_size)


def weight_codes(w: LowbitWeight) -> torch.Tensor:
    """Codes int64 [N, blocks·128] (padding codes 0)."""
    kp = w.blocks * ACT_GROUP
    c = unpack_int6(w.qweight, kp) if w.bits == 6 else unpack_nibble_planes(w.qweight, kp)
    return c.to(torch.int64)


def weight_zeros(w: LowbitWeight) -> torch.Tensor:
    """Zero points int64 [groups, N]."""
    if w.zeros is not None:
        return w.zeros.to(torch.int64)
    return torch.full(tuple(w.scales.shape), 1 << (w.bits - 1), dtype=torch.int64, device=w.scales.device)


def dequantize(w: LowbitWeight) -> torch.Tensor:
    """The weight float32 [N, K]."""
    c = weight_codes(w)[:, : w.k]
    gidx = torch.arange(w.k, device=c.device) // (w.group_size or w.k)
    return (c - weight_zeros(w)[gidx].t()).float() * w.scales.float()[gidx].t()


def quantize_act_ref(x: torch.Tensor, bits: int | torch.Tensor, perm: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] → (qa int8 [M, Kp], a_scale fp32 [M, G], a_sum int32 [M, G]); `bits` int or int tensor [G]."""
    if perm is not None:
        x = x[:, perm.long()]
    q, s = quantize_act_int(x, bits, ACT_GROUP)
    m, k = q.shape
    g = -(-k // ACT_GROUP)
    q = torch.nn.functional.pad(q, (0, g * ACT_GROUP - k))
    qsum = q.view(m, g, ACT_GROUP).sum(dim=-1, dtype=torch.int32)
    return q, s, qsum


def group_dots_ref(qa: torch.Tensor, w: LowbitWeight) -> torch.Tensor:
    """I[m, n, g] = Σ_{k∈g} qa[m, k]·(c[n, k] − z[g', n]), exact, int64 [M, N, G]."""
    m = qa.shape[0]
    g = w.blocks
    c = weight_codes(w).view(w.n, g, ACT_GROUP)
    wgs = (w.group_size // ACT_GROUP) if w.group_size else g
    z = weight_zeros(w)[torch.arange(g, device=c.device) // wgs]  # [G, N]
    cz = c - z.t().unsqueeze(-1)  # [N, G, 128]
    a = qa[:, : g * ACT_GROUP].to(torch.int64).view(m, g, ACT_GROUP)
    # integer matmul per group (float64 holds these sums exactly: |I| < 2^21)
    return torch.einsum("mgk,ngk->mng", a.double(), cz.double()).round().to(torch.int64)


def lowbit_gemm_ref(qa: torch.Tensor, a_scale: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Y [M, N] in `dtype` (accumulated over groups in increasing g, in `dtype`)."""
    i = group_dots_ref(qa, w)
    g = w.blocks
    wgs = (w.group_size // ACT_GROUP) if w.group_size else g
    ws = w.scales.to(dtype)[torch.arange(g, device=qa.device) // wgs]  # [G, N]
    y = torch.zeros(qa.shape[0], w.n, dtype=dtype, device=qa.device)
    for gi in range(g):
        y = y + i[:, :, gi].to(dtype) * (a_scale[:, gi].to(dtype)[:, None] * ws[gi][None, :])
    if bias is not None:
        y = y + bias.to(dtype)
    return y


def lowbit_linear_ref(x: torch.Tensor, w: LowbitWeight, act_bits: int | torch.Tensor,
                      perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = fake-quantized x (per-token, per-128-group, `act_bits`, optional perm) @ Wᵀ (+ bias); x [..., K]."""
    lead = x.shape[:-1]
    qa, s, _ = quantize_act_ref(x.reshape(-1, x.shape[-1]), act_bits, perm)
    y = lowbit_gemm_ref(qa, s, w, bias, torch.float32 if dtype is None else dtype)
    return y.to(x.dtype if dtype is None else dtype).reshape(*lead, w.n)
