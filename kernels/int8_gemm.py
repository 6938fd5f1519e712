"""Triton W{4,6}A{4,6,8} kernels on int8 tensor cores (FlexQ: W6A6/W6A8; COMET: W4A4/A8 mixed blocks).

Torch reference of the same math, and the weight preparation: `int8_reference.py` (read its docstring first).

- `_act_quant_kernel`  x [M, K] bf16/fp16 → qa int8 [M, Kp], a_scale fp32 [M, G], a_sum int32 [M, G]: per
  token and per group of 128 channels, symmetric, bits per group (an int, or an int tensor [G]), optional
  channel gather x[:, perm] in the same pass. Bit-identical to `quantkit.formats.act_int.quantize_act_int`:
  the two divisions are IEEE (`div_rn`), rounding is half-to-even by the (v + 1.5·2^23) − 1.5·2^23 trick.
- `_gemm_kernel`  Y = Σ_g a_scale·w_scale·I_g (+ bias): per 128-block of K, one int8 `tl.dot` of
  [BLOCK_M, 128] × [128, BLOCK_N] into an int32 tile (the weight tile is unpacked in registers from the
  K-contiguous INT6 or INT4-nibble-plane layout by masks and constant shifts into four [BLOCK_N, 32] planes,
  joined along K in registers: unsigned codes, no interleaving), then
      f = bitcast_f32(I + 0x4B400000 − z·a_sum) − 1.5·2^23          (exact int→float for |I| < 2^22: an
                                                                        IADD + FADD instead of a slow I2F)
      acc += f · (a_scale[m] · w_scale[n])
  The zero point (symmetric: the constant 2^(b−1); asymmetric: per (group, column)) is removed from the
  integer sum through the activations' block sums, so the dots run on the raw codes. Small M (decode) uses
  BLOCK_M = 16 and split-K over 128-blocks: each slice writes an fp32 partial tile, the program that finishes
  a tile last (per-tile counter) adds the partials in slice order (deterministic), adds the bias, writes the
  output and resets the counter (one launch, no memset). Large M uses big tiles, SPLIT_K = 1, a grouped tile
  order and pipelined loads (num_stages). (Triton's interpreter truncates fp32 → bf16 instead of rounding
  to nearest even, so interpreted bf16 outputs carry ~2x the rounding error of compiled ones.)
  Compiled, the code planes are unpacked by inline asm on packed 32-bit registers (four codes per
  instruction); the interpreter runs the same masks per uint8 element.
- `_gemv_kernel`  M <= GEMV_MAX_M (decode): CUDA cores, one program per output row and N tile; a word of
  codes masked to four unsigned bytes, one `dp4a.u32.s32` with four int8 activations (exact int32), the same
  per-block epilogue and split-K reduction as `_gemm_kernel` (bit-identical results).

Public entry points (what QuantLinear calls; shapes in the docstrings):
    quantize_act(x, bits, perm=None)                  -> (qa, a_scale, a_sum)
    lowbit_gemm(qa, a_scale, a_sum, w, bias=None, out_dtype=torch.bfloat16, path=None)   -> y [M, N]
    lowbit_linear(x, w, act_bits, perm=None, bias=None)                      -> y [..., N] (x's dtype)
with `w` a `LowbitWeight` from `int8_reference.prepare_int6` / `prepare_int4` (cache it on the module).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.int8_common import MAGIC, MAGIC_F, load_codes
from quantkit.kernels.int8_reference import ACT_GROUP, LowbitWeight
from quantkit.kernels.triton_common import (
    bucket,
    finish_tile,
    grouped_tile,
    interpreting,
    quick_bench,
    split_range,
)

SMALL_M = 16  # M <= SMALL_M: the decode configurations (BLOCK_M = 16, split-K)
SPLIT_MAX = 8
SPLIT_GEMV_MAX = 16
_INTERPRET = interpreting()


# ----------------------------------------------------------------------------------------------------------
# activation quantization


@triton.jit
def _act_quant_kernel(x_ptr, perm_ptr, bits_ptr, q_ptr, s_ptr, qs_ptr, K, G, stride_x, stride_q, stride_s,
                      HAS_PERM: tl.constexpr, BITS: tl.constexpr, GB: tl.constexpr):
    """One program: one row × GB groups of 128 channels. BITS > 0: all groups that width; 0: from bits_ptr."""
    m = tl.program_id(0).to(tl.int64)
    gs = tl.program_id(1) * GB + tl.arange(0, GB)  # [GB]
    cols = gs[:, None] * 128 + tl.arange(0, 128)[None, :]  # [GB, 128]
    gmask = gs < G
    kmask = cols < K
    if HAS_PERM:
        src = tl.load(perm_ptr + cols, mask=kmask, other=0)
    else:
        src = cols
    x = tl.load(x_ptr + m * stride_x + src, mask=kmask, other=0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [GB]
    if BITS == 0:
        b = tl.load(bits_ptr + gs, mask=gmask, other=8)
        qmax = ((1 << (b - 1)) - 1).to(tl.float32)
    else:
        qmax = tl.full([GB], (1 << (BITS - 1)) - 1, tl.float32)
    scale = tl.math.div_rn(amax, qmax)
    scale = tl.where(scale > 0, scale, 1.0)
    v = tl.math.div_rn(x, scale[:, None])
    r = (v + MAGIC_F) - MAGIC_F  # round half to even (|v| <= 127.x)
    r = tl.minimum(tl.maximum(r, -qmax[:, None]), qmax[:, None])
    qi = r.to(tl.int32)
    tl.store(q_ptr + m * stride_q + cols, qi.to(tl.int8), mask=gmask[:, None])
    tl.store(s_ptr + m * stride_s + gs, scale, mask=gmask)
    tl.store(qs_ptr + m * stride_s + gs, tl.sum(qi, axis=1), mask=gmask)


@triton.jit
def _act_quant_token_kernel(x_ptr, q_ptr, s_ptr, qs_ptr, K, G, stride_x, stride_q, stride_s,
                            QMAX: tl.constexpr, GB: tl.constexpr):
    """One program: one row, one scale for all K channels (per-token activations). The scale is stored once per
    128-channel group (the GEMM reads per-group activation scales: all equal here), with each group's code sum."""
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([GB], tl.float32)
    for g0 in range(0, G, GB):
        cols = (g0 + tl.arange(0, GB))[:, None] * 128 + tl.arange(0, 128)[None, :]
        x = tl.load(x_ptr + m * stride_x + cols, mask=cols < K, other=0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    a = tl.max(amax, axis=0)
    scale = tl.math.div_rn(tl.zeros([GB, 128], tl.float32) + a, tl.full([GB, 128], QMAX, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    for g0 in range(0, G, GB):
        gs = g0 + tl.arange(0, GB)
        gmask = gs < G
        cols = gs[:, None] * 128 + tl.arange(0, 128)[None, :]
        x = tl.load(x_ptr + m * stride_x + cols, mask=cols < K, other=0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        r = (v + MAGIC_F) - MAGIC_F  # round half to even (|v| <= 127.x)
        r = tl.minimum(tl.maximum(r, -QMAX), QMAX)
        qi = r.to(tl.int32)
        tl.store(q_ptr + m * stride_q + cols, qi.to(tl.int8), mask=gmask[:, None])
        tl.store(s_ptr + m * stride_s + gs, tl.max(scale, axis=1), mask=gmask)
        tl.store(qs_ptr + m * stride_s + gs, tl.sum(qi, axis=1), mask=gmask)


def quantize_act(x: torch.Tensor, bits: int | torch.Tensor, perm: torch.Tensor | None = None,
                 group_blocks: int = 8, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16/fp32 (row-contiguous) → (qa int8 [M, Kp], a_scale fp32 [M, G], a_sum int32 [M, G]).

    bits: an int in 2..8, or an int32 tensor [G] on x's device (one width per 128-channel block);
    perm: int32/int64 [K] on x's device, the kernel reads x[:, perm] (COMET's outlier gathering);
    per_token: one scale per row over all K channels (int bits, no perm), repeated in each group's a_scale."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    g = -(-k // ACT_GROUP)
    q = torch.empty(m, g * ACT_GROUP, dtype=torch.int8, device=x.device)
    s = torch.empty(m, g, dtype=torch.float32, device=x.device)
    qs = torch.empty(m, g, dtype=torch.int32, device=x.device)
    if per_token:
        if isinstance(bits, torch.Tensor) or perm is not None or not 2 <= bits <= 8:
            raise ValueError("per-token activations take one width in 2..8 and no channel permutation")
        if m:
            _act_quant_token_kernel[(m,)](x, q, s, qs, k, g, x.stride(0), q.stride(0), s.stride(0),
                                          QMAX=float((1 << (bits - 1)) - 1), GB=min(group_blocks,
                                                                                 triton.next_power_of_2(g)),
                                          num_warps=4)
        return q, s, qs
    if isinstance(bits, torch.Tensor):
        if bits.numel() != g:
            raise ValueError(f"bits has {bits.numel()} entries for {g} channel groups")
        bt, bc = bits, 0
    else:
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be 2..8, got {bits}")
        bt, bc = s, bits  # bits_ptr unused
    gb = min(group_blocks, triton.next_power_of_2(g))
    grid = (m, triton.cdiv(g, gb))
    if m:
        _act_quant_kernel[grid](x, perm if perm is not None else x, bt, q, s, qs, k, g, x.stride(0), q.stride(0),
                                s.stride(0), HAS_PERM=perm is not None, BITS=bc, GB=gb, num_warps=4)
    return q, s, qs


# ----------------------------------------------------------------------------------------------------------
# GEMM


@triton.jit
def _accumulate_block(acc, d, sa, asum, g, wz_ptr, ws_ptr, N, cols, cmask,
                      HAS_ZERO: tl.constexpr, WGB: tl.constexpr, ZC: tl.constexpr):
    """acc += (d − z·asum)·sa·sw for one 128-block: d int32 dots of raw codes, sa / asum the activations'
    block scale and sum, broadcastable to d (per row); cols / cmask the weight columns, shaped like d's
    column axis. Exact int → float: bitcast(I + 1.5·2^23) − 1.5·2^23 (an IADD + FADD, no slow I2F).
    WGB == 0 (per-channel weight scale): the caller multiplies by it once at the end."""
    if HAS_ZERO:
        z = tl.load(wz_ptr + g * N + cols, mask=cmask, other=0).to(tl.int32)
        d = (d - asum * z) + MAGIC
    else:
        d = d + (asum * (-ZC) + MAGIC)
    f = d.to(tl.float32, bitcast=True) - MAGIC_F
    if WGB == 0:
        return acc + f * sa
    else:
        sw = tl.load(ws_ptr + g * N + cols, mask=cmask, other=0).to(tl.float32)
        return acc + f * (sa * sw)


@triton.jit
def _gemm_kernel(qa_ptr, as_ptr, qs_ptr, w_ptr, ws_ptr, wz_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                 M, N, KB, stride_qa, stride_as, stride_out, stride_w, MB,
                 WBITS: tl.constexpr, WGB: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
                 USE_ASM: tl.constexpr):
    """WBITS 6 (int6 layout) or 4 (nibble planes); WGB = weight group size in 128-blocks, 0 = per-channel.
    MB (bucketed M) is only an autotuning key."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    i32 = tl.arange(0, 32)
    a_ptrs = qa_ptr + offs_m.to(tl.int64)[:, None] * stride_qa + tl.arange(0, 128)[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + i32[None, :]
    ROWS: tl.constexpr = 16 * WBITS  # bytes per 128-block and row
    ZC: tl.constexpr = 1 << (WBITS - 1)

    b0, b1 = split_range(pid_k, KB, SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(b0, b1):
        a = tl.load(a_ptrs + b * 128, mask=mmask[:, None], other=0)  # [BLOCK_M, 128]
        c = tl.trans(load_codes(w_ptrs + b * ROWS, nmask, WBITS, BLOCK_N, USE_ASM))  # [128, BLOCK_N]
        d = tl.dot(a, c, out_dtype=tl.int32)
        sa = tl.load(as_ptr + offs_m * stride_as + b, mask=mmask, other=0)
        asum = tl.load(qs_ptr + offs_m * stride_as + b, mask=mmask, other=0)
        g = 0 if WGB == 0 else b // WGB
        acc = _accumulate_block(acc, d, sa[:, None], asum[:, None], g, wz_ptr, ws_ptr, N, offs_n[None, :],
                                nmask[None, :], HAS_ZERO, WGB, ZC)
    if WGB == 0:
        sw = tl.load(ws_ptr + offs_n, mask=nmask, other=0).to(tl.float32)
        acc = acc * sw[None, :]

    finish_tile(acc, out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :],
                 mmask[:, None] & nmask[None, :], offs_m[:, None] * N + offs_n[None, :], bias_ptr + offs_n[None, :],
                 nmask[None, :], part_ptr, M * N, pid_k, cnt_ptr + pid, HAS_BIAS, SPLIT_K)


# ----------------------------------------------------------------------------------------------------------
# decode GEMV (M <= GEMV_MAX_M): CUDA cores, dp4a
#
# At M = 1..4 an int8 tensor-core tile is mostly padding and its weight tile makes two trips through shared
# memory. Here a thread holds 32-bit words of codes: `word & 0x3F3F3F3F` (int6) or `& 0x0F0F0F0F` (int4
# planes) is four unsigned codes as bytes, and one `dp4a.u32.s32` multiplies them with four int8 activations
# and accumulates in int32 — exact, like the tensor-core path, ~0.75 instructions per weight.

_DP4A_ASM: tl.constexpr = tl.constexpr("dp4a.u32.s32 $0, $1, $2, $3;")


@triton.jit
def _dp4a(w, a, acc, USE_ASM: tl.constexpr):
    """acc + Σ_bytes u8(w) · s8(a), elementwise on int32 words."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_DP4A_ASM, "=r,r,r,r", [w, a, acc], dtype=tl.int32, is_pure=True, pack=1)
    else:
        for j in tl.static_range(4):
            acc += ((w >> (8 * j)) & 255) * ((a << (24 - 8 * j)) >> 24)
        return acc


@triton.jit
def _gemv_kernel(qa_ptr, as_ptr, qs_ptr, w_ptr, ws_ptr, wz_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                 M, N, KB, stride_qa, stride_as, stride_out, stride_w, MB,
                 WBITS: tl.constexpr, WGB: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), SPLIT_K, M): one row of the output per program. qa_ptr / w_ptr are int32
    views (stride_qa, stride_w in words). Every tile is [BLOCK_N, 8] or [BLOCK_N, 1] (keep_dims), so all of
    them share one layout: vector loads of a row's 32-byte sector per plane, the activation words broadcast
    along N, the word sum a shuffle within the row's threads, and no shared-memory layout change (a 1-D
    [BLOCK_N] epilogue made Triton convert through shared memory with barriers; word-at-a-time 1-D loads of
    strided rows ran 2.5x slower than the tensor-core kernel on an H200). Same outputs as `_gemm_kernel`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]  # [BN, 1]: every tile is 2-D in one layout
    nmask = offs_n < N
    i8 = tl.arange(0, 8)[None, :]
    a_row = qa_ptr + m.to(tl.int64) * stride_qa + i8  # [1, 8]
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_w + i8  # [BN, 8]: a 32-byte sector per row and plane
    WORDS: tl.constexpr = 4 * WBITS  # 32-bit words per 128-block and row
    ZC: tl.constexpr = 1 << (WBITS - 1)
    b0, b1 = split_range(pid_k, KB, SPLIT_K)
    acc = tl.zeros([BLOCK_N, 1], dtype=tl.float32)
    for b in range(b0, b1):
        wb = w_rows + b * WORDS
        ab = a_row + b * 32
        x0 = tl.load(wb, mask=nmask, other=0)
        x1 = tl.load(wb + 8, mask=nmask, other=0)
        if WBITS == 6:
            x2 = tl.load(wb + 16, mask=nmask, other=0)
            c0 = x0 & 0x3F3F3F3F
            c1 = x1 & 0x3F3F3F3F
            c2 = x2 & 0x3F3F3F3F
            c3 = ((x0 >> 6) & 0x03030303) | ((x1 >> 4) & 0x0C0C0C0C) | ((x2 >> 2) & 0x30303030)
        else:
            c0 = x0 & 0x0F0F0F0F
            c1 = x1 & 0x0F0F0F0F
            c2 = (x0 >> 4) & 0x0F0F0F0F
            c3 = (x1 >> 4) & 0x0F0F0F0F
        t = _dp4a(c0, tl.load(ab), tl.zeros([BLOCK_N, 8], tl.int32), USE_ASM)
        t = _dp4a(c1, tl.load(ab + 8), t, USE_ASM)
        t = _dp4a(c2, tl.load(ab + 16), t, USE_ASM)
        t = _dp4a(c3, tl.load(ab + 24), t, USE_ASM)
        d = tl.sum(t, axis=1, keep_dims=True)  # [BN, 1]
        sa = tl.load(as_ptr + m * stride_as + b)
        asum = tl.load(qs_ptr + m * stride_as + b)
        g = 0 if WGB == 0 else b // WGB
        acc = _accumulate_block(acc, d, sa, asum, g, wz_ptr, ws_ptr, N, offs_n, nmask, HAS_ZERO, WGB, ZC)
    if WGB == 0:
        acc = acc * tl.load(ws_ptr + offs_n, mask=nmask, other=0).to(tl.float32)

    finish_tile(acc, out_ptr + m.to(tl.int64) * stride_out + offs_n, nmask, m * N + offs_n, bias_ptr + offs_n,
                 nmask, part_ptr, M * N, pid_k, cnt_ptr + m * tl.num_programs(0) + pid_n, HAS_BIAS, SPLIT_K)


def _small_configs():
    out = []
    for bn, sk, warps, stages in ((64, 4, 4, 4), (64, 8, 4, 3), (128, 4, 4, 3), (32, 8, 4, 4), (128, 2, 4, 4),
                                  (64, 2, 4, 4)):
        out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "SPLIT_K": sk, "GROUP_M": 1},
                                 num_warps=warps, num_stages=stages))
    return out


