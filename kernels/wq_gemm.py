"""Triton weight-only GEMMs: y = x @ dequant(W)ᵀ for bf16/fp16 x and 2/3/4-bit uniform-int or HLQ weights.

Torch reference of the same math: `reference.py`. Three kernels share one dequantization scheme:

- `_gemv_kernel`   decode path (small M): one program = BLOCK_N outputs of one row × a K slice (split-K),
                   CUDA-core FMAs, no tensor cores; dequant work is done once per row.
- `_gemm_kernel`   tensor-core path: tiles of [BLOCK_M, BLOCK_N], the weight tile dequantized in registers,
                   then `tl.dot`; optional split-K for small M (M = 16 decode batches).
- `_dequant_kernel` writes the bf16/fp16 weight (transposed, [K, N]) so that cuBLAS can run the product:
                   the "workspace + cuBLAS" strategy for large M.

Dequantization, cheap on purpose (the decode path is issue-bound, not only memory-bound): each packed word is
repeated along K with `tl.interleave`, then for every code a bit field is rotated into the top of a float32
mantissa and OR-ed with the bits of 1.0 (one funnel shift + one LOP3, no int→float conversion):
    f = 1 + field / 2^w ∈ [1, 2)    (w = field width; exact)
so a weight is an affine function of the fields' f: w = B + Σ_p A_p · f_p with per-(group, column) A_p, B:
    int, b = 2/4:   one field (the code):          A = s·2^b,                B = −s·(z + 2^b)
    int, b = 3:     fields lo2 (bits 0-1), hi1 (2): A = 4s, 8s,               B = −s·(z + 12)
    hlq, n planes:  one 1-bit field per plane:      A_b = 2·s_b,              B = offset − 2·Σ_b s_b
The GEMV dequantizes its tile the same way and accumulates x·w in a [BLOCK_N, BLOCK_K] register tile,
reduced over K once at the end (a per-tile reduction crosses warps and cost ~5× in the first measurement).

Layouts. Stored `qweight int32 [ceil(Kp/32)·bits, N]` (packing.py) is read as is for bits 2 and 4 (a word
holds 32/bits consecutive codes of one column, lowest code in the lowest bits). 3-bit codes straddle words,
so 3-bit weights are repacked once at load time (dispatch.py, cached on the module; stored buffers untouched)
into two streams with the same layout rule: the low 2 bits as a 2-bit stream and the high bit as a 1-bit
stream (3 bits per weight, as before).

Groups: a K tile never straddles a group (BLOCK_K divides the group size); per-channel is GS = 0.
Split-K: partial sums are atomically added into an fp32 workspace that is kept all-zero between calls; the
program that finishes a tile last (per-tile counter) reads the sum back with atomic adds of 0 and re-zeroes the
workspace, adds the bias, writes the output and resets the counter: one launch, no memset, no cast kernel.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

FMT_INT, FMT_HLQ = 0, 1


# ----------------------------------------------------------------------------------------------------------
# shared helpers


@triton.jit
def _words(q_ptr, k0, offs_n, N, R, BLOCK_K: tl.constexpr, PER: tl.constexpr):
    """Packed words covering K tile [k0, k0 + BLOCK_K) → uint32 [BLOCK_N, BLOCK_K] (each word PER times)."""
    rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
    ptrs = q_ptr + rows[None, :] * N + offs_n[:, None]
    w = tl.load(ptrs, mask=(rows[None, :] < R) & (offs_n[:, None] < N), other=0)
    w = w.to(tl.uint32, bitcast=True)
    if PER >= 2:
        w = tl.interleave(w, w)
    if PER >= 4:
        w = tl.interleave(w, w)
    if PER >= 8:
        w = tl.interleave(w, w)
    if PER >= 16:
        w = tl.interleave(w, w)
    if PER >= 32:
        w = tl.interleave(w, w)
    return w


@triton.jit
def _field(w, BLOCK_K: tl.constexpr, WB: tl.constexpr, O: tl.constexpr, WP: tl.constexpr):
    """f = 1 + field/2^WP as float32 [BLOCK_N, BLOCK_K]; field = bits [O, O+WP) of each WB-bit code in w."""
    j = tl.arange(0, BLOCK_K) % (32 // WB)  # code index inside its word
    rot = ((j * WB + O - (23 - WP)) & 31).to(tl.uint32)  # rotate right so the field lands at 23-WP
    rot = rot[None, :]
    r = (w >> rot) | (w << ((32 - rot) & 31))
    bits = (r & (((1 << WP) - 1) << (23 - WP))) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _group_params(s_ptr, z_ptr, g, offs_n, N, FMT: tl.constexpr, BITS: tl.constexpr,
                  HAS_ZERO: tl.constexpr):
    """Per-column (A_0..A_3, B) of group g, float32 [BLOCK_N] each (unused A's are 0)."""
    nm = offs_n < N
    if FMT == 0:
        s = tl.load(s_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
        else:
            z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
        if BITS == 3:
            a0 = s * 4.0
            a1 = s * 8.0
            b = -s * (z + 12.0)
        else:
            a0 = s * (1 << BITS)
            a1 = s * 0.0
            b = -s * (z + (1 << BITS))
        a2 = a1
        a3 = a1
    else:
        off = tl.load(z_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
        sp = s_ptr + g * (BITS * N) + offs_n
        s0 = tl.load(sp, mask=nm, other=0).to(tl.float32)
        s1 = tl.load(sp + N, mask=nm, other=0).to(tl.float32)
        a0 = 2.0 * s0
        a1 = 2.0 * s1
        a2 = s0 * 0.0
        a3 = a2
        ssum = s0 + s1
        if BITS >= 3:
            s2 = tl.load(sp + 2 * N, mask=nm, other=0).to(tl.float32)
            a2 = 2.0 * s2
            ssum += s2
        if BITS >= 4:
            s3 = tl.load(sp + 3 * N, mask=nm, other=0).to(tl.float32)
            a3 = 2.0 * s3
            ssum += s3
        b = off - 2.0 * ssum
    return a0, a1, a2, a3, b


@triton.jit
def _fields(q0_ptr, q1_ptr, k0, offs_n, N, R0, R1, FMT: tl.constexpr, BITS: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """The field tensors f_0..f_3 of one [BLOCK_N, BLOCK_K] weight tile (unused ones alias f_0)."""
    if BITS == 3:
        w0 = _words(q0_ptr, k0, offs_n, N, R0, BLOCK_K, 16)
        w1 = _words(q1_ptr, k0, offs_n, N, R1, BLOCK_K, 32)
        if FMT == 0:
            f0 = _field(w0, BLOCK_K, 2, 0, 2)
            f1 = _field(w1, BLOCK_K, 1, 0, 1)
            f2 = f0
        else:
            f0 = _field(w0, BLOCK_K, 2, 0, 1)
            f1 = _field(w0, BLOCK_K, 2, 1, 1)
            f2 = _field(w1, BLOCK_K, 1, 0, 1)
        f3 = f0
    else:
        w0 = _words(q0_ptr, k0, offs_n, N, R0, BLOCK_K, 32 // BITS)
        if FMT == 0:
            f0 = _field(w0, BLOCK_K, BITS, 0, BITS)
            f1 = f0
            f2 = f0
            f3 = f0
        else:
            f0 = _field(w0, BLOCK_K, BITS, 0, 1)
            f1 = _field(w0, BLOCK_K, BITS, 1, 1)
            f2 = f0
            f3 = f0
            if BITS == 4:
                f2 = _field(w0, BLOCK_K, BITS, 2, 1)
                f3 = _field(w0, BLOCK_K, BITS, 3, 1)
    return f0, f1, f2, f3


@triton.jit
def _n_fields(FMT: tl.constexpr, BITS: tl.constexpr):
    return BITS if FMT == 1 else (2 if BITS == 3 else 1)


@triton.jit
def _dequant_tile(q0_ptr, q1_ptr, s_ptr, z_ptr, k0, offs_n, N, R0, R1, GS: tl.constexpr,
                  FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight tile w[n, k0:k0+BLOCK_K] as float32 [BLOCK_N, BLOCK_K]."""
    g = k0 // GS if GS > 0 else 0
    a0, a1, a2, a3, b = _group_params(s_ptr, z_ptr, g, offs_n, N, FMT, BITS, HAS_ZERO)
    f0, f1, f2, f3 = _fields(q0_ptr, q1_ptr, k0, offs_n, N, R0, R1, FMT, BITS, BLOCK_K)
    w = b[:, None] + a0[:, None] * f0
    NF: tl.constexpr = BITS if FMT == 1 else (2 if BITS == 3 else 1)
    if NF >= 2:
        w += a1[:, None] * f1
    if NF >= 3:
        w += a2[:, None] * f2
    if NF >= 4:
        w += a3[:, None] * f3
    return w


@triton.jit
def _store_out(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, tile_id,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """acc: float32 [BLOCK_M, BLOCK_N] partial (or full, SPLIT_K == 1) sum of one output tile."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    optrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        wptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(wptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is in before the (cumulative) release below
        done = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # last contributor: read back (and re-zero) the sum, finish the tile
            zero = tl.zeros_like(acc)
            tot = tl.atomic_add(wptrs, zero, mask=mask, sem="acquire")  # read at L2, after all partials
            tl.store(wptrs, zero, mask=mask)
            if HAS_BIAS:
                tot += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
            tl.store(optrs, tot.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + tile_id, 0)


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _gemv_kernel(x_ptr, q0_ptr, q1_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, R0, R1, stride_xm, stride_om, M_BUCKET,
                 GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), SPLIT_K, M). x: [M, K] (row stride stride_xm), out: [M, N]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0).to(tl.float32)
        w = _dequant_tile(q0_ptr, q1_ptr, s_ptr, z_ptr, k0, offs_n, N, R0, R1, GS, FMT, BITS, HAS_ZERO,
                          BLOCK_K)
        acc2 += w * xk[None, :]
    acc = tl.sum(acc2, axis=1)  # one (possibly cross-warp) reduction per program, not one per K tile
    offs_m = m + tl.arange(0, 1)
    tile_id = m * tl.num_programs(0) + pid_n
    _store_out(acc[None, :], out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, tile_id,
               HAS_BIAS, SPLIT_K)


@triton.jit
def _gemm_kernel(x_ptr, q0_ptr, q1_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, R0, R1, stride_xm, stride_om, M_BUCKET,
                 GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr = False):
    """Grid (cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N), SPLIT_K). DOT_F32: run the product on fp32 copies of the
    same bf16/fp16 operands (Triton's CPU interpreter computes bf16 tl.dot wrongly; GPU never sets it)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # grouped ordering: GROUP_M row blocks share weight tiles in L2
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _dequant_tile(q0_ptr, q1_ptr, s_ptr, z_ptr, k0, offs_n, N, R0, R1, GS, FMT, BITS, HAS_ZERO,
                          BLOCK_K)
        wq = tl.trans(w.to(xt.dtype))
        if DOT_F32:
            acc = tl.dot(xt.to(tl.float32), wq.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wq, acc)
    _store_out(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, pid, HAS_BIAS,
               SPLIT_K)


@triton.jit
def _dequant_kernel(q0_ptr, q1_ptr, s_ptr, z_ptr, wt_ptr, N, K, R0, R1,
                    GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """wt: [K, N] (x dtype) = dequantized weight, transposed. Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = _dequant_tile(q0_ptr, q1_ptr, s_ptr, z_ptr, k0, offs_n, N, R0, R1, GS, FMT, BITS, HAS_ZERO, BLOCK_K)
    tl.store(wt_ptr + offs_k[None, :] * N + offs_n[:, None], w.to(wt_ptr.dtype.element_ty),
             mask=(offs_k[None, :] < K) & (offs_n[:, None] < N))


# ----------------------------------------------------------------------------------------------------------
# autotuning (configs next to the kernels; chosen configs cached by triton's autotuner, on disk when supported)

_KEY = ["M_BUCKET", "N", "K", "GS", "FMT", "BITS"]
_CACHE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _prune_bk(configs, named_args, **kwargs):
    gs = {**named_args, **kwargs}.get("GS", 0)
    ok = [c for c in configs if gs == 0 or gs % c.kwargs["BLOCK_K"] == 0]
    return ok or [triton.Config({**configs[0].kwargs, "BLOCK_K": 32}, num_warps=configs[0].num_warps,
                                num_stages=configs[0].num_stages)]


def _split_k(tiles: int, k_tiles: int, target: int) -> int:
    """Split K until there are about `target` programs (enough loads in flight to stream the weights)."""
    if tiles >= target:
        return 1
    return max(1, min(k_tiles // 2, -(-target // tiles), 32))


NUM_SMS = [132]  # set by the dispatcher from the device


def _gemv_split(a):  # memory-bound: ~8 programs per SM
    return _split_k(triton.cdiv(a["N"], a["BLOCK_N"]) * a["M"], triton.cdiv(a["K"], a["BLOCK_K"]),
                    8 * NUM_SMS[0])


def _gemm_split(a):  # small M (few row tiles): ~4 programs per SM; large M: one wave is enough
    tiles = triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(a["N"], a["BLOCK_N"])
    target = (4 if a["M"] <= 64 else 1) * NUM_SMS[0]
    return _split_k(tiles, triton.cdiv(a["K"], a["BLOCK_K"]), target)


def _c(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


GEMV_CONFIGS = [
    _c(4, 3, BLOCK_N=64, BLOCK_K=128),
    _c(4, 3, BLOCK_N=128, BLOCK_K=128),
    _c(4, 4, BLOCK_N=128, BLOCK_K=64),
    _c(8, 3, BLOCK_N=256, BLOCK_K=64),
    _c(4, 4, BLOCK_N=64, BLOCK_K=64),
    _c(2, 3, BLOCK_N=32, BLOCK_K=128),
]
GEMM_SMALL_CONFIGS = [  # M <= 64
    _c(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1),
    _c(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1),
    _c(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1),
    _c(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=1),
    _c(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1),
]
GEMM_LARGE_CONFIGS = [
    _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
    _c(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
]


def _tuned(kernel, configs, split):
    return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _prune_bk}, **_CACHE_KW)(
        triton.heuristics({"SPLIT_K": split})(kernel))


gemv_tuned = _tuned(_gemv_kernel, GEMV_CONFIGS, _gemv_split)
gemm_small_tuned = _tuned(_gemm_kernel, GEMM_SMALL_CONFIGS, _gemm_split)
gemm_large_tuned = _tuned(_gemm_kernel, GEMM_LARGE_CONFIGS, _gemm_split)
