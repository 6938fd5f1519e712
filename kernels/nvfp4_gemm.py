"""Triton kernels for ARCQuant (NVFP4 + augmented residual channels) on GPUs without FP4 tensor cores.

Torch reference of the same math: `nvfp4_reference.py` (the GEMM; activation quantization: its re-export of
`quantkit/arc_numerics.py`, bit-exact). Numerics of NVFP4: `quantkit/formats/nvfp4.py`. Launch sizes and
autotuning tables: `nvfp4_tuning.py`; which path serves a call (by M, by shape): `nvfp4_dispatch.py`.

- `_amax_kernel`     partial max |x| over a slice of x per program → `part` [P] (fp32). The tensor scale
                     S = max(part)/2688 is then reduced by every program of the next kernel (P ≤ 256 floats
                     from L2: no atomics, no memset, deterministic). For small inputs (M·K ≤ 2^14) this
                     launch is skipped and each program of the activation kernel reduces all of x itself.
- `_arc_act_kernel`  one pass over x: gather the reordered channels, NVFP4-quantize the row's blocks,
                     recompute Q1 on the last s channels and quantize their residual (own block scales,
                     same S), pack → X' codes uint8 [M, K'/2], block scales (e4m3 bits) [M, K'/16], S [1].
                     Optionally (`WRITE_DEQ`) it writes the dequantized X' in bf16 [M, K'] instead — the
                     operand of the large-M "decode + cuBLAS" path — with S folded in: bf16((e2m1·e4m3)·S),
                     i.e. exactly the bf16 fake-quantized activation.
                     Bit-exact with the torch reference: the per-block divisions are `div_rn`, the
                     per-element x / (block scale · S) is a correctly rounded reciprocal per block + FMA
                     corrections (= `div_rn`, see `_quant_blocks`), e4m3 rounding is done in integer
                     arithmetic, and the kernel is compiled with `enable_fp_fusion=False` (an FMA in
                     x − deq would change the residual's last bit).
- `_nvfp4_mm_kernel` Y[M, N] = Sx·Sw · Σ_k X'[m, k]·W'[n, k]. Hopper has no FP4 MMA: both operands are
                     decoded in registers to fp16 as e2m1·e4m3·2^-7 (≤ 6 significant bits, multiples of
                     2^-17 below 21: exact as fp16 normals or subnormals; _E2M1X4_ASM), `tl.dot` in fp16
                     with fp32 accumulation, S and 2^14 in the epilogue. Small M: BLOCK_M = 16, optionally
                     transposed (SWAP: acc^T = W'·X'^T), with split-K (one launch: the shared workspace +
                     last-program epilogue, `triton_common.store_out`). Large M: plain tiles with grouped ordering.
- `_nvfp4_gemv_kernel` decode path (M ≤ GEMV_MAX_M): CUDA cores, W' read as int64 NVFP4 blocks in
                     [BLOCK_N, NB] tiles (vector loads), up to GEMV_ROWS_MAX rows of X' per program (each
                     weight block decoded once); each block's 16 products summed exactly on packed
                     registers — by default PRMT table lookups to int8 (e2m1 ×2 is an integer ≤ 12) and
                     dp4a, or HFMA2 on fp16 pairs (DOT="f16"; the autotuner tries both) — then scaled once by
                     the two block scales in fp32; split-K with ordered partials (`triton_common.finish_tile`).
- `_nvfp4_decode_kernel` W' → bf16 [N, K'] (e2m1·e4m3, no S) for the "decode + cuBLAS" path:
                     y = addmm(X'_bf16, W'_bf16ᵀ, alpha = Sw) (Sw is a static host float).

Tiles are decoded as even and odd halves (the two nibbles of a byte) and the dot is taken over each half
(Σ_k x_k w_k = Σ_j x_2j w_2j + x_2j+1 w_2j+1), so no tile is interleaved or reshaped in registers.
Decoding without lookup tables: an e2m1 code c (sign bit 3) becomes the fp16 bit pattern
((c & 7) << 9) | ((c & 8) << 12) = value·2^-14 (code 1 is an fp16 subnormal; the fp16 → fp32 conversion is
exact), an e4m3 byte u becomes the fp16 pattern (u & 0x7F) << 7 = value·2^-8; the block's 2^22 is folded into
its scale once, so an element costs a few integer ops, one conversion and one multiply.

`tl.dot_scaled` is not used: Hopper has no native FP4 MMA (Triton emulates it by upcasting), and its
microscaling operands take e8m0 scales per 32 elements, not NVFP4's e4m3 per 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantkit.kernels.nvfp4_dispatch import activation_by_reference, gemm_path, linear_path
from quantkit.kernels.nvfp4_reference import arc_quantize_activation_ref
from quantkit.kernels.nvfp4_tuning import (
    AMAX_BLOCK,
    AMAX_PARTS,
    AMAX_WARPS,
    AUTOTUNE_KEY,
    FUSED_AMAX_MAX,
    GEMV_CONFIGS,
    GEMV_SPLIT_MAX,
    MM_LARGE_CONFIGS,
    MM_SMALL_CONFIGS,
    MM_SMALL_MAX_M,
    act_block_k,
    gemv_rows,
    gemv_split,
    mm_split,
)
from quantkit.kernels.triton_common import (
    AUTOTUNE_CACHE_KW,
    finish_tile,
    grouped_tile,
    interpreting,
    pow2,
    set_sms,
    split_range,
    store_out,
    workspace,
)

# ----------------------------------------------------------------------------------------------------------
# element helpers (shared by the kernels; the torch reference is quantkit/formats/nvfp4.py)


@triton.jit
def _round_e4m3(v):
    """v float32 ≥ 0, finite → (nearest e4m3 value as float32 (RNE, saturating at 448), its uint8 bits)."""
    v = tl.minimum(v, 448.0)
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # binade (subnormals share the 2^-6 binade's quantum)
    q = ((e + 124) << 23).to(tl.float32, bitcast=True)  # quantum 2^(e-3)
    t = v / q  # exact: division by a power of two
    t = (t + 8388608.0) - 8388608.0  # round to nearest even integer (t < 16)
    r = t * q
    rb = r.to(tl.int32, bitcast=True)
    er = ((rb >> 23) & 0xFF) - 127
    normal = ((er + 7) << 3) | ((rb >> 20) & 7)
    sub = (r * 512.0).to(tl.int32)
    byte = tl.where(er >= -6, normal, sub)
    return r, byte.to(tl.uint8)


@triton.jit
def _e2m1_code(u):
    """float32 (already divided by the scale) → int32 e2m1 code, RNE ties to even code, saturating at ±6."""
    a = tl.abs(u)
    mag = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    mag += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return tl.where((u < 0) & (mag > 0), mag + 8, mag)


@triton.jit
def _e2m1_value(code):
    """int32 code → float32 value (exact)."""
    mag = code & 7
    v = tl.where(mag < 4, mag.to(tl.float32) * 0.5, tl.where(mag == 7, 6.0, (mag - 2).to(tl.float32)))
    return tl.where(code >= 8, -v, v)


FAST_DIV_MIN_S: tl.constexpr = tl.constexpr(2.0**-90)


@triton.jit
def _quant_blocks(v, S):
    """v float32 [NB, 16] (one NVFP4 block per row), S scalar → (block scale float32 [NB] (e4m3 value),
    its e4m3 bits uint8 [NB], codes int32 [NB, 16])."""
    amax = tl.max(tl.abs(v), axis=1)
    bs, bits = _round_e4m3(tl.math.div_rn(tl.math.div_rn(amax, 6.0), S))
    denom = bs * S
    safe = tl.where(denom > 0, denom, 1.0)
    if S >= FAST_DIV_MIN_S:
        # RN(v / d) from one correctly rounded reciprocal y = RN(1/d) per block. q0 = RN(v·y) can be up to
        # 1.5 ulp off (y's and the product's rounding adding up), outside Markstein's hypothesis; one
        # correction q1 = RN(q0 + r0·y) (r0 = v − q0·d, exact in an FMA) brings it within an ulp, and then
        # Markstein's theorem gives RN(q1 + r1·y) = RN(v/d). On an H200, 2^31 random quotients in the domain
        # that decides codes (|v/d| in [2^-3, 16), d ≥ 2^-99) matched the IEEE division bit for bit with one
        # correction and with two (experiments/probe_arc_act.py); the second is kept for the proof. No underflow:
        # d ≥ 2^-9·S, so the residuals of every v that can round to a nonzero code are normal. Replaces an
        # IEEE division per element (~15 instructions and a slow-path branch).
        d = safe[:, None]
        y = tl.math.div_rn(1.0, safe)[:, None]
        q = v * y
        q = tl.fma(tl.fma(-q, d, v), y, q)
        q = tl.fma(tl.fma(-q, d, v), y, q)
    else:  # pathologically small tensors: the IEEE division
        q = tl.math.div_rn(v, safe[:, None])
    u = tl.where(denom[:, None] > 0, q, 0.0)
    return bs, bits, _e2m1_code(u)


@triton.jit
def _pack_pairs(codes, NB: tl.constexpr):
    """int32 codes [NB, 16] → uint8 [NB·8]: element 2j in the low nibble of byte j."""
    lo, hi = tl.split(tl.reshape(codes, (NB * 8, 2)))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def _tensor_scale(x_ptr, part_ptr, P, MK, FUSED: tl.constexpr, PBLOCK: tl.constexpr):
    """S = amax/2688 (1.0 when amax = 0) from the partials, or from all of x (x contiguous) when FUSED."""
    if FUSED:
        acc = tl.zeros((PBLOCK,), tl.float32)
        for i in range(0, MK, PBLOCK):
            offs = i + tl.arange(0, PBLOCK)
            acc = tl.maximum(acc, tl.abs(tl.load(x_ptr + offs, mask=offs < MK, other=0).to(tl.float32)))
        amax = tl.max(acc, axis=0)
    else:
        offs = tl.arange(0, PBLOCK)
        amax = tl.max(tl.load(part_ptr + offs, mask=offs < P, other=0), axis=0)
    return tl.where(amax > 0, tl.math.div_rn(amax, 2688.0), 1.0)


# ----------------------------------------------------------------------------------------------------------
# activation kernels


@triton.jit
def _amax_kernel(x_ptr, part_ptr, MK, PER_PROG, BLOCK: tl.constexpr):
    """part[pid] = max |x| over flat elements [pid·PER_PROG, (pid+1)·PER_PROG) of a contiguous x."""
    pid = tl.program_id(0)
    start = pid * PER_PROG
    end = tl.minimum(start + PER_PROG, MK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, tl.abs(tl.load(x_ptr + offs, mask=offs < end, other=0).to(tl.float32)))
    tl.store(part_ptr + pid, tl.max(acc, axis=0))


@triton.jit
def _arc_act_kernel(x_ptr, ridx_ptr, part_ptr, q_ptr, bs_ptr, s_ptr, xd_ptr, M, K, KP, SRES, P, N_MAIN,
                    BLOCK_K: tl.constexpr, FUSED: tl.constexpr, ALIGNED: tl.constexpr,
                    WRITE_PACKED: tl.constexpr, WRITE_DEQ: tl.constexpr, PBLOCK: tl.constexpr):
    """Grid (N_MAIN + cdiv(SRES, BLOCK_K), M). x: [M, K] contiguous; ridx: int32 [K]; X' has KQ = KP + SRES
    columns: q [M, KQ/2] uint8, bs [M, KQ/16] uint8 (e4m3 bits), s [1] fp32; xd [M, KQ] bf16 (WRITE_DEQ).
    Programs with chunk < N_MAIN quantize columns [chunk·BLOCK_K, +BLOCK_K) of Q1; the rest quantize the
    residual of the last SRES channels. ALIGNED: K % 16 == 0 (residual blocks coincide with Q1's)."""
    chunk = tl.program_id(0)
    m = tl.program_id(1)
    NB: tl.constexpr = BLOCK_K // 16
    KQ = KP + SRES
    xrow = x_ptr + m.to(tl.int64) * K
    rb = tl.arange(0, NB)[:, None]
    ri = tl.arange(0, 16)[None, :]
    if chunk < N_MAIN:
        c0 = chunk * BLOCK_K
        c = c0 + rb * 16 + ri  # [NB, 16] Q1 columns
        ok = c < K
        idx = tl.load(ridx_ptr + c, mask=ok, other=0)
        v = tl.load(xrow + idx, mask=ok, other=0).to(tl.float32)
        # S after the gather: its reduction synchronizes the program, so loads issued first overlap with it
        S = _tensor_scale(x_ptr, part_ptr, P, M * K, FUSED, PBLOCK)
        bs, bits, codes = _quant_blocks(v, S)
        out0 = c0  # X' column of this tile's first element
        lim = KP
    else:
        j0 = (chunk - N_MAIN) * BLOCK_K
        j = j0 + rb * 16 + ri  # [NB, 16] residual index, X' column KP + j, channel K - SRES + j
        okj = j < SRES
        c = K - SRES + j
        idx = tl.load(ridx_ptr + c, mask=okj, other=0)
        xv = tl.load(xrow + idx, mask=okj, other=0).to(tl.float32)
        S = _tensor_scale(x_ptr, part_ptr, P, M * K, FUSED, PBLOCK)
        if ALIGNED:
            bs1, _b1, c1 = _quant_blocks(xv, S)
            deq = (_e2m1_value(c1) * bs1[:, None]) * S
        else:  # Q1's block of each element: a [NB, 16, 16] tile of 16 gathered values per element
            cb = (c // 16 * 16)[:, :, None] + tl.arange(0, 16)[None, None, :]
            okb = (cb < K) & okj[:, :, None]
            blk = tl.load(xrow + tl.load(ridx_ptr + cb, mask=okb, other=0), mask=okb, other=0).to(tl.float32)
            amax = tl.max(tl.abs(blk), axis=2)
            bs1, _b1 = _round_e4m3(tl.math.div_rn(tl.math.div_rn(amax, 6.0), S))
            den = bs1 * S
            u = tl.where(den > 0, tl.math.div_rn(xv, tl.where(den > 0, den, 1.0)), 0.0)
            deq = (_e2m1_value(_e2m1_code(u)) * bs1) * S
        r = tl.where(okj, xv - deq, 0.0)
        bs, bits, codes = _quant_blocks(r, S)
        out0 = KP + j0
        lim = KQ
    if (chunk == 0) & (m == 0):
        tl.store(s_ptr, S)
    if WRITE_PACKED:
        pb = out0 // 2 + tl.arange(0, BLOCK_K // 2)
        tl.store(q_ptr + m.to(tl.int64) * (KQ // 2) + pb, _pack_pairs(codes, NB), mask=pb < lim // 2)
        sb = out0 // 16 + tl.arange(0, NB)
        tl.store(bs_ptr + m.to(tl.int64) * (KQ // 16) + sb, bits, mask=sb < lim // 16)
    if WRITE_DEQ:
        d = (_e2m1_value(codes) * bs[:, None]) * S
        col = out0 + rb * 16 + ri
        tl.store(xd_ptr + m.to(tl.int64) * KQ + col, d.to(xd_ptr.dtype.element_ty), mask=col < lim)


# ----------------------------------------------------------------------------------------------------------
# GEMM


@triton.jit
def _e2m1_f32(c, SHIFT: tl.constexpr):
    """The e2m1 code at bits [SHIFT, SHIFT+4) of int32 c → float32 value · 2^-14 (via fp16 bits: exact)."""
    if SHIFT == 0:
        h = ((c & 7) << 9) | ((c & 8) << 12)
    else:
        h = ((c & 0x70) << 5) | ((c & 0x80) << 8)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_f32(u):
    """e4m3 bits (int32) → float32 value · 2^14 (via fp16 bits: exact)."""
    return ((u & 0x7F) << 7).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 4194304.0


@triton.jit
def _decode_tile(q_ptr, s_ptr, rows, R, kb0, KQ, BLOCK_R: tl.constexpr, BLOCK_KB: tl.constexpr):
    """Rows `rows` [BLOCK_R] × bytes [kb0, kb0 + BLOCK_KB) of a packed NVFP4 matrix (q uint8 [R, KQ/2], s e4m3
    bits [R, KQ/16]) → (even, odd) float32 [BLOCK_R, BLOCK_KB] each: e2m1 · e4m3 of columns 2j and 2j+1
    (no tensor scale; exact). The scale of byte j is loaded per byte (index j // 8, cached), so no tile is
    ever interleaved or reshaped."""
    rmask = rows[:, None] < R
    pc = kb0 + tl.arange(0, BLOCK_KB)
    ok = rmask & (pc[None, :] < KQ // 2)
    r64 = rows[:, None].to(tl.int64)
    b = tl.load(q_ptr + r64 * (KQ // 2) + pc[None, :], mask=ok, other=0).to(tl.int32)
    sc = _scale_f32(tl.load(s_ptr + r64 * (KQ // 16) + (pc // 8)[None, :], mask=ok, other=0).to(tl.int32))
    return _e2m1_f32(b, 0) * sc, _e2m1_f32(b, 4) * sc


@triton.jit
def _load_blocks(q_ptr, s_ptr, rows, R, blk0, KQ, NB: tl.constexpr):
    """Rows `rows` × NVFP4 blocks [blk0, blk0 + NB) of a packed matrix (q uint8 [R, KQ/2], s e4m3 bits
    [R, KQ/16]) → (code bytes uint8 [BLOCK_R, NB, 8], block scale · 2^14 float32 [BLOCK_R, NB]); zeros past
    the edges."""
    r64 = rows[:, None].to(tl.int64)
    bk = blk0 + tl.arange(0, NB)[None, :]
    ok2 = (rows[:, None] < R) & (bk < KQ // 16)
    sc = _scale_f32(tl.load(s_ptr + r64 * (KQ // 16) + bk, mask=ok2, other=0).to(tl.int32))
    pc = bk[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    return tl.load(q_ptr + r64[:, :, None] * (KQ // 2) + pc, mask=ok2[:, :, None], other=0), sc


# e2m1 pairs → fp16 in packed registers (one asm instance = 4 bytes = 4 even + 4 odd elements, all of one
# NVFP4 block): PRMT moves byte i to the high byte of a 16-bit lane, so an odd (high) nibble already has its
# sign on fp16 bit 15 and its exponent/mantissa bits shift down 3 onto bits 11..9; an even nibble shifts up 1
# (bits) and 4 (sign). Read as fp16 that is value·2^-14 (code 1 = 0.5 an fp16 subnormal). One HMUL2 with the
# block scale·2^7 gives value·scale·2^-7 exactly (≤ 6 significant bits, in [2^-17, 21]: multiples of 2^-17,
# so exact as fp16 normals or subnormals). ~2.5 instructions per element instead of ~8 in fp32.
def _f16_word(src: str, o: tuple[str, str, str, str]) -> str:
    """PTX: the 8 codes of word `src` → fp16 pairs (value·2^-14) (e0,e2) (e1,e3) (e4,e6) (e5,e7) in `o`."""
    return (f" prmt.b32 t0, {src}, z, 0x1404; prmt.b32 t1, {src}, z, 0x3424;"
            f" shl.b32 a, t0, 1; and.b32 a, a, 0x0E000E00; shl.b32 b, t0, 4; and.b32 b, b, 0x80008000;"
            f" or.b32 {o[0]}, a, b; shr.b32 a, t0, 3; and.b32 a, a, 0x0E000E00; and.b32 b, t0, 0x80008000;"
            f" or.b32 {o[1]}, a, b; shl.b32 a, t1, 1; and.b32 a, a, 0x0E000E00; shl.b32 b, t1, 4;"
            f" and.b32 b, b, 0x80008000; or.b32 {o[2]}, a, b; shr.b32 a, t1, 3; and.b32 a, a, 0x0E000E00;"
            f" and.b32 b, t1, 0x80008000; or.b32 {o[3]}, a, b;")


_E2M1X4_ASM: tl.constexpr = tl.constexpr(  # 4 bytes (pack=4) + their block scales·2^7 (fp16, two per register)
    "{ .reg .b32 z, t0, t1, a, b, p0, p1, p2, p3; mov.b32 z, 0;" + _f16_word("$4", ("p0", "p1", "p2", "p3"))
    + " mul.rn.f16x2 $0, p0, $5; mul.rn.f16x2 $1, p2, $6; mul.rn.f16x2 $2, p1, $5; mul.rn.f16x2 $3, p3, $6; }")


@triton.jit
def _decode_tile_h(q_ptr, s_ptr, rows, R, blk0, KQ, BLOCK_R: tl.constexpr, NB: tl.constexpr,
                   USE_ASM: tl.constexpr):
    """Rows `rows` [BLOCK_R] × NVFP4 blocks [blk0, blk0 + NB) of a packed matrix → (even, odd) [BLOCK_R, NB·8]
    of e2m1·e4m3·2^-7 (columns 2j and 2j+1; no tensor scale): fp16 from packed-register asm (USE_ASM), or the
    same values in float32 (Triton's interpreter, which runs no PTX)."""
    b, sc = _load_blocks(q_ptr, s_ptr, rows, R, blk0, KQ, NB)
    sc = sc * 0.0078125  # scale · 2^7
    if USE_ASM:
        s3 = tl.broadcast_to(sc.to(tl.float16)[:, :, None], (BLOCK_R, NB, 8))
        ev, od = tl.inline_asm_elementwise(_E2M1X4_ASM, "=r,=r,=r,=r,r,r,r", [b, s3],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        bi = b.to(tl.int32)
        ev = _e2m1_f32(bi, 0) * sc[:, :, None]
        od = _e2m1_f32(bi, 4) * sc[:, :, None]
    return tl.reshape(ev, (BLOCK_R, NB * 8)), tl.reshape(od, (BLOCK_R, NB * 8))


@triton.jit
def _nvfp4_mm_kernel(xq_ptr, xs_ptr, wq_ptr, ws_ptr, sx_ptr, sw, bias_ptr, out_ptr, acc_ptr, cnt_ptr,
                     M, N, KQ, stride_om, M_BUCKET,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
                     SWAP: tl.constexpr = False, DOT_F32: tl.constexpr = False, PPS: tl.constexpr = 4,
                     USE_ASM: tl.constexpr = False):
    """Grid (cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N), SPLIT_K). out [M, N] = Sx·sw·X'·W'ᵀ (+ bias).
    DOT_F32: the product on fp32 copies of the same (bf16-exact) operands (Triton's CPU interpreter)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t0, t1 = split_range(pid_k, tl.cdiv(KQ, BLOCK_K), SPLIT_K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    NB: tl.constexpr = BLOCK_K // 16
    for t in range(t0, t1):
        xe, xo = _decode_tile_h(xq_ptr, xs_ptr, offs_m, M, t * NB, KQ, BLOCK_M, NB, USE_ASM)
        we, wo = _decode_tile_h(wq_ptr, ws_ptr, offs_n, N, t * NB, KQ, BLOCK_N, NB, USE_ASM)
        if DOT_F32:
            if SWAP:
                acc = tl.dot(we, tl.trans(xe), acc, input_precision="ieee")
                acc = tl.dot(wo, tl.trans(xo), acc, input_precision="ieee")
            else:
                acc = tl.dot(xe, tl.trans(we), acc, input_precision="ieee")
                acc = tl.dot(xo, tl.trans(wo), acc, input_precision="ieee")
        else:
            if SWAP:
                acc = tl.dot(we.to(tl.float16), tl.trans(xe.to(tl.float16)), acc)
                acc = tl.dot(wo.to(tl.float16), tl.trans(xo.to(tl.float16)), acc)
            else:
                acc = tl.dot(xe.to(tl.float16), tl.trans(we.to(tl.float16)), acc)
                acc = tl.dot(xo.to(tl.float16), tl.trans(wo.to(tl.float16)), acc)
    if SWAP:
        acc = tl.trans(acc)
    acc = acc * (tl.load(sx_ptr) * sw * 16384.0)  # operands carry 2^-7 each
    store_out(acc, out_ptr, acc_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, pid, HAS_BIAS,
               SPLIT_K)


# The decode GEMV's inner product, on packed registers: one NVFP4 block (16 e2m1 codes, 8 bytes, even element
# in the low nibble) of W' against the same block of X', summed exactly; the two block scales then multiply
# the block sum once, in fp32. Two variants (DOT):
#
# "i8" (default): e2m1 values ×2 are the integers {0,1,2,3,4,6,8,12}. PRMT looks bytes up in an 8-byte pool,
#   four per instruction, with a selector of four nibbles: a word's codes masked to their magnitudes (& 0x7777,
#   the low and the high 16 bits) index a pool of the positive and one of the negated values, and a third PRMT
#   in sign-replicate mode turns the four sign bits into 0x00/0xFF byte masks that pick (LOP3) between them —
#   four int8 in element order. One `dp4a.s32.s32` multiplies them with four int8 activations (decoded the
#   same way, once per thread); 16 products of ≤ 144 sum exactly in int32 (= 4·Σ w·x). ~14 integer
#   instructions per 8 elements.
# "f16": PRMT puts (b0, b1), (b2, b3) in the high bytes of 16-bit lanes; shifts and masks make the fp16 pairs
#   (value·2^-14, unscaled) (e0, e2), (e1, e3), (e4, e6), (e5, e7) (as in _E2M1X4_ASM), multiplied with the
#   activation pairs (true values) by HFMA2: a half-lane adds 8 products |w·x|·2^-14 ≤ 36·2^-14 on the grid
#   2^-16, below 2^-5 where the fp16 quantum is 2^-16 — exact (fp16 subnormals are kept: no .ftz). ~20
#   instructions per 8 elements plus two conversions per block.
_I8_LUT = (" mov.b32 lp0, 0x03020100; mov.b32 lp1, 0x0C080604; mov.b32 ln0, 0xFDFEFF00; mov.b32 ln1, 0xF4F8FAFC;")


def _i8_word(src: str, o0: str, o1: str) -> str:
    """PTX: the 8 codes of word `src` → int8×4 words o0 (elements 0-3) and o1 (4-7), values ×2."""
    return (f" shl.b32 w4, {src}, 4;"
            f" and.b32 s, {src}, 0x7777; prmt.b32 p, lp0, lp1, s; prmt.b32 n, ln0, ln1, s;"
            f" prmt.b32 m, w4, {src}, 0xD9C8; lop3.b32 {o0}, p, n, m, 0xD8;"
            f" shr.b32 s, {src}, 16; and.b32 s, s, 0x7777; prmt.b32 p, lp0, lp1, s; prmt.b32 n, ln0, ln1, s;"
            f" prmt.b32 m, w4, {src}, 0xFBEA; lop3.b32 {o1}, p, n, m, 0xD8;")


_I8_REGS = "{ .reg .b32 lp0, lp1, ln0, ln1, w4, s, p, n, m, lo, hi;"
_I8_BLOCK_ASM: tl.constexpr = tl.constexpr(  # an NVFP4 block (64-bit) → 4 int8×4 words (values ×2)
    _I8_REGS + _I8_LUT + " mov.b64 {lo, hi}, $4;" + _i8_word("lo", "$0", "$1") + _i8_word("hi", "$2", "$3") + " }")
# weight words · activation words → 4·Σ w·x as the fp32 bits of 1.5·2^23 + 4·Σ w·x (the dp4a chain starts from
# those bits, so the int → float conversion is one FADD, not an I2F: |4·Σ w·x| ≤ 2304 < 2^22)
_DOT_I8_ASM: tl.constexpr = tl.constexpr(
    "{ .reg .b32 acc; dp4a.s32.s32 acc, $1, $5, 0x4B400000; dp4a.s32.s32 acc, $2, $6, acc;"
    " dp4a.s32.s32 acc, $3, $7, acc; dp4a.s32.s32 $0, $4, $8, acc; }")


_F16_REGS = "{ .reg .b32 z, t0, t1, a, b, lo, hi, p0, p1, p2, p3, q0, q1, q2, q3; mov.b32 z, 0;"
_PAIRS = ("p0", "p1", "p2", "p3", "q0", "q1", "q2", "q3")
_W_F16_ASM: tl.constexpr = tl.constexpr(  # a weight block → 8 fp16 pairs (value·2^-14)
    _F16_REGS + " mov.b64 {lo, hi}, $8;" + _f16_word("lo", _PAIRS[:4]) + _f16_word("hi", _PAIRS[4:])
    + "".join(f" mov.b32 ${i}, {r};" for i, r in enumerate(_PAIRS)) + " }")
_X_F16_ASM: tl.constexpr = tl.constexpr(  # an activation block → 8 fp16 pairs in true units (×2^14: exact)
    _F16_REGS + " .reg .b32 k; mov.b32 k, 0x74007400; mov.b64 {lo, hi}, $8;"
    + _f16_word("lo", _PAIRS[:4]) + _f16_word("hi", _PAIRS[4:])
    + "".join(f" mul.rn.f16x2 ${i}, {r}, k;" for i, r in enumerate(_PAIRS)) + " }")
_DOT_F16_ASM: tl.constexpr = tl.constexpr(  # weight pairs · activation pairs → fp32 bits of Σ w·x · 2^-14
    "{ .reg .b32 acc; .reg .f16 h0, h1; .reg .f32 f0, f1; mul.rn.f16x2 acc, $1, $9;"
    + "".join(f" fma.rn.f16x2 acc, ${i + 1}, ${i + 9}, acc;" for i in range(1, 8))
    + " mov.b32 {h0, h1}, acc; cvt.f32.f16 f0, h0; cvt.f32.f16 f1, h1; add.f32 f0, f0, f1; mov.b32 $0, f0; }")
# what a block sum carries, per variant (undone once per output)
_I8_UNIT: tl.constexpr = tl.constexpr(4.0)
_F16_UNIT: tl.constexpr = tl.constexpr(2.0**-14)


@triton.jit
def _scale_f32_lo(u):
    """e4m3 bits (int32) → float32 value · 2^-8 (the fp16 pattern (u & 0x7F) << 7: exact)."""
    return ((u & 0x7F) << 7).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _i8_block(v):
    """int64 NVFP4 blocks → four int32 words of int8 (element order, values ×2)."""
    return tl.inline_asm_elementwise(_I8_BLOCK_ASM, "=r,=r,=r,=r,l", [v], dtype=(tl.int32,) * 4, is_pure=True,
                                     pack=1)


@triton.jit
def _block_dot(w, x, DOT: tl.constexpr, USE_ASM: tl.constexpr):
    """int64 NVFP4 blocks (16 codes) w [1, BN, NB] · x [ROWS, 1, NB] → [ROWS, BN, NB] float32 Σ_i w_i·x_i
    (exact) in the unit of DOT. Each block is decoded once and broadcast (a thread holds all ROWS rows)."""
    if USE_ASM:
        if DOT == "i8":
            v0, v1, v2, v3 = _i8_block(w)
            x0, x1, x2, x3 = _i8_block(x)
            d = tl.inline_asm_elementwise(_DOT_I8_ASM, "=r,r,r,r,r,r,r,r,r", [v0, v1, v2, v3, x0, x1, x2, x3],
                                          dtype=tl.int32, is_pure=True, pack=1)
            return d.to(tl.float32, bitcast=True) - 12582912.0
        else:
            p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
                _W_F16_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,l", [w], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
            x0, x1, x2, x3, x4, x5, x6, x7 = tl.inline_asm_elementwise(
                _X_F16_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,l", [x], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
            d = tl.inline_asm_elementwise(_DOT_F16_ASM, "=r" + ",r" * 16,
                                          [p0, p1, p2, p3, p4, p5, p6, p7, x0, x1, x2, x3, x4, x5, x6, x7],
                                          dtype=tl.int32, is_pure=True, pack=1)
            return d.to(tl.float32, bitcast=True)
    else:  # Triton's interpreter runs no PTX: the same exact sum in fp32
        d = _e2m1_f32((w & 15).to(tl.int32), 0) * _e2m1_f32((x & 15).to(tl.int32), 0)
        for i in tl.static_range(1, 16):
            d += _e2m1_f32(((w >> (4 * i)) & 15).to(tl.int32), 0) * _e2m1_f32(((x >> (4 * i)) & 15).to(tl.int32), 0)
        if DOT == "i8":
            return d * (4.0 * 16384.0 * 16384.0)
        else:
            return d * 16384.0


@triton.jit
def _gemv_step(acc, x_rows, xs_rows, w_rows, s_rows, mmask, nmask, t, j, KB, NB: tl.constexpr,
               MASK_K: tl.constexpr, DOT: tl.constexpr, USE_ASM: tl.constexpr):
    if MASK_K:
        ok = (t * NB + j) < KB
        xb = tl.load(x_rows + t * NB, mask=mmask & ok, other=0)
        xs = tl.load(xs_rows + t * NB, mask=mmask & ok, other=0)
        wb = tl.load(w_rows + t * NB, mask=nmask & ok, other=0)
        ws = tl.load(s_rows + t * NB, mask=nmask & ok, other=0)
    else:
        xb = tl.load(x_rows + t * NB, mask=mmask, other=0)
        xs = tl.load(xs_rows + t * NB, mask=mmask, other=0)
        wb = tl.load(w_rows + t * NB, mask=nmask, other=0)
        ws = tl.load(s_rows + t * NB, mask=nmask, other=0)
    sc = _scale_f32_lo(ws.to(tl.int32)) * _scale_f32_lo(xs.to(tl.int32))
    return acc + _block_dot(wb, xb, DOT, USE_ASM) * sc


@triton.jit
def _nvfp4_gemv_kernel(xq_ptr, xs_ptr, wq_ptr, ws_ptr, sx_ptr, sw, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                       M, N, KQ, stride_xb, stride_wb, stride_om, M_BUCKET,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, ROWS: tl.constexpr,
                       SPLIT_K: tl.constexpr, PPS: tl.constexpr = 8, DOT: tl.constexpr = "i8",
                       USE_ASM: tl.constexpr = False):
    """Decode path (small M), CUDA cores. Grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, ROWS)): one program =
    BLOCK_N outputs of ROWS rows over a K slice. xq / wq are int64 views (one NVFP4 block per element;
    strides in blocks); per step NB blocks: the weight tile [1, BLOCK_N, NB] is loaded with vector loads and
    decoded once for the ROWS activation rows [ROWS, 1, NB] (`_block_dot`), each block sum scaled by the
    product of its two block scales (scale tiles have the same shapes: one byte per block). Every tile is
    3-D in one layout (the rows held by each thread), the row sums a shuffle among a row's threads; split-K
    partials reduced in slice order (`triton_common.finish_tile`)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :, None]  # [1, BN, 1]
    offs_m = (pid_m * ROWS + tl.arange(0, ROWS))[:, None, None]  # [ROWS, 1, 1]
    nmask = offs_n < N
    mmask = offs_m < M
    j = tl.arange(0, NB)[None, None, :]  # [1, 1, NB]
    KB = KQ // 16  # blocks per row
    w_rows = wq_ptr + offs_n.to(tl.int64) * stride_wb + j
    s_rows = ws_ptr + offs_n.to(tl.int64) * KB + j
    x_rows = xq_ptr + offs_m.to(tl.int64) * stride_xb + j
    xs_rows = xs_ptr + offs_m.to(tl.int64) * KB + j
    t0, t1 = split_range(pid_k, tl.cdiv(KB, NB), SPLIT_K)
    acc = tl.zeros((ROWS, BLOCK_N, NB), tl.float32)
    full = KB // NB  # whole steps load unmasked along K (a per-block mask would split the vector loads)
    for t in range(t0, tl.minimum(t1, full)):
        acc = _gemv_step(acc, x_rows, xs_rows, w_rows, s_rows, mmask, nmask, t, j, KB, NB, False, DOT, USE_ASM)
    if t1 > full:  # the split holding the ragged last step
        acc = _gemv_step(acc, x_rows, xs_rows, w_rows, s_rows, mmask, nmask, full, j, KB, NB, True, DOT, USE_ASM)
    # block sums carry the DOT unit, the two scales 2^-8 each
    unit: tl.constexpr = 65536.0 / (_I8_UNIT if DOT == "i8" else _F16_UNIT)
    out = tl.sum(acc, axis=2, keep_dims=True) * (tl.load(sx_ptr) * sw * unit)  # [ROWS, BN, 1]
    omask = mmask & nmask
    finish_tile(out, out_ptr + offs_m.to(tl.int64) * stride_om + offs_n, omask, offs_m * N + offs_n,
                 bias_ptr + offs_n, nmask, part_ptr, M * N, pid_k, cnt_ptr + pid_m * tl.num_programs(0) + pid_n,
                 HAS_BIAS, SPLIT_K)


@triton.jit
def _nvfp4_decode_kernel(q_ptr, s_ptr, out_ptr, R, KQ, BLOCK_R: tl.constexpr, BLOCK_KB: tl.constexpr):
    """out [R, KQ] (bf16) = e2m1 · e4m3 of a packed NVFP4 matrix (no tensor scale). Grid (cdiv(R, BLOCK_R),
    cdiv(KQ/2, BLOCK_KB))."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb0 = tl.program_id(1) * BLOCK_KB
    we, wo = _decode_tile(q_ptr, s_ptr, rows, R, kb0, KQ, BLOCK_R, BLOCK_KB)
    w = tl.reshape(tl.join(we, wo), (BLOCK_R, 2 * BLOCK_KB))
    cols = 2 * kb0 + tl.arange(0, 2 * BLOCK_KB)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * KQ + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < R) & (cols[None, :] < KQ))


# ----------------------------------------------------------------------------------------------------------
# autotuned kernels (tables and heuristics: nvfp4_tuning.py; the chosen config is cached per key)


def _tuned(configs):
    return triton.autotune(configs, key=AUTOTUNE_KEY, **AUTOTUNE_CACHE_KW)(triton.heuristics({"SPLIT_K": mm_split})(
        _nvfp4_mm_kernel))


gemv_tuned = triton.autotune(GEMV_CONFIGS, key=AUTOTUNE_KEY, **AUTOTUNE_CACHE_KW)(triton.heuristics(
    {"ROWS": gemv_rows, "SPLIT_K": gemv_split})(_nvfp4_gemv_kernel))
mm_small_tuned = _tuned(MM_SMALL_CONFIGS)
mm_large_tuned = _tuned(MM_LARGE_CONFIGS)


# ----------------------------------------------------------------------------------------------------------
# host side


@dataclass
class ArcWeight:
    """Kernel-ready W' of one ARC linear: q uint8 [N, KQ/2], s e4m3 bits as uint8 [N, KQ/16], sw the weight's
    tensor scale as a host float (static), k = K (in_features), s_res = residual channels, KQ = ceil(K/16)·16
    + s_res."""

    q: torch.Tensor
    s: torch.Tensor
    sw: float
    k: int
    s_res: int

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def kq(self) -> int:
        return self.q.shape[1] * 2


def prepare_arc_weight(packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale, k: int,
                       s_res: int) -> ArcWeight:
    """Stored W' tensors (quantkit.arc_numerics.arc_weight) → ArcWeight (one host sync, at load time)."""
    q = packed.contiguous()
    bs = block_scales.contiguous().view(torch.uint8)
    kq = -(-k // 16) * 16 + s_res
    if q.shape[1] * 2 != kq or bs.shape != (q.shape[0], kq // 16):
        raise ValueError(f"W' shapes {tuple(q.shape)}, {tuple(bs.shape)} do not match K = {k}, s = {s_res}")
    return ArcWeight(q, bs, float(torch.as_tensor(tensor_scale).reshape(-1)[0]), k, s_res)


def arc_quantize_activation_triton(x: torch.Tensor, ridx: torch.Tensor, s_res: int, packed: bool = True,
                                   deq_dtype: torch.dtype | None = None, block_k: int | None = None,
                                   fallback: bool = True):
    """x [M, K] (bf16/fp16/fp32), ridx int32 [K] (the reorder index), s_res residual channels →
    packed=True:  (q uint8 [M, KQ/2], bs float8_e4m3fn [M, KQ/16], S fp32 [1])  (== arc_quantize_activation)
    deq_dtype:    also / instead the dequantized X' [M, KQ] in that dtype, S folded in (returned last).
    No NaN check (the torch reference raises; the kernel does not look).
    fallback: where `nvfp4_dispatch.activation_by_reference` says so (K not a multiple of 16 on a GPU), the
    torch reference serves the call; False: always the kernel."""
    m, k = x.shape
    if fallback and activation_by_reference(k, x.is_cuda):
        return arc_quantize_activation_ref(x, ridx, s_res, packed, deq_dtype)
    x = x.contiguous()
    if block_k is None:
        block_k = act_block_k(m)
    kp = -(-k // 16) * 16
    kq = kp + s_res
    dev = x.device
    s_out = torch.empty(1, dtype=torch.float32, device=dev)
    q = torch.empty(m, kq // 2, dtype=torch.uint8, device=dev) if packed else s_out
    bs = torch.empty(m, kq // 16, dtype=torch.uint8, device=dev) if packed else s_out
    xd = torch.empty(m, kq, dtype=deq_dtype, device=dev) if deq_dtype is not None else x
    fused = m * k <= FUSED_AMAX_MAX
    if fused:  # one load step per program up to M·K = 4096
        part, p, pblock = s_out, 1, min(pow2(m * k), 4096)
    else:
        per = -(-(m * k) // AMAX_PARTS)
        per = -(-per // AMAX_BLOCK) * AMAX_BLOCK
        p = -(-(m * k) // per)
        part = torch.empty(p, dtype=torch.float32, device=dev)
        _amax_kernel[(p,)](x, part, m * k, per, BLOCK=AMAX_BLOCK, num_warps=AMAX_WARPS)
        pblock = pow2(p)
    n_main = triton.cdiv(kp, block_k)
    grid = (n_main + triton.cdiv(s_res, block_k), m)
    _arc_act_kernel[grid](x, ridx, part, q, bs, s_out, xd, m, k, kp, s_res, p, n_main, BLOCK_K=block_k,
                          FUSED=fused, ALIGNED=(k % 16 == 0), WRITE_PACKED=packed,
                          WRITE_DEQ=deq_dtype is not None, PBLOCK=pblock, num_warps=4, enable_fp_fusion=False)
    out = (q, bs.view(torch.float8_e4m3fn), s_out) if packed else (s_out,)
    return (*out, xd) if deq_dtype is not None else out


def _m_bucket(m: int) -> int:  # M as an autotuning key
    return min(pow2(m), 8192)


def nvfp4_mm(xq: torch.Tensor, xs: torch.Tensor, sx: torch.Tensor, w: ArcWeight, bias: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
             path: str | None = None) -> torch.Tensor:
    """Y [M, N] = Sx·Sw·X'·W'ᵀ (+ bias) with X' packed (q uint8 [M, KQ/2], xs e4m3 [M, KQ/16], sx fp32 [1]).
    path: "gemv" (CUDA cores, M ≤ GEMV_MAX_M by default) or "mm" (tl.dot); None = by M, or by `config`.
    config: None = autotuned (GEMV list; tl.dot: small-M list for M ≤ 64, large otherwise); a dict = those
    meta-parameters (BLOCK_N, NB, DOT for the GEMV; BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SWAP for tl.dot)."""
    m = xq.shape[0]
    n, kq = w.n, w.kq
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    set_sms(xq.device)
    if path is None:
        path = gemm_path(m, config)
    gemv = path == "gemv"
    bias_arg = bias if bias is not None else out
    consts = {"HAS_BIAS": bias is not None}
    if gemv:  # codes as int64 blocks; per-slice partials + counters (triton_common.finish_tile)
        xw, ww = xq.view(torch.int64), w.q.view(torch.int64)
        part = torch.empty(GEMV_SPLIT_MAX, m, n, dtype=torch.float32, device=xq.device)
        _, cnt = workspace(xq.device, 1, m * triton.cdiv(n, 16) + 1)
        args = (xw, xs.view(torch.uint8), ww, w.s, sx, w.sw, bias_arg, out, part, cnt,
                m, n, kq, xw.stride(0), ww.stride(0), out.stride(0), _m_bucket(m))
        consts["USE_ASM"] = not interpreting()
    else:  # fp32 dot in the interpreter, packed-register fp16 decode when compiled
        acc, cnt = workspace(xq.device, m * n, m * n // 16 + 1)
        args = (xq, xs.view(torch.uint8), w.q, w.s, sx, w.sw, bias_arg, out, acc, cnt,
                m, n, kq, out.stride(0), _m_bucket(m))
        consts["DOT_F32" if interpreting() else "USE_ASM"] = True

    def grid(a):
        if gemv:
            return (triton.cdiv(n, a["BLOCK_N"]), a["SPLIT_K"], triton.cdiv(m, a["ROWS"]))
        return (triton.cdiv(m, a["BLOCK_M"]) * triton.cdiv(n, a["BLOCK_N"]), a["SPLIT_K"])

    if config is not None:
        meta = dict(config)
        nw, ns = meta.pop("num_warps", 4), meta.pop("num_stages", 1 if gemv else 3)
        split = gemv_split if gemv else mm_split
        if gemv:
            meta.setdefault("ROWS", gemv_rows({"M": m}))
        meta.setdefault("SPLIT_K", split({"M": m, "N": n, "KQ": kq, **meta}))
        if gemv and meta["SPLIT_K"] > GEMV_SPLIT_MAX:
            raise ValueError(f"GEMV SPLIT_K is at most {GEMV_SPLIT_MAX}, got {meta['SPLIT_K']}")
        kern = _nvfp4_gemv_kernel if gemv else _nvfp4_mm_kernel
        kern[grid(meta)](*args, **consts, **meta, num_warps=nw, num_stages=ns)
    elif gemv:
        gemv_tuned[grid](*args, **consts)
    else:
        (mm_small_tuned if m <= MM_SMALL_MAX_M else mm_large_tuned)[grid](*args, **consts)
    return out


def nvfp4_decode(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                 block_r: int = 64, block_kb: int = 128) -> torch.Tensor:
    """Packed [R, KQ/2] + e4m3 scales [R, KQ/16] → [R, KQ] of e2m1·e4m3 in `dtype` (no tensor scale)."""
    r, kq = q.shape[0], q.shape[1] * 2
    out = torch.empty(r, kq, dtype=dtype, device=q.device)
    _nvfp4_decode_kernel[(triton.cdiv(r, block_r), triton.cdiv(kq // 2, block_kb))](
        q, s.view(torch.uint8), out, r, kq, BLOCK_R=block_r, BLOCK_KB=block_kb, num_warps=4)
    return out


def arc_linear(x: torch.Tensor, ridx: torch.Tensor, w: ArcWeight, bias: torch.Tensor | None = None,
               path: str | None = None) -> torch.Tensor:
    """The full ARC linear on a GPU: x [..., K] → y [..., N] in x's dtype.
    path: "fused" (activation kernel → packed X' → NVFP4 GEMM), "dequant" (activation kernel writes bf16 X',
    W' decoded to bf16, cuBLAS addmm with alpha = Sw), None = by M (`nvfp4_dispatch.linear_path`)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if path is None:
        path = linear_path(m)
    if path == "dequant":
        (_sx, xd) = arc_quantize_activation_triton(x2, ridx, w.s_res, packed=False, deq_dtype=torch.bfloat16)
        wd = nvfp4_decode(w.q, w.s, torch.bfloat16)
        if bias is not None:
            y = torch.addmm(bias.to(torch.bfloat16), xd, wd.t(), alpha=w.sw)
        else:  # beta = 0: the (broadcast) input is ignored; Sw is applied by cuBLAS (alpha), no extra pass
            y = torch.addmm(xd.new_zeros(1, 1).expand(m, w.n), xd, wd.t(), beta=0, alpha=w.sw)
        return y.to(x.dtype).reshape(*lead, w.n)
    q, bs, sx = arc_quantize_activation_triton(x2, ridx, w.s_res)
    return nvfp4_mm(q, bs, sx, w, bias, out_dtype=x.dtype).reshape(*lead, w.n)