def _large_configs():
    out = []
    # registers (ptxas, sm_90a): 128x128/8 warps 192 (1 CTA per SM), 64x128/4 warps 244 (2 CTAs per SM);
    # 128x256 and 256x128 spill
    for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4),
                                  (64, 256, 8, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": 1, "GROUP_M": 8},
                                 num_warps=warps, num_stages=stages))
    return out


def _gemv_configs():
    return [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w, num_stages=st)
            for bn, sk, w, st in ((64, 8, 1, 1), (128, 8, 2, 1), (256, 8, 2, 1), (128, 16, 2, 1), (256, 16, 4, 1),
                                  (128, 4, 1, 1), (256, 4, 2, 1), (64, 16, 1, 1), (128, 8, 2, 3), (64, 8, 1, 3),
                                  (128, 16, 2, 2), (256, 8, 4, 3))]


_KEY = ["MB", "N", "KB", "WBITS", "WGB", "HAS_ZERO"]
gemm_small_tuned = triton.autotune(_small_configs(), key=_KEY, do_bench=quick_bench)(_gemm_kernel)
gemm_large_tuned = triton.autotune(_large_configs(), key=_KEY, do_bench=quick_bench)(_gemm_kernel)
gemv_tuned = triton.autotune(_gemv_configs(), key=_KEY, do_bench=quick_bench)(_gemv_kernel)
GEMV_MAX_M = 2  # M up to this: the dp4a GEMV (CUDA cores, one program per row); above: int8 tensor cores
# M from this: the prefill path (kernels/int8_prefill.py: weight unpacked to int8 once per call, then a GEMM
# that streams both operands into the tensor cores). H200, K = 4096, N = 14336, full W6A8 linear
# (experiments/bench_history/probe_int8_prefill_h200.json): M = 128 58 vs 70 us (this kernel wins), 256 108 vs 101, 1024 362 vs 265,
# 4096 1385 vs 934.
PREFILL_MIN_M = 256

