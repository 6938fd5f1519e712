"""Small-M weight-only GEMM on fp16 tensor cores with the codes used *in place*: y = x @ dequant(W)ᵀ for
M ≈ 3..64 rows, uniform-int or HLQ weights at 2/3/4 bits, read in the stored layout (3-bit: the 2 + 1-bit
streams of `dispatch.prepare`). Torch reference of the same math: `reference.py`.

Why: `wq_gemm._gemm_kernel` turns every code into a float32 weight (shift, LOP3, FFMA, convert) before its
`tl.dot`, so at M = 16 its time is set by the dequantization, not by the product or the bytes (flat in M from
2 to 16, ~27 us at 4096 x 14336, 0.87x cuBLAS bf16; kernels/decode_notes.md). Here the tensor-core operand is
the code itself, as the half2 GEMV (`wq_gemv.py`) uses it:

- A field AND-ed out of a word in place is an fp16 subnormal, q·2^(p-24) for a field at bit p of its half
  (exact while p + width <= 10). One LOP3 with the mask `m | m << 16` yields two codes (k and k + codes/2 of
  the word); fields above bit 9 are reached by one shift of the word. Fp16 MMA takes subnormal operands.
- The x operand absorbs the field's position: x' = x·c·2^(24-p), exact in fp16 (bf16 x times a power of
  two, inside fp16's normal range), with c = 2^(-10-e) per row from the program's max |x| (e its exponent),
  so |x'| < 2^15. Then one MMA sums x·c·q over the tile exactly in fp32.
- The words are loaded as [BLOCK_N, R] (R word rows of the tile) and the fields' two halves joined by a
  tree of `tl.join`s whose new dims are all minor, so the [BLOCK_N, BLOCK_K] operand comes out in natural
  K order with no permute. The product runs transposed by default (SWAP: the weight is the A operand,
  acc^T [BLOCK_N, BLOCK_M]).

Measured on an H200 (`python3 -m quantkit.kernels.bench_decode --mma`, docs/bench/probe_mma_inplace_h200.json):
SLOWER than the kernel it was meant to replace, so nothing dispatches to it: int4 g128 4096 x 14336 M = 16
44.5 us (best config) vs 27.1 us, int2 g64 41.0 vs 33.2, hlq2 60.8 vs 34.3; kernels/decode_notes.md.
- Per K tile (inside one group) the product gives Σ_k x_k·c·q_k; the group's affine map is applied to the
  fp32 tile result: int acc += s·T − s·z·c·Σx; HLQ acc += Σ_b s_b·2^-b·T_b + offset·c·Σx, one product per
  plane (the plane's bit stays in place, worth 2^b). 3-bit: the 1-bit stream's product is weighted 4 (int) /
  is plane 2 (HLQ).

Split-K and the output epilogue are `wq_gemm`'s (`_store_out`). `DOT_F32` runs the product on fp32 copies of
the same operands: the CPU interpreter computes fp16 `tl.dot` wrongly, and fp32 holds the same exact values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quantkit.kernels.wq_gemm import _CACHE_KW, _KEY, NUM_SMS, _prune_bk, _split_k, _split_range, _store_out


@triton.jit
def _leaf(w, ws, SLOT: tl.constexpr, WB: tl.constexpr, MW: tl.constexpr, B: tl.constexpr):
    """Both halves of field slot SLOT (an MW-bit mask at the field's bit B) as fp16 [BLOCK_N, R, 2]."""
    SH: tl.constexpr = 8 if WB == 4 else 10
    IN_PLACE: tl.constexpr = SLOT * WB + WB <= 10
    P: tl.constexpr = SLOT * WB if IN_PLACE else SLOT * WB - SH
    M0: tl.constexpr = ((1 << MW) - 1) << (P + B)
    if IN_PLACE:
        f = w & (M0 | (M0 << 16))
    else:
        f = ws & (M0 | (M0 << 16))
    lo = (f & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (f >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _t1(w, ws, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr, MW: tl.constexpr, B: tl.constexpr):
    return tl.join(_leaf(w, ws, I, WB, MW, B), _leaf(w, ws, I + D, WB, MW, B))


@triton.jit
def _t2(w, ws, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr, MW: tl.constexpr, B: tl.constexpr):
    return tl.join(_t1(w, ws, I, 2 * D, WB, MW, B), _t1(w, ws, I + D, 2 * D, WB, MW, B))


@triton.jit
def _t3(w, ws, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr, MW: tl.constexpr, B: tl.constexpr):
    return tl.join(_t2(w, ws, I, 2 * D, WB, MW, B), _t2(w, ws, I + D, 2 * D, WB, MW, B))


@triton.jit
def _t4(w, ws, I: tl.constexpr, D: tl.constexpr, WB: tl.constexpr, MW: tl.constexpr, B: tl.constexpr):
    return tl.join(_t3(w, ws, I, 2 * D, WB, MW, B), _t3(w, ws, I + D, 2 * D, WB, MW, B))


@triton.jit
def _operand(w, WB: tl.constexpr, MW: tl.constexpr, B: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Words [BLOCK_N, R] of a WB-bit stream → fp16 [BLOCK_N, 32·R/WB] in natural K order: the join tree's
    new dims are minor (half h, then the slot's bits), so the flat index is PER·j + HALF·h + slot = k − k0."""
    SH: tl.constexpr = 8 if WB == 4 else 10
    ws = w >> SH
    if WB == 4:
        t = _t2(w, ws, 0, 1, WB, MW, B)
    elif WB == 2:
        t = _t3(w, ws, 0, 1, WB, MW, B)
    else:
        t = _t4(w, ws, 0, 1, WB, MW, B)
    return tl.reshape(t, (BLOCK_N, 32 * R // WB))


@triton.jit
def _x_operand(x_ptr, offs_m, stride_xm, M, K, k0, c, WB: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_F32: tl.constexpr):
    """x'[m, k] = x[m, k0 + k]·c_m·2^(24-p(k)) in fp16 (fp32 when DOT_F32), p the bit of code k's field in
    its (possibly shifted) word, and Σ_k x[m, k0 + k] over the tile."""
    HALF: tl.constexpr = 16 // WB
    SH: tl.constexpr = 8 if WB == 4 else 10
    kk = tl.arange(0, BLOCK_K)
    pos = (kk % HALF) * WB
    p = tl.where(pos + WB <= 10, pos, pos - SH)
    pw = ((151 - p) << 23).to(tl.float32, bitcast=True)  # 2^(24 - p)
    k = k0 + kk
    xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                 mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0).to(tl.float32)
    xs = tl.sum(xv, axis=1)
    xq = (xv * c[:, None] * pw[None, :]).to(tl.float16)
    if DOT_F32:
        xq = xq.to(tl.float32)
    return xq, xs


@triton.jit
def _dot(xq, wf, DOT_F32: tl.constexpr, SWAP: tl.constexpr):
    """x' [BLOCK_M, BLOCK_K] · wf[BLOCK_N, BLOCK_K]ᵀ; SWAP returns the transposed product (weight as A)."""
    if DOT_F32:
        wf = wf.to(tl.float32)
    if SWAP:
        if DOT_F32:
            return tl.dot(wf, tl.trans(xq), input_precision="ieee")
        else:
            return tl.dot(wf, tl.trans(xq))
    else:
        if DOT_F32:
            return tl.dot(xq, tl.trans(wf), input_precision="ieee")
        else:
            return tl.dot(xq, tl.trans(wf))


@triton.jit
def _fold(acc, t, col, SWAP: tl.constexpr):
    """acc += t · col, col [BLOCK_N] per output column (acc, t: [BLOCK_M, BLOCK_N], or transposed with SWAP)."""
    if SWAP:
        return acc + t * col[:, None]
    else:
        return acc + t * col[None, :]


@triton.jit
def _outer(row, col, SWAP: tl.constexpr):
    """row [BLOCK_M] ⊗ col [BLOCK_N] in the accumulator's orientation."""
    if SWAP:
        return col[:, None] * row[None, :]
    else:
        return row[:, None] * col[None, :]


@triton.jit
def _row_scale(x_ptr, offs_m, stride_xm, M, k_lo, k_hi, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """Per row: c = 2^(-10-e) with e the exponent of max |x| over [k_lo, k_hi), and 1/c (powers of two)."""
    mx = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(k_lo, k_hi, CHUNK):
        kk = c0 + tl.arange(0, CHUNK)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                     mask=(offs_m[:, None] < M) & (kk[None, :] < k_hi), other=0).to(tl.float32)
        mx = tl.maximum(mx, tl.max(tl.abs(xv), axis=1))
    eb = tl.minimum(tl.maximum((mx.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15), 240)  # c·2^24 stays finite
    c = ((244 - eb) << 23).to(tl.float32, bitcast=True)
    inv = ((eb + 10) << 23).to(tl.float32, bitcast=True)
    return c, inv


@triton.jit
def _load_words(q_ptr, row0, R: tl.constexpr, RMAX, offs_n, N):
    """Word rows row0 .. row0 + R of every column as uint32 [BLOCK_N, R]."""
    rows = row0 + tl.arange(0, R)
    w = tl.load(q_ptr + rows[None, :] * N + offs_n[:, None], mask=(rows[None, :] < RMAX) & (offs_n[:, None] < N),
                other=0)
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def _gemm_h2_kernel(x_ptr, q0_ptr, q1_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                    M, N, K, R0, R1, stride_xm, stride_om, M_BUCKET, ONE,
                    GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr = False, SWAP: tl.constexpr = True,
                    CHUNK: tl.constexpr = 128, PPS: tl.constexpr = 4):
    """Grid (cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N), SPLIT_K). BLOCK_K (a multiple of 32) divides the group size."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    t0, t1 = _split_range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K)
    c, inv = _row_scale(x_ptr, offs_m, stride_xm, M, t0 * BLOCK_K, tl.minimum(t1 * BLOCK_K, K), BLOCK_M, CHUNK)
    WB0: tl.constexpr = 2 if BITS == 3 else BITS
    R: tl.constexpr = BLOCK_K * WB0 // 32
    R1T: tl.constexpr = BLOCK_K // 32
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        g = k0 // GS if GS > 0 else 0
        w = _load_words(q0_ptr, t * R, R, R0, offs_n, N)
        xq, xs = _x_operand(x_ptr, offs_m, stride_xm, M, K, k0, c, WB0, BLOCK_K, DOT_F32)
        xs = xs * c
        if BITS == 3:
            v = _load_words(q1_ptr, t * R1T, R1T, R1, offs_n, N)
            xq1, _xs1 = _x_operand(x_ptr, offs_m, stride_xm, M, K, k0, c, 1, BLOCK_K, DOT_F32)
        if FMT == 0:
            s = tl.load(s_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
            else:
                z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
            tq = _dot(xq, _operand(w, WB0, WB0, 0, R, BLOCK_N), DOT_F32, SWAP)
            if BITS == 3:
                tq += 4.0 * _dot(xq1, _operand(v, 1, 1, 0, R1T, BLOCK_N), DOT_F32, SWAP)
            acc = _fold(acc, tq, s, SWAP)
            acc -= _outer(xs, s * z, SWAP)
        else:
            sp = s_ptr + g * (BITS * N) + offs_n
            off = tl.load(z_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
            s0 = tl.load(sp, mask=nm, other=0).to(tl.float32)
            s1 = tl.load(sp + N, mask=nm, other=0).to(tl.float32)
            acc = _fold(acc, _dot(xq, _operand(w, WB0, 1, 0, R, BLOCK_N), DOT_F32, SWAP), s0, SWAP)
            acc = _fold(acc, _dot(xq, _operand(w, WB0, 1, 1, R, BLOCK_N), DOT_F32, SWAP), 0.5 * s1, SWAP)
            if BITS == 4:
                s2 = tl.load(sp + 2 * N, mask=nm, other=0).to(tl.float32)
                s3 = tl.load(sp + 3 * N, mask=nm, other=0).to(tl.float32)
                acc = _fold(acc, _dot(xq, _operand(w, WB0, 1, 2, R, BLOCK_N), DOT_F32, SWAP), 0.25 * s2, SWAP)
                acc = _fold(acc, _dot(xq, _operand(w, WB0, 1, 3, R, BLOCK_N), DOT_F32, SWAP), 0.125 * s3, SWAP)
            if BITS == 3:
                s2 = tl.load(sp + 2 * N, mask=nm, other=0).to(tl.float32)
                acc = _fold(acc, _dot(xq1, _operand(v, 1, 1, 0, R1T, BLOCK_N), DOT_F32, SWAP), s2, SWAP)
            acc += _outer(xs, off, SWAP)
    if SWAP:
        acc = tl.trans(acc) * inv[:, None]
    else:
        acc = acc * inv[:, None]
    _store_out(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, pid, HAS_BIAS,
               SPLIT_K)


def _c(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


GEMM_H2_CONFIGS = [
    _c(4, 2, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, PPS=4),
    _c(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, PPS=8),
    _c(4, 2, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, PPS=8),
    _c(8, 2, BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, PPS=4),
    _c(4, 2, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, PPS=4),
]


def _h2_split(a):
    tiles = triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(a["N"], a["BLOCK_N"])
    return _split_k(tiles, triton.cdiv(a["K"], a["BLOCK_K"]), a.get("PPS", 4) * NUM_SMS[0], 64)


gemm_h2_tuned = triton.autotune(GEMM_H2_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_bk},
                                **_CACHE_KW)(triton.heuristics({"SPLIT_K": _h2_split})(_gemm_h2_kernel))
