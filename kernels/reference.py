"""Torch reference of the weight-only GEMMs in `wq_gemm.py`: the same math, written plainly.

    y[m, n] = Σ_k x[m, k] · w[n, k] (+ bias[n])

- uniform int ("int"):  w[n, k] = (q[n, k] − zero[g, n]) · scale[g, n],  g = k // group_size
- HLQ ("hlq"):          w[n, k] = offset[g, n] + Σ_b scales[g, b, n] · ((q[n, k] >> b) & 1)

Inputs are the stored tensors of a QuantLinear (see quantkit/formats/{uniform,hlq}.py): `qweight int32
[ceil(Kp/32)·bits, N]`, `scales fp16 [groups, N]` (int) or `[groups, bits, N]` (hlq), `zeros uint8 [groups,
N]` (int, None when symmetric: zero = 2^(bits−1)), `offsets fp16 [groups, N]` (hlq). Activations beyond K
count as zero, so only the first K codes of each row matter. This runs on any device and is what the
kernels are tested against (in float32, or float64 for the GPU accuracy checks).
"""

from __future__ import annotations

import torch

from quantkit.formats.packing import unpack_codes


def dequantize(fmt: str, bits: int, group_size: int | None, k: int, qweight: torch.Tensor,
               scales: torch.Tensor, zeros: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored tensors → weight [N, k] in `dtype`."""
    gs = group_size or k
    groups = -(-k // gs)
    codes = unpack_codes(qweight, bits, groups * gs).to(torch.int64)[:, :k]  # [N, k]
    gidx = torch.arange(k, device=qweight.device) // gs  # [k]
    if fmt == "int":
        s = scales.to(dtype)[gidx].t()  # [N, k]
        if zeros is None:
            z = torch.full_like(s, float(1 << (bits - 1)))
        else:
            z = zeros.to(dtype)[gidx].t()
        return (codes.to(dtype) - z) * s
    if fmt == "hlq":
        w = offsets.to(dtype)[gidx].t().clone()
        for b in range(bits):
            w = w + scales[:, b, :].to(dtype)[gidx].t() * ((codes >> b) & 1).to(dtype)
        return w
    raise ValueError(f"no reference for format {fmt!r}")


def wq_matmul_ref(x: torch.Tensor, fmt: str, bits: int, group_size: int | None, k: int,
                  qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                  offsets: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x: [..., k] → y: [..., N] in `dtype` (computed in `dtype` throughout)."""
    w = dequantize(fmt, bits, group_size, k, qweight, scales, zeros, offsets, dtype)
    y = x.to(dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y