# split-K tile counters (kept all-zero between calls), per device
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None or c.numel() < tiles:
        c = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def lowbit_gemm(qa: torch.Tensor, a_scale: torch.Tensor, a_sum: torch.Tensor, w: LowbitWeight,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                config: dict | None = None, path: str | None = None, per_token: bool = False) -> torch.Tensor:
    """(qa int8 [M, Kp], a_scale fp32 [M, G], a_sum int32 [M, G]) × LowbitWeight [N, K] → y [M, N] `out_dtype`.

    `config`: explicit meta-parameters (BLOCK_M, BLOCK_N, SPLIT_K, GROUP_M, num_warps, num_stages; the GEMV:
    BLOCK_N, SPLIT_K) instead of the autotuned choice (tests, the interpreter).
    `path`: "gemv" (dp4a on CUDA cores, M <= 16), "mma" (int8 tensor cores, weights unpacked per tile) or
    "prefill" (`int8_prefill`: weights unpacked to int8 once, then the GEMM; `config` then holds its BLOCK_M /
    BLOCK_N); None: GEMV up to GEMV_MAX_M, prefill from PREFILL_MIN_M, else mma.
    `per_token`: a_scale is one scale per row repeated in every column (`quantize_act(per_token=True)`); with
    per-channel weight scales the prefill GEMM then accumulates in int32 (int8_prefill: PLAIN)."""
    m = qa.shape[0]
    kb = w.blocks
    if qa.shape[1] != kb * ACT_GROUP or a_scale.shape != (m, kb) or a_sum.shape != (m, kb):
        raise ValueError(f"activations {tuple(qa.shape)} / {tuple(a_scale.shape)} do not match K={w.k}")
    out = torch.empty(m, w.n, dtype=out_dtype, device=qa.device)
    if m == 0:
        return out
    small = m <= SMALL_M
    if path is None:  # an explicit tile config (BLOCK_M) means the tensor-core kernel
        path = "gemv" if m <= GEMV_MAX_M and (config is None or "BLOCK_M" not in config) else "mma"
        if path == "mma" and m >= PREFILL_MIN_M and config is None:
            path = "prefill"
    if path not in ("gemv", "mma", "prefill"):
        raise ValueError(f"unknown path {path!r}: use 'gemv', 'mma' or 'prefill'")
    if path == "prefill":
        from quantkit.kernels.int8_prefill import prefill_linear_gemm  # its kernels compile on first use

        return prefill_linear_gemm(qa, a_scale, w, bias, out_dtype, config, per_token)
    gemv = path == "gemv"
    if gemv and m > 16:
        raise ValueError(f"the GEMV path serves M <= 16, got M = {m}")
    c = None
    if config is not None:
        c = {**({"num_warps": 2, "num_stages": 1} if gemv else {"GROUP_M": 1, "num_warps": 4, "num_stages": 2}),
             **config}
    splits = max(SPLIT_GEMV_MAX if gemv else SPLIT_MAX if small else 1, c["SPLIT_K"] if c else 1)
    part = torch.empty(splits, m, w.n, dtype=torch.float32, device=qa.device)
    cnt = _counters(qa.device, triton.cdiv(m, 16) * triton.cdiv(w.n, 16))
    wgb = (w.group_size // ACT_GROUP) if w.group_size else 0
    # the GEMV reads activations and codes as 32-bit words (strides in words)
    qa_k, qw_k = (qa.view(torch.int32), w.qweight.view(torch.int32)) if gemv else (qa, w.qweight)
    args = (qa_k, a_scale, a_sum, qw_k, w.scales, w.zeros if w.zeros is not None else w.scales,
            bias if bias is not None else out, out, part, cnt, m, w.n, kb, qa_k.stride(0), a_scale.stride(0),
            out.stride(0), qw_k.stride(0), bucket(m))
    consts = {"WBITS": w.bits, "WGB": wgb, "HAS_ZERO": w.zeros is not None, "HAS_BIAS": bias is not None,
              "USE_ASM": not _INTERPRET}

    if gemv:
        kernel, tuned = _gemv_kernel, gemv_tuned

        def grid(a):
            return (triton.cdiv(w.n, a["BLOCK_N"]), a["SPLIT_K"], m)
    else:
        kernel, tuned = _gemm_kernel, (gemm_small_tuned if small else gemm_large_tuned)

        def grid(a):
            return (triton.cdiv(m, a["BLOCK_M"]) * triton.cdiv(w.n, a["BLOCK_N"]), a["SPLIT_K"])

    if c is None:
        tuned[grid](*args, **consts)
    else:
        kernel[grid(c)](*args, **consts, **c)
    return out


def lowbit_linear(x: torch.Tensor, w: LowbitWeight, act_bits: int | torch.Tensor,
                  perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  per_token: bool = False) -> torch.Tensor:
    """y = Q_act(x[..., perm]) @ Wᵀ (+ bias): x [..., K] bf16/fp16 on CUDA → [..., N] in x's dtype.

    act_bits: int (FlexQ: 6 or 8 per layer) or int32 tensor [ceil(K/128)] on x's device (COMET: 4/8 per block,
    in the permuted channel order); perm: int32 [K] (COMET) or None; per_token: one activation scale per token
    instead of one per 128-channel group (int act_bits, no perm)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    qa, s, qs = quantize_act(x2, act_bits, perm, per_token=per_token)
    y = lowbit_gemm(qa, s, qs, w, bias, out_dtype=x.dtype, per_token=per_token)
    return y.reshape(*lead, w.n)


def supports(fmt: str, bits: int, group_size: int | None) -> bool:
    """Whether these kernels serve a weight format: int6, or 4-bit `int`, groups a multiple of 128 / channel."""
    ok_group = group_size is None or group_size % ACT_GROUP == 0
    return ok_group and ((fmt == "int6" and bits == 6) or (fmt == "int" and bits == 4))
