"""Triton weight-only GEMMs: y = x @ dequant(W)ᵀ for bf16/fp16 x and 2/3/4-bit uniform-int or HLQ weights.

Torch reference of the same math: `reference.py`. Three kernels share one dequantization scheme:

- `_gemv_kernel`   fp32 GEMV (path "gemv_f32"; the decode path is now `wq_gemv._gemv_h2_kernel`, ~2x fewer
                   instructions): one program = BLOCK_N outputs of one row × a K slice (split-K),
                   CUDA-core FMAs, no tensor cores; dequant work is done once per row.
- `_gemm_kernel`   tensor-core path: tiles of [BLOCK_M, BLOCK_N], the weight tile dequantized in registers,
                   then `tl.dot`; optional split-K for small M (M = 16 decode batches).
- `_dequant_kernel` writes the bf16/fp16 weight (transposed, [K, N]) so that cuBLAS can run the product:
                   the "workspace + cuBLAS" strategy for large M.

Dequantization without per-element shift amounts or int→float conversions: a code's bits are moved to the top
of a float32 mantissa by a *constant* shift (the code's slot in its word is known at compile time) and OR-ed
with the bits of 1.0 (SHF + LOP3):
    f = 1 + field / 2^w ∈ [1, 2)    (w = the field's distance from bit 23; exact)
so a weight is an affine function of the fields' f: w = B + Σ_p A_p · f_p with per-(group, column) A_p, B:
    int, b = 2/4:   one field (the code, bits [23-b, 23)):         A = s·2^b,        B = −s·(z + 2^b)
    int, b = 3:     lo2 stream (bits 21-22), hi1 stream (bit 22):  A = 4s, 8s,       B = −s·(z + 12)
    hlq, n planes:  plane p of the code at bit 23-n+p (b=3: plane 2 from the 1-bit stream at bit 22):
                    A_p = s_p·2^(n-p) (b=3: 4s_0, 2s_1, 2s_2),     B = offset − Σ_p A_p
- `_gemv_kernel` keeps the words of a tile as [BLOCK_N, RUNS] tensors, one per word slot (N-contiguous 16-byte
  loads), so every code slot i is a compile-time shift; one shift serves 8/w codes (the lower ones sit d bits
  below the top, f = 1 + field·2^-(w+d); their x is scaled by 2^d and the surplus Σ(2^d − 1)·x is removed once
  per run). It accumulates t_p = Σ_k x_k·f_p (one FMA per field) and applies the group's affine map once per run
  and column: acc += Σ_p A_p·(t_p − surplus) + B·Σ_k x_k. The next tile's words are loaded before the current
  one is computed (register prefetch). Per int4 weight that is ~0.6 shift + 1 LOP3 + 1 FFMA in SASS (the bits of
  1.0 are a kernel argument so that and+or fuse into one LOP3, see `_f`), ~5 instructions per weight in the
  loop with the x side (load, bf16→f32, Σx, 2^d scaling: per x value, shared by a thread's 4 columns).
- `_gemm_kernel` / `_dequant_kernel` need the tile in natural K order: the words [BLOCK_N, RUNS, words/run]
  are spread by the same constant shifts into a tree of `tl.join`s and reshaped to [BLOCK_N, RUNS·32]
  (`_spread`), then w = B + Σ_p A_p·f_p in fp32 and cast to the activation dtype for `tl.dot`. For small M
  the product may be computed transposed (SWAP: acc^T = w·x^T, the weight as the register A operand).

Layouts. Stored `qweight int32 [ceil(Kp/32)·bits, N]` (packing.py) is read as is for bits 2 and 4 (a word
holds 32/bits consecutive codes of one column, lowest code in the lowest bits). 3-bit codes straddle words,
so 3-bit weights are repacked once at load time (dispatch.py, cached on the module; stored buffers untouched)
into two streams with the same layout rule: the low 2 bits as a 2-bit stream and the high bit as a 1-bit
stream (3 bits per weight, as before).

Groups: a K tile never straddles a group (BLOCK_K = 32·RUNS divides the group size); per-channel is GS = 0.
Split-K: partial sums are atomically added into an fp32 workspace that is kept all-zero between calls; the
program that finishes a tile last (per-tile counter) reads the sum back with atomic adds of 0 and re-zeroes the
workspace, adds the bias, writes the output and resets the counter: one launch, no memset, no cast kernel
(`triton_common.store_out`, shared with `wq_gemv`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from quantkit.kernels.triton_common import (
    AUTOTUNE_CACHE_KW,
    NUM_SMS,
    grouped_tile,
    split_k,
    split_range,
    store_out,
)

FMT_INT, FMT_HLQ = 0, 1


# ----------------------------------------------------------------------------------------------------------
# shared helpers


@triton.jit
def _top(w, POS: tl.constexpr):
    """w (uint32) shifted so that bit POS lands at bit 22, the top of a float32 mantissa (constant shift)."""
    if POS > 22:
        r = w >> (POS - 22)
    elif POS < 22:
        r = w << (22 - POS)
    else:
        r = w
    return r


@triton.jit
def _f(u, LO: tl.constexpr, WP: tl.constexpr, one):
    """float32 1 + field/2^(23-LO) from the WP-bit field at bits [LO, LO+WP) of u. `one` (uint32 0x3F800000)
    comes from a kernel argument, not an immediate: a LOP3 takes one immediate, so with both constants
    immediate ptxas emitted two LOP3s per field (H200 SASS); with `one` in a register it is one."""
    return ((u & (((1 << WP) - 1) << LO)) | one).to(tl.float32, bitcast=True)


@triton.jit
def _group_params(s_ptr, z_ptr, g, offs_n, N, FMT: tl.constexpr, BITS: tl.constexpr,
                  HAS_ZERO: tl.constexpr):
    """Per-column (A_0..A_3, B) of group g, float32 [BLOCK_N] each, such that w = B + Σ_p A_p·f_p, where
    f_p are the fields the kernels extract (see module docstring; unused A's are 0)."""
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
        a2 = s0 * 0.0
        a3 = a2
        if BITS == 2:  # planes 0, 1 at bits 21, 22: f = 1 + β/4, 1 + β/2
            a0 = 4.0 * s0
            a1 = 2.0 * s1
        elif BITS == 3:  # stream0 (2-bit): planes 0, 1 at bits 21, 22; stream1 (1-bit): plane 2 at bit 22
            s2 = tl.load(sp + 2 * N, mask=nm, other=0).to(tl.float32)
            a0 = 4.0 * s0
            a1 = 2.0 * s1
            a2 = 2.0 * s2
        else:  # planes 0..3 at bits 19..22
            s2 = tl.load(sp + 2 * N, mask=nm, other=0).to(tl.float32)
            s3 = tl.load(sp + 3 * N, mask=nm, other=0).to(tl.float32)
            a0 = 16.0 * s0
            a1 = 8.0 * s1
            a2 = 4.0 * s2
            a3 = 2.0 * s3
        b = off - (a0 + a1 + a2 + a3)
    return a0, a1, a2, a3, b


# Field tiles in natural K order for the tensor-core / dequant kernels: a [BLOCK_N, RUNS, WPR] tile of words
# is spread into [BLOCK_N, RUNS·32] by constant shifts, assembled with tl.join (no per-element shift amounts).

@triton.jit
def _sp1(w, I: tl.constexpr, WB: tl.constexpr):
    return _top(w, I * WB + WB - 1)


@triton.jit
def _sp2(w, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr):
    return tl.join(_sp1(w, I, WB), _sp1(w, I + D, WB))


@triton.jit
def _sp4(w, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr):
    return tl.join(_sp2(w, I, 2 * D, WB), _sp2(w, I + D, 2 * D, WB))


@triton.jit
def _sp8(w, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr):
    return tl.join(_sp4(w, I, 2 * D, WB), _sp4(w, I + D, 2 * D, WB))


@triton.jit
def _sp16(w, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr):
    return tl.join(_sp8(w, I, 2 * D, WB), _sp8(w, I + D, 2 * D, WB))


@triton.jit
def _sp32(w, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr):
    return tl.join(_sp16(w, I, 2 * D, WB), _sp16(w, I + D, 2 * D, WB))


@triton.jit
def _spread(q_ptr, run0, offs_n, N, R, WB: tl.constexpr, RUNS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Words of runs [run0, run0 + RUNS) of a WB-bit stream → uint32 [BLOCK_N, RUNS·32], element (n, k) the
    word of code k shifted so that the code's top bit sits at bit 22 (the code occupies [23-WB, 23))."""
    WPR: tl.constexpr = WB  # words per run of 32 codes
    rows = (run0 + tl.arange(0, RUNS))[:, None] * WPR + tl.arange(0, WPR)[None, :]  # [RUNS, WPR]
    ptrs = q_ptr + rows[None, :, :] * N + offs_n[:, None, None]
    w = tl.load(ptrs, mask=(rows[None, :, :] < R) & (offs_n[:, None, None] < N), other=0)
    w = w.to(tl.uint32, bitcast=True)
    if WB == 1:
        u = _sp32(w, 0, 1, WB)
    elif WB == 2:
        u = _sp16(w, 0, 1, WB)
    else:
        u = _sp8(w, 0, 1, WB)
    return tl.reshape(u, (BLOCK_N, RUNS * 32))


@triton.jit
def _dequant_tile(q0_ptr, q1_ptr, s_ptr, z_ptr, k0, offs_n, N, R0, R1, GS: tl.constexpr,
                  FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, one):
    """Weight tile w[n, k0:k0+BLOCK_K] as float32 [BLOCK_N, BLOCK_K] (BLOCK_K a multiple of 32, in one group)."""
    g = k0 // GS if GS > 0 else 0
    a0, a1, a2, a3, b = _group_params(s_ptr, z_ptr, g, offs_n, N, FMT, BITS, HAS_ZERO)
    RUNS: tl.constexpr = BLOCK_K // 32
    run0 = k0 // 32
    WB0: tl.constexpr = 2 if BITS == 3 else BITS
    u = _spread(q0_ptr, run0, offs_n, N, R0, WB0, RUNS, BLOCK_N)
    if FMT == 0:
        w = b[:, None] + a0[:, None] * _f(u, 23 - WB0, WB0, one)
    else:
        w = b[:, None] + a0[:, None] * _f(u, 23 - WB0, 1, one)
        w += a1[:, None] * _f(u, 24 - WB0, 1, one)
        if BITS == 4:
            w += a2[:, None] * _f(u, 21, 1, one)
            w += a3[:, None] * _f(u, 22, 1, one)
    if BITS == 3:
        u1 = _spread(q1_ptr, run0, offs_n, N, R1, 1, RUNS, BLOCK_N)
        if FMT == 0:
            w += a1[:, None] * _f(u1, 22, 1, one)
        else:
            w += a2[:, None] * _f(u1, 22, 1, one)
    return w


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _slot(q_ptr, run, J: tl.constexpr, WPR: tl.constexpr, run_hi, offs_n, N, R):
    """Word slot J of runs `run` ([RUNS]) of a stream with WPR words per run → uint32 [BLOCK_N, RUNS]
    (zero where run >= run_hi: a prefetch past the program's last tile loads nothing)."""
    rows = run * WPR + J
    ok = (rows < R) & (run < run_hi)
    w = tl.load(q_ptr + rows[None, :] * N + offs_n[:, None], mask=(offs_n[:, None] < N) & ok[None, :], other=0)
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def _gemv_kernel(x_ptr, q0_ptr, q1_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, R0, R1, stride_xm, stride_om, M_BUCKET, ONE,
                 GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, RUNS: tl.constexpr, SPLIT_K: tl.constexpr,
                 EVEN_K: tl.constexpr = False, PPS: tl.constexpr = 8):
    """Grid (cdiv(N, BLOCK_N), SPLIT_K, M). x: [M, K] (row stride stride_xm), out: [M, N].

    A tile is RUNS runs of 32 codes (inside one group) × BLOCK_N columns, held as [BLOCK_N, RUNS] words per
    word slot (no interleave, no per-element shift amounts); the next tile's words are loaded (register
    prefetch) before the current tile is computed. For each code slot i of a word the field goes to the top
    of a float32 mantissa by a constant shift + one LOP3, and t_p += x_i·f_p (one FMA) per field p; the
    group's affine map is applied once per run: acc += Σ_p A_p·t_p + B·Σx."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_runs = tl.cdiv(K, 32)
    t_lo, t_hi = split_range(pid_k, tl.cdiv(n_runs, RUNS), SPLIT_K)
    run_hi = t_hi * RUNS
    WB: tl.constexpr = 2 if BITS == 3 else BITS  # code width of stream 0 = its words per run
    PER: tl.constexpr = 32 // WB  # codes per word
    acc = tl.zeros((BLOCK_N, RUNS), tl.float32)
    one = ONE.to(tl.uint32)
    xrow = x_ptr + m * stride_xm
    run = t_lo * RUNS + tl.arange(0, RUNS)  # [RUNS]
    w0 = _slot(q0_ptr, run, 0, WB, run_hi, offs_n, N, R0)
    w1 = _slot(q0_ptr, run, 1, WB, run_hi, offs_n, N, R0)
    w2 = w0
    w3 = w0
    v = w0
    if WB == 4:
        w2 = _slot(q0_ptr, run, 2, WB, run_hi, offs_n, N, R0)
        w3 = _slot(q0_ptr, run, 3, WB, run_hi, offs_n, N, R0)
    if BITS == 3:
        v = _slot(q1_ptr, run, 0, 1, run_hi, offs_n, N, R1)
    for t in range(t_lo, t_hi):
        c0 = w0
        c1 = w1
        c2 = w2
        c3 = w3
        cv = v
        nxt = run + RUNS  # prefetch the next tile's words
        w0 = _slot(q0_ptr, nxt, 0, WB, run_hi, offs_n, N, R0)
        w1 = _slot(q0_ptr, nxt, 1, WB, run_hi, offs_n, N, R0)
        if WB == 4:
            w2 = _slot(q0_ptr, nxt, 2, WB, run_hi, offs_n, N, R0)
            w3 = _slot(q0_ptr, nxt, 3, WB, run_hi, offs_n, N, R0)
        if BITS == 3:
            v = _slot(q1_ptr, nxt, 0, 1, run_hi, offs_n, N, R1)
        g = (t * RUNS * 32) // GS if GS > 0 else 0
        a0, a1, a2, a3, b = _group_params(s_ptr, z_ptr, g, offs_n, N, FMT, BITS, HAS_ZERO)
        xs = tl.zeros((RUNS,), tl.float32)
        e0 = tl.zeros((RUNS,), tl.float32)  # Σ (2^d - 1)·x over stream-0 codes (see below)
        e1 = tl.zeros((RUNS,), tl.float32)  # the same over stream-1 codes
        t0 = tl.zeros((BLOCK_N, RUNS), tl.float32)
        t1 = tl.zeros((BLOCK_N, RUNS), tl.float32)
        t2 = tl.zeros((BLOCK_N, RUNS), tl.float32)
        t3 = tl.zeros((BLOCK_N, RUNS), tl.float32)
        # One shift serves G codes: it puts the top code of the group at the top of the mantissa; a code r slots
        # below sits d = r·WB bits lower, f = 1 + field·2^-(w + d); scaling its x by 2^d restores the field's
        # weight and adds (2^d - 1)·x, subtracted once per run (e0, e1). d <= 7: fp32 keeps >= 16 bits of it.
        G: tl.constexpr = 8 // WB
        for j in tl.static_range(WB):  # word slots of a run (stream 0)
            if j == 0:
                w = c0
            elif j == 1:
                w = c1
            elif j == 2:
                w = c2
            else:
                w = c3
            for i in tl.static_range(PER):
                kk = run * 32 + (j * PER + i)
                if EVEN_K:
                    xv = tl.load(xrow + kk).to(tl.float32)
                else:
                    xv = tl.load(xrow + kk, mask=kk < K, other=0).to(tl.float32)
                xs += xv
                D = (G - 1 - i % G) * WB
                if D > 0:
                    e0 += xv * ((1 << D) - 1)
                    xv = xv * (1 << D)
                u = _top(w, ((i // G) * G + G - 1) * WB + WB - 1)  # identical shifts are CSE'd
                if FMT == 0:
                    t0 += xv[None, :] * _f(u, 23 - WB - D, WB, one)
                else:
                    t0 += xv[None, :] * _f(u, 23 - WB - D, 1, one)
                    t1 += xv[None, :] * _f(u, 24 - WB - D, 1, one)
                    if BITS == 4:
                        t2 += xv[None, :] * _f(u, 21 - D, 1, one)
                        t3 += xv[None, :] * _f(u, 22 - D, 1, one)
        if BITS == 3:  # stream 1: the high bit, one word per run, 8 codes per shift
            for i in tl.static_range(32):
                kk = run * 32 + i
                if EVEN_K:
                    xv = tl.load(xrow + kk).to(tl.float32)
                else:
                    xv = tl.load(xrow + kk, mask=kk < K, other=0).to(tl.float32)
                D1 = 7 - i % 8
                if D1 > 0:
                    e1 += xv * ((1 << D1) - 1)
                    xv = xv * (1 << D1)
                u1 = _top(cv, (i // 8) * 8 + 7)
                if FMT == 0:
                    t1 += xv[None, :] * _f(u1, 22 - D1, 1, one)
                else:
                    t2 += xv[None, :] * _f(u1, 22 - D1, 1, one)
        acc += a0[:, None] * (t0 - e0[None, :]) + b[:, None] * xs[None, :]
        NF: tl.constexpr = BITS if FMT == 1 else (2 if BITS == 3 else 1)
        if NF >= 2:
            if BITS == 3 and FMT == 0:
                acc += a1[:, None] * (t1 - e1[None, :])
            else:
                acc += a1[:, None] * (t1 - e0[None, :])
        if NF >= 3:
            if BITS == 3:
                acc += a2[:, None] * (t2 - e1[None, :])
            else:
                acc += a2[:, None] * (t2 - e0[None, :])
        if NF >= 4:
            acc += a3[:, None] * (t3 - e0[None, :])
        run = nxt
    out = tl.sum(acc, axis=1)  # one reduction per program
    offs_m = m + tl.arange(0, 1)
    tile_id = m * tl.num_programs(0) + pid_n
    store_out(out[None, :], out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, tile_id,
               HAS_BIAS, SPLIT_K)


@triton.jit
def _gemm_kernel(x_ptr, q0_ptr, q1_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, R0, R1, stride_xm, stride_om, M_BUCKET, ONE,
                 GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr = False,
                 SWAP: tl.constexpr = False, PPS: tl.constexpr = 4):
    """Grid (cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N), SPLIT_K). DOT_F32: run the product on fp32 copies of the
    same bf16/fp16 operands (Triton's CPU interpreter computes bf16 tl.dot wrongly; GPU never sets it)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t0, t1 = split_range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _dequant_tile(q0_ptr, q1_ptr, s_ptr, z_ptr, k0, offs_n, N, R0, R1, GS, FMT, BITS, HAS_ZERO,
                          BLOCK_K, BLOCK_N, ONE.to(tl.uint32))
        wq = w.to(xt.dtype)
        xo = xt
        if DOT_F32:
            wq = wq.to(tl.float32)
            xo = xt.to(tl.float32)
        if SWAP:  # acc^T [BLOCK_N, BLOCK_M] = w · x^T: the weight is the A operand (registers)
            if DOT_F32:
                acc = tl.dot(wq, tl.trans(xo), acc, input_precision="ieee")
            else:
                acc = tl.dot(wq, tl.trans(xo), acc)
        else:
            if DOT_F32:
                acc = tl.dot(xo, tl.trans(wq), acc, input_precision="ieee")
            else:
                acc = tl.dot(xo, tl.trans(wq), acc)
    if SWAP:
        acc = tl.trans(acc)
    store_out(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, pid, HAS_BIAS,
               SPLIT_K)


@triton.jit
def _dequant_kernel(q0_ptr, q1_ptr, s_ptr, z_ptr, wt_ptr, N, K, R0, R1, ONE,
                    GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NK: tl.constexpr = False):
    """wt: [K, N] (x dtype) = dequantized weight, transposed; NK: [N, K] instead (the layout of an nn.Linear
    weight: each thread then stores its column's consecutive codes contiguously, and cuBLAS runs the same
    product as for the bf16 model). Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = _dequant_tile(q0_ptr, q1_ptr, s_ptr, z_ptr, k0, offs_n, N, R0, R1, GS, FMT, BITS, HAS_ZERO, BLOCK_K,
                      BLOCK_N, ONE.to(tl.uint32))
    mask = (offs_k[None, :] < K) & (offs_n[:, None] < N)
    if NK:
        tl.store(wt_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(wt_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(wt_ptr + offs_k[None, :] * N + offs_n[:, None], w.to(wt_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# autotuning (configs next to the kernels; chosen configs cached by triton's autotuner, on disk when supported)

AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "GS", "FMT", "BITS"]  # also the key of wq_gemv's autotuner (same arguments)


def _bk(kw: dict) -> int:
    return kw["BLOCK_K"] if "BLOCK_K" in kw else 32 * kw["RUNS"]


def _prune_bk(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    gs = a.get("GS", 0)
    ok = [c for c in configs if gs == 0 or gs % _bk(c.kwargs) == 0]
    if ok and "RUNS" in ok[0].kwargs and a.get("N", 0) >= 8192:
        # Wide decode GEMVs: the autotuner (single launches) and the rotated CUDA-graph benchmark disagreed by
        # up to 25% (int3/hlq3/hlq4), so take the sweep's winner (eval/bench_decode.py, H200, N = 14336).
        want = (512, 4) if a.get("BITS") == 4 else (256, 1)
        ok = [c for c in ok if (c.kwargs["BLOCK_N"], c.num_warps) == want] or ok
    if ok:
        return ok
    small = {"RUNS": 1} if "RUNS" in configs[0].kwargs else {"BLOCK_K": 32}
    return [triton.Config({**configs[0].kwargs, **small}, num_warps=configs[0].num_warps,
                          num_stages=configs[0].num_stages)]


def _gemv_split(a):  # memory-bound: about PPS programs per SM (a config knob, default 8)
    return split_k(triton.cdiv(a["N"], a["BLOCK_N"]) * a["M"], triton.cdiv(a["K"], 32 * a["RUNS"]),
                   a.get("PPS", 8) * NUM_SMS[0], 64)


def _gemm_split(a):  # small M (few row tiles): ~4 programs per SM; large M: one wave is enough
    tiles = triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(a["N"], a["BLOCK_N"])
    target = (a.get("PPS", 4) if a["M"] <= 64 else 1) * NUM_SMS[0]
    return split_k(tiles, triton.cdiv(a["K"], a["BLOCK_K"]), target)


def _c(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


GEMV_CONFIGS = [  # eval/bench_decode.py on an H200: many short programs won (split-K up to 64 at K = 4096)
    _c(4, 1, BLOCK_N=512, RUNS=1, PPS=16),
    _c(4, 1, BLOCK_N=1024, RUNS=1, PPS=16),
    _c(2, 1, BLOCK_N=512, RUNS=1, PPS=32),
    _c(1, 1, BLOCK_N=256, RUNS=1, PPS=32),
    _c(8, 1, BLOCK_N=1024, RUNS=1, PPS=16),
    _c(1, 1, BLOCK_N=128, RUNS=1, PPS=64),
]
GEMM_SMALL_CONFIGS = [  # M <= 64 (H200: the transposed product, SWAP, won at M = 16 after the LOP3 change)
    _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, PPS=4, SWAP=True),
    _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, PPS=8, SWAP=True),
    _c(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, PPS=8),
    _c(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, PPS=4),
]
GEMM_LARGE_CONFIGS = [
    _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
    _c(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    # M = 128 (int4 g128 on an H100, experiments/device/prefill_gemm_sweep.py): the fastest of the small-M configs
    # tried there on all five fused Llama-3-8B shapes, and faster than the bf16 workspace + cuBLAS path on four
    _c(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SWAP=True),
]


def _tuned(kernel, configs, split):
    heur = {"SPLIT_K": split}
    if kernel is _gemv_kernel:
        heur["EVEN_K"] = lambda a: a["K"] % (32 * a["RUNS"]) == 0
    return triton.autotune(configs, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_bk},
                           **AUTOTUNE_CACHE_KW)(triton.heuristics(heur)(kernel))


gemv_tuned = _tuned(_gemv_kernel, GEMV_CONFIGS, _gemv_split)
gemm_small_tuned = _tuned(_gemm_kernel, GEMM_SMALL_CONFIGS, _gemm_split)
gemm_large_tuned = _tuned(_gemm_kernel, GEMM_LARGE_CONFIGS, _gemm_split)
