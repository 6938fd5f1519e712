"""Tuning tables of the NVFP4 kernels in `nvfp4_gemm.py`: launch sizes of the activation kernels, the autotuner's
config lists and key, and the split-K / rows-per-program heuristics. Data and small host functions only; the
kernels are wrapped with these tables in `nvfp4_gemm.py`. Which kernel serves a call is `nvfp4_dispatch.py`.

Measured on an H200 with eval/bench_arcquant.py (CUDA-graph replays, weights rotated over > 2.5x L2).
"""

from __future__ import annotations

import triton

from quantkit.kernels.triton_common import NUM_SMS, pow2, split_k

# ----------------------------------------------------------------------------------------------------------
# activation kernel (`_amax_kernel` pre-pass + `_arc_act_kernel`)

AMAX_PARTS = 256  # programs of the amax pre-pass (and the size every activation program reduces)
AMAX_BLOCK, AMAX_WARPS = 4096, 8  # elements per load step and warps of a pre-pass program
FUSED_AMAX_MAX = 1 << 14  # M·K up to which the activation kernel reduces x itself (no pre-pass; H200, K=4096:
# 2.9 / 3.5 / 4.6 us at M = 1 / 2 / 4, but 7.3 us at M = 8 where every program reduces 32 K elements, vs 4.7 us
# with the pre-pass at M = 16)


def act_block_k(m: int) -> int:
    """Columns per activation program: enough work per program at large M, enough programs at small M."""
    return 1024 if m >= 64 else 256


# ----------------------------------------------------------------------------------------------------------
# GEMM autotuning (small lists; the chosen config is cached per key)

AUTOTUNE_KEY = ["M_BUCKET", "N", "KQ"]


def _c(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def mm_split(a):
    """SPLIT_K of the tensor-core kernel: ~PPS programs per SM for M <= 64, one wave above."""
    tiles = triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(a["N"], a["BLOCK_N"])
    target = (a.get("PPS", 4) if a["M"] <= 64 else 1) * NUM_SMS[0]
    return split_k(tiles, triton.cdiv(a["KQ"], a["BLOCK_K"]), target)


def gemv_rows(a):
    """Rows per GEMV program: every row of M ≤ GEMV_ROWS_MAX in one (the weights are decoded once)."""
    return min(pow2(a["M"]), GEMV_ROWS_MAX)


def gemv_split(a):
    """SPLIT_K of the GEMV (memory-bound): about PPS programs per SM."""
    rows = a.get("ROWS") or gemv_rows(a)
    return split_k(triton.cdiv(a["N"], a["BLOCK_N"]) * triton.cdiv(a["M"], rows), triton.cdiv(a["KQ"], 16 * a["NB"]),
                   a.get("PPS", 8) * NUM_SMS[0], GEMV_SPLIT_MAX)


GEMV_SPLIT_MAX = 16  # sizes the partial-sum buffer
GEMV_ROWS_MAX = 8
GEMV_CONFIGS = [
    _c(nw, ns, BLOCK_N=bn, NB=nb, PPS=pps, DOT=dot)
    for dot in ("i8", "f16")
    for nw, ns, bn, nb, pps in ((4, 1, 256, 4, 8), (4, 1, 128, 4, 8), (4, 1, 128, 8, 8), (8, 1, 512, 4, 4),
                                (2, 1, 128, 4, 16), (4, 2, 256, 4, 4), (4, 2, 128, 8, 4), (8, 1, 256, 8, 8))
]
MM_SMALL_CONFIGS = [  # M <= 64: BLOCK_M 16 (transposed or not), split-K to fill the GPU
    _c(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SWAP=True, PPS=4),
    _c(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, SWAP=True, PPS=4),
    _c(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, SWAP=True, PPS=8),
    _c(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, PPS=2),
    # W' as the dot's B operand: decoded in a blocked layout and staged through shared memory (as A, the
    # swapped product decodes straight into the register operand layout: byte loads and repacking)
    _c(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SWAP=False, PPS=4),
    _c(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, SWAP=False, PPS=4),
    _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, SWAP=False, PPS=8),
    _c(8, 3, BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, GROUP_M=1, SWAP=False, PPS=2),
    _c(8, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, GROUP_M=1, SWAP=False, PPS=4),
    _c(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, SWAP=False, PPS=4),
    _c(4, 6, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, SWAP=False, PPS=4),  # won at M = 64
    _c(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, SWAP=False, PPS=8),
    _c(4, 2, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, SWAP=False, PPS=2),
]
MM_LARGE_CONFIGS = [
    _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
]
MM_SMALL_MAX_M = 64  # up to this M the tensor-core kernel autotunes over MM_SMALL_CONFIGS, above MM_LARGE_CONFIGS
