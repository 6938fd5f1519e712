"""ARCQuant numerics (NVFP4 with augmented residual channels), pure torch: the reference the kernels match.

Given x [M, K], a channel order `reorder` (int [K], ascending per-channel max so the outlier channels come
last) and s residual channels (a multiple of 16, 0 ≤ s ≤ K):

    Xr = x[:, reorder]                          (float32)
    S  = amax(|x|) / 2688                       dynamic, per call, over all M·K entries
    Q1 = NVFP4(Xr; S)                           packed [M, Kp/2], scales [M, Kp/16]   (Kp = ceil(K/16)·16)
    R  = (Xr − deq(Q1))[:, K−s:]                float32, the quantization error of the last s channels
    Q2 = NVFP4(R; S)                            its own block scales, the SAME tensor scale
    X' = [Q1 | Q2]                              K' = Kp + s columns: packed [M, K'/2], scales [M, K'/16]

Weights, offline: W' = [NVFP4(Wr; Sw) | NVFP4(Wr[:, K−s:]; Sw)] (outlier columns duplicated, no residual),
Sw = amax(|w|)/2688. Then Y ≈ X'·W'ᵀ = Sx·Sw · Σ_k (e2m1·e4m3)_x (e2m1·e4m3)_w in one plain NVFP4 GEMM.
When K is not a multiple of 16, Q1's padding columns (K..Kp) carry zero codes in both X' and W' and the
residual block starts at X' column Kp. NVFP4 numerics: quantkit/formats/nvfp4.py.
"""

from __future__ import annotations

import torch

from quantkit.formats.nvfp4 import (
    BLOCK,
    NVFP4Tensor,
    compute_tensor_scale,
    nvfp4_dequantize,
    nvfp4_quantize,
)


def check_arc_args(k: int, reorder: torch.Tensor, s: int) -> None:
    if reorder.dim() != 1 or reorder.numel() != k:
        raise ValueError(f"reorder must be a 1-D index of length K = {k}, got shape {tuple(reorder.shape)}")
    if s < 0 or s % BLOCK or s > k:
        raise ValueError(f"residual channels s = {s} must be a multiple of 16 in [0, K = {k}]")


def arc_padded_k(k: int, s: int) -> int:
    """K' = ceil(K/16)·16 + s: the number of columns of X' and W'."""
    return -(-k // BLOCK) * BLOCK + s


def arc_quantize_activation(x: torch.Tensor, reorder: torch.Tensor, s: int) -> NVFP4Tensor:
    """x [M, K] float → X' = NVFP4Tensor(packed uint8 [M, K'/2], block_scales e4m3 [M, K'/16], S fp32 [])."""
    k = x.shape[-1]
    check_arc_args(k, reorder, s)
    xr = x.detach().float()[..., reorder.to(x.device, torch.long)]
    q1 = nvfp4_quantize(xr)
    sc = q1.tensor_scale
    if s == 0:
        return q1
    r = (xr - nvfp4_dequantize(q1.packed, q1.block_scales, sc, k))[..., k - s:]
    q2 = nvfp4_quantize(r, sc)
    return NVFP4Tensor(torch.cat([q1.packed, q2.packed], dim=-1),
                       torch.cat([q1.block_scales, q2.block_scales], dim=-1), sc)


def arc_fake_quant_activation(x: torch.Tensor, reorder: torch.Tensor, s: int,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """X' dequantized: [M, K + s] in `dtype` = [deq(Q1)[:, :K] | deq(Q2)] (Q1's padding columns dropped), the
    exact values the packed X' represents (computed in fp32, then cast)."""
    return arc_dequantize(arc_quantize_activation(x, reorder, s), x.shape[-1], s, dtype)


def arc_weight(w: torch.Tensor, reorder: torch.Tensor, s: int,
               tensor_scale: torch.Tensor | float | None = None) -> NVFP4Tensor:
    """w [N, K] → W' = NVFP4Tensor(packed [N, K'/2], block_scales [N, K'/16], Sw): [NVFP4(Wr) | NVFP4(Wr[:, K−s:])]
    with one tensor scale (default amax(|w|)/2688) for both parts (RTN)."""
    k = w.shape[-1]
    check_arc_args(k, reorder, s)
    wr = w.detach().float()[..., reorder.to(w.device, torch.long)]
    sw = compute_tensor_scale(wr) if tensor_scale is None else tensor_scale
    q1 = nvfp4_quantize(wr, sw)
    if s == 0:
        return q1
    q2 = nvfp4_quantize(wr[..., k - s:], q1.tensor_scale)
    return NVFP4Tensor(torch.cat([q1.packed, q2.packed], dim=-1),
                       torch.cat([q1.block_scales, q2.block_scales], dim=-1), q1.tensor_scale)


def arc_dequantize(q: NVFP4Tensor, k: int, s: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed X' or W' → [rows, K + s] in `dtype` (Q1's padding columns dropped)."""
    kp = arc_padded_k(k, 0)
    d = nvfp4_dequantize(q.packed, q.block_scales, q.tensor_scale)
    return torch.cat([d[..., :k], d[..., kp:kp + s]], dim=-1).to(dtype)


def arc_linear_ref(x: torch.Tensor, reorder: torch.Tensor, s: int, wq: NVFP4Tensor,
                   bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [M, N] = X'·W'ᵀ (+ bias) in float64 then cast to `dtype` (default x.dtype): the exact value the
    ARC linear computes, up to the kernels' fp32 accumulation order."""
    k = x.shape[-1]
    xq = arc_quantize_activation(x, reorder, s)
    xd = arc_dequantize(xq, k, s, torch.float64)
    wd = arc_dequantize(wq, k, s, torch.float64)
    y = xd @ wd.t()
    if bias is not None:
        y = y + bias.double()
    return y.to(dtype or x.dtype)


__all__ = ["arc_dequantize", "arc_fake_quant_activation", "arc_linear_ref", "arc_padded_k",
           "arc_quantize_activation", "arc_weight", "check_arc_args"]
