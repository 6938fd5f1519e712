"""Dispatch policy of the NVFP4 (ARCQuant) kernels: which path serves a call, by M and shape. Pure Python (no
torch, no triton): `nvfp4_gemm.py`'s entry points (`arc_linear`, `nvfp4_mm`, `arc_quantize_activation_triton`)
ask it, `act_dispatch.py` routes QuantLinears to them.

- GEMM (`nvfp4_mm`):     M ≤ GEMV_MAX_M → the GEMV on CUDA cores, else the tensor-core kernel; an explicit
                         config names its kernel (BLOCK_M: the tensor-core one).
- full linear (`arc_linear`): M ≥ DEQUANT_MIN_M → "dequant" (X' and W' decoded to bf16, then cuBLAS), else
                         "fused" (packed X' → NVFP4 GEMM).
- activation kernel:     K not a multiple of 16 on a GPU → the torch reference (`nvfp4_reference`). The
                         kernel's unaligned residual branch matches it in Triton's interpreter but not yet
                         compiled on an H200 (two small-shape GPU tests differed, cause not found); real hidden
                         sizes are multiples of 16.
"""

from __future__ import annotations

GEMV_MAX_M = 4  # up to this M the GEMV (CUDA cores) serves the GEMM (H200, K=4096, N=14336: GEMV 19.2 / 23.2 /
# 28.5 / 44.6 / 81.5 us at M = 1 / 2 / 4 / 8 / 16, the tensor-core kernel 47.2 / 46.3 / 40.3 / 41.5 / 43.0 us)
DEQUANT_MIN_M = 64  # from M on: decode X' (in the activation kernel) and W' to bf16, then cuBLAS (H200: it won at
# M = 128 on all four Llama shapes; at 4096x14336 also at M = 64, 113.9 vs 148.2 us, not at M = 32, 110.5 vs 88.0)


def gemm_path(m: int, config: dict | None = None) -> str:
    """"gemv" or "mm" for an NVFP4 GEMM of M rows (an explicit config names its kernel)."""
    if config:
        return "mm" if "BLOCK_M" in config else "gemv"
    return "gemv" if m <= GEMV_MAX_M else "mm"


def linear_path(m: int) -> str:
    """"dequant" or "fused" for a full ARC linear of M rows."""
    return "dequant" if m >= DEQUANT_MIN_M else "fused"


def activation_by_reference(k: int, is_cuda: bool) -> bool:
    """Whether the activation quantization of K input channels runs as the torch reference (see above)."""
    return bool(k % 16) and is_cuda
