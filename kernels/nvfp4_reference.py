"""Torch reference of the NVFP4 kernels in `nvfp4_gemm.py` (any device; what the kernel tests compare with).

- activation kernel: `quantkit.arc_numerics.arc_quantize_activation` (bit-exact reference, re-exported);
          `arc_quantize_activation_ref` returns it in the kernel launcher's output format (and serves the
          calls `nvfp4_dispatch.activation_by_reference` sends to the reference)
- GEMM:   y[m, n] = Sx·Sw · Σ_k (e2m1·e4m3)_x[m, k] · (e2m1·e4m3)_w[n, k] (+ bias[n]), over K' = Kp + s
          packed columns (padding columns have zero codes on both sides)
- decode: e2m1·e4m3 of a packed matrix, no tensor scale (the large-M "decode + cuBLAS" operand)
"""

from __future__ import annotations

import torch

from quantkit.arc_numerics import arc_quantize_activation
from quantkit.formats.nvfp4 import nvfp4_dequantize


def arc_quantize_activation_ref(x: torch.Tensor, ridx: torch.Tensor, s_res: int, packed: bool = True,
                                deq_dtype: torch.dtype | None = None):
    """`nvfp4_gemm.arc_quantize_activation_triton`'s outputs from the torch reference: packed → (q, bs, S),
    else (S,); with deq_dtype also the dequantized X' in that dtype (last)."""
    q = arc_quantize_activation(x, ridx.long(), s_res)
    sx = q.tensor_scale.reshape(1)
    out = (q.packed, q.block_scales, sx) if packed else (sx,)
    if deq_dtype is None:
        return out
    return (*out, nvfp4_dequantize(q.packed, q.block_scales, q.tensor_scale).to(deq_dtype))


def nvfp4_decode_ref(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q uint8 [R, KQ/2], s float8_e4m3fn [R, KQ/16] → [R, KQ] in `dtype` (exact in fp32)."""
    return nvfp4_dequantize(q, s.view(torch.float8_e4m3fn), 1.0).to(dtype)


def nvfp4_mm_ref(xq: torch.Tensor, xs: torch.Tensor, sx, wq: torch.Tensor, ws: torch.Tensor, sw,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Y [M, N] = Sx·Sw·X'·W'ᵀ (+ bias), computed in float64 (then cast to `dtype`)."""
    xd = nvfp4_decode_ref(xq, xs, torch.float64)
    wd = nvfp4_decode_ref(wq, ws, torch.float64)
    y = (xd @ wd.t()) * (float(torch.as_tensor(sx).reshape(-1)[0]) * float(torch.as_tensor(sw).reshape(-1)[0]))
    if bias is not None:
        y = y + bias.double()
    return y.to(dtype)


__all__ = ["arc_quantize_activation", "arc_quantize_activation_ref", "nvfp4_decode_ref", "nvfp4_mm_ref"]
