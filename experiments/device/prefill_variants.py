"""Candidate fused weight-only GEMM formulations for prefill sizes (M = 128..2048), next to the shipped
`wq_gemm._gemm_kernel`, to be timed by `prefill_gemm_sweep.py --variants`.

`_tc_kernel`: the weight tile is read as an [BLOCK_N, BLOCK_K] int32 tensor whose element (n, k) is the word
that holds code k of column n (each word read by 32/bits neighbours: only elementwise ops separate the load
from the dot, so Triton can place the tile straight in the dot-operand layout instead of converting a
joined/reshaped tile through shared memory), the code taken out with a per-element shift, and made a float by
OR-ing it into the mantissa of 2^23 (no int->float conversion):
    int:  w = (f - (2^23 + z)) * s,  f = float(0x4B000000 | code) = 2^23 + code   (code - z exact; one rounding)
    hlq:  w = off + sum_b s_b * bit_b  (bit_b as (1 + bit_b / 2) - 1 via the bits of 1.0, scaled by 2)
SWAP puts the weight in the A operand (registers on Hopper's wgmma), x^T as B.

`_bf16_kernel`: the same loop over a bf16 weight (Triton's own ceiling for this loop structure).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantkit.kernels.triton_common import grouped_tile
from quantkit.kernels.wq_gemm import _f, _group_params, _top

MAGIC = 0x4B000000  # bits of 2^23
ONE = 0x3F800000  # bits of 1.0


@triton.jit
def _dequant_codes(code, s_ptr, z_ptr, g, offs_n, nm, N, FMT: tl.constexpr, BITS: tl.constexpr,
                   HAS_ZERO: tl.constexpr, magic, one):
    """Codes [BLOCK_N, BLOCK_K] of group g → float32 weights (int: (2^23 + code − (2^23 + z))·s; hlq: the
    offset plus each set plane's scale, a plane bit made 1 or 1.5 in the mantissa of 1.0)."""
    if FMT == 0:
        s = tl.load(s_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
        else:
            z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
        f = (code | magic).to(tl.float32, bitcast=True)
        w = (f - (z + 8388608.0)[:, None]) * s[:, None]
    else:
        off = tl.load(z_ptr + g * N + offs_n, mask=nm, other=0).to(tl.float32)
        sp = s_ptr + g * (BITS * N) + offs_n
        s0 = tl.load(sp, mask=nm, other=0).to(tl.float32) * 2.0
        s1 = tl.load(sp + N, mask=nm, other=0).to(tl.float32) * 2.0
        base = off - s0 - s1
        w = base[:, None] + s0[:, None] * ((code << 22) & (1 << 22) | one).to(tl.float32, bitcast=True)
        w += s1[:, None] * ((code << 21) & (1 << 22) | one).to(tl.float32, bitcast=True)
        if BITS == 4:
            s2 = tl.load(sp + 2 * N, mask=nm, other=0).to(tl.float32) * 2.0
            s3 = tl.load(sp + 3 * N, mask=nm, other=0).to(tl.float32) * 2.0
            w += s2[:, None] * ((code << 20) & (1 << 22) | one).to(tl.float32, bitcast=True) - s2[:, None]
            w += s3[:, None] * ((code << 19) & (1 << 22) | one).to(tl.float32, bitcast=True) - s3[:, None]
    return w


@triton.jit
def _tc_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, MAGIC_ARG, ONE_ARG,
               GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               SWAP: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr = False):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    kk = tl.arange(0, BLOCK_K)
    shift = (kk % PER) * BITS
    magic = MAGIC_ARG.to(tl.uint32)
    one = ONE_ARG.to(tl.uint32)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = t * BLOCK_K
        offs_k = k0 + kk
        if EVEN_K:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0)
        else:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        words = tl.load(q_ptr + (offs_k // PER)[None, :] * N + offs_n[:, None], mask=nm[:, None], other=0)
        code = (words.to(tl.uint32, bitcast=True) >> shift[None, :]) & MASK
        w = _dequant_codes(code, s_ptr, z_ptr, k0 // GS, offs_n, nm, N, FMT, BITS, HAS_ZERO, magic, one)
        wq = w.to(xt.dtype)
        xo = xt
        if DOT_F32:
            wq = wq.to(tl.float32)
            xo = xt.to(tl.float32)
        if SWAP:
            acc = tl.dot(wq, tl.trans(xo), acc)
        else:
            acc = tl.dot(xo, tl.trans(wq), acc)
    if SWAP:
        acc = tl.trans(acc)
    mask = (offs_m[:, None] < M) & nm[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bf16_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0)
        wt = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=offs_n[:, None] < N, other=0)
        if SWAP:
            acc = tl.dot(wt, tl.trans(xt), acc)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    if SWAP:
        acc = tl.trans(acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def tc_gemm(p, x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """x [M, K] @ dequant(p)^T with `_tc_kernel` (p: dispatch.Prepared of a 2/4-bit int or hlq weight)."""
    assert p.bits in (2, 4) and p.gs > 0
    m = x.shape[0]
    out = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    c = dict(cfg)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(p.n, c["BLOCK_N"]),)
    _tc_kernel[grid](x, p.q0, p.scales, p.zeros, out, m, p.n, p.k, x.stride(0), MAGIC, ONE, GS=p.gs, FMT=p.fmt,
                     BITS=p.bits, HAS_ZERO=p.has_zero, EVEN_K=p.k % c["BLOCK_K"] == 0, **c)
    return out


def bf16_gemm(x: torch.Tensor, w: torch.Tensor, cfg: dict) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _bf16_kernel[grid](x, w, out, m, n, k, x.stride(0), **cfg)
    return out


# ----------------------------------------------------------------------------------------------------------
# Register-direct: the codes of a word land where the wgmma A-operand layout wants them, no layout conversion.
# In the A operand (kWidth 2) a thread holds k bits {0, 3, 4, 5, ...} in registers and k bits {1, 2} across 4
# lanes. The tile's words [BLOCK_N, WDS] are unpacked by constant shifts into slots, and the (word, slot) index
# is relabelled so that slot bits land on register k-bits and the low word bits on the lane k-bits:
#     c = jhi·32·(8/PER)... (see _kphys) ;  4-bit: c = jhi·32 + s2·16 + s1·8 + j1·4 + j0·2 + s0
# The product runs over c, so x^T is read in the same order: row c of x^T is x[:, k0 + kphys(c)] (pairs of
# consecutive k stay together: 4-byte loads).


@triton.jit
def _kphys(c, BITS: tl.constexpr):
    """Physical k (within the tile) of dot index c."""
    s0 = c & 1
    j0 = (c >> 1) & 1
    j1 = (c >> 2) & 1
    if BITS == 4:  # 8 slots: s0, s1, s2; c = jhi*32 + s2*16 + s1*8 + j1*4 + j0*2 + s0
        s12 = (c >> 3) & 3
        jhi = c >> 5
        k = (jhi * 4 + j1 * 2 + j0) * 8 + s12 * 2 + s0
    else:  # 16 slots: c = jhi*64 + s3*32 + s2*16 + s1*8 + j1*4 + j0*2 + s0
        s123 = (c >> 3) & 7
        jhi = c >> 6
        k = (jhi * 4 + j1 * 2 + j0) * 16 + s123 * 2 + s0
    return k


@triton.jit
def _codes_rd(u, BITS: tl.constexpr, BLOCK_N: tl.constexpr, WDS: tl.constexpr):
    """uint32 words [BLOCK_N, WDS] → codes [BLOCK_N, WDS·PER] in dot-index order c (see _kphys)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 4:
        a0 = tl.join(u & MASK, (u >> 4) & MASK)  # [BN, WDS, s0]
        a1 = tl.join((u >> 8) & MASK, (u >> 12) & MASK)
        a2 = tl.join((u >> 16) & MASK, (u >> 20) & MASK)
        a3 = tl.join((u >> 24) & MASK, (u >> 28) & MASK)
        b0 = tl.join(a0, a1)  # [BN, WDS, s0, s1]
        b1 = tl.join(a2, a3)
        d = tl.join(b0, b1)  # [BN, WDS, s0, s1, s2]
        d = tl.reshape(d, (BLOCK_N, WDS // 4, 2, 2, 2, 2, 2))  # [BN, jhi, j1, j0, s0, s1, s2]
        d = tl.permute(d, (0, 1, 6, 5, 2, 3, 4))  # [BN, jhi, s2, s1, j1, j0, s0]
        return tl.reshape(d, (BLOCK_N, WDS * 8))
    else:
        a0 = tl.join(u & MASK, (u >> 2) & MASK)
        a1 = tl.join((u >> 4) & MASK, (u >> 6) & MASK)
        a2 = tl.join((u >> 8) & MASK, (u >> 10) & MASK)
        a3 = tl.join((u >> 12) & MASK, (u >> 14) & MASK)
        a4 = tl.join((u >> 16) & MASK, (u >> 18) & MASK)
        a5 = tl.join((u >> 20) & MASK, (u >> 22) & MASK)
        a6 = tl.join((u >> 24) & MASK, (u >> 26) & MASK)
        a7 = tl.join((u >> 28) & MASK, (u >> 30) & MASK)
        b0 = tl.join(a0, a1)
        b1 = tl.join(a2, a3)
        b2 = tl.join(a4, a5)
        b3 = tl.join(a6, a7)
        e0 = tl.join(b0, b1)
        e1 = tl.join(b2, b3)
        d = tl.join(e0, e1)  # [BN, WDS, s0, s1, s2, s3]
        d = tl.reshape(d, (BLOCK_N, WDS // 4, 2, 2, 2, 2, 2, 2))  # [BN, jhi, j1, j0, s0, s1, s2, s3]
        d = tl.permute(d, (0, 1, 7, 6, 5, 2, 3, 4))  # [BN, jhi, s3, s2, s1, j1, j0, s0]
        return tl.reshape(d, (BLOCK_N, WDS * 16))


@triton.jit
def _rd_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, MAGIC_ARG, ONE_ARG,
               GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               SWAP: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr = False):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    PER: tl.constexpr = 32 // BITS
    WDS: tl.constexpr = BLOCK_K // PER
    kx = _kphys(tl.arange(0, BLOCK_K), BITS)
    kx = tl.max_contiguous(tl.multiple_of(kx, 2), 2)
    magic = MAGIC_ARG.to(tl.uint32)
    one = ONE_ARG.to(tl.uint32)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = t * BLOCK_K
        offs_k = k0 + kx
        if EVEN_K:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=offs_m[None, :] < M, other=0)
        else:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                         mask=(offs_m[None, :] < M) & (offs_k[:, None] < K), other=0)
        rows = k0 // PER + tl.arange(0, WDS)
        words = tl.load(q_ptr + rows[None, :] * N + offs_n[:, None], mask=nm[:, None], other=0)
        code = _codes_rd(words.to(tl.uint32, bitcast=True), BITS, BLOCK_N, WDS)
        w = _dequant_codes(code, s_ptr, z_ptr, k0 // GS, offs_n, nm, N, FMT, BITS, HAS_ZERO, magic, one)
        wq = w.to(xt.dtype)
        xo = xt
        if DOT_F32:
            acc = tl.dot(wq.to(tl.float32), xo.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(wq, xo, acc)
    acc = tl.trans(acc)
    mask = (offs_m[:, None] < M) & nm[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def rd_gemm(p, x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """x [M, K] @ dequant(p)^T with `_rd_kernel` (2/4-bit int or hlq; BLOCK_K a multiple of 4·32/bits·... )."""
    assert p.bits in (2, 4) and p.gs > 0
    m = x.shape[0]
    out = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    c = dict(cfg)
    c.pop("SWAP", None)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(p.n, c["BLOCK_N"]),)
    _rd_kernel[grid](x, p.q0, p.scales, p.zeros, out, m, p.n, p.k, x.stride(0), MAGIC, ONE, GS=p.gs, FMT=p.fmt,
                     BITS=p.bits, HAS_ZERO=p.has_zero, EVEN_K=p.k % c["BLOCK_K"] == 0, SWAP=True, **c)
    return out


# ----------------------------------------------------------------------------------------------------------
# Slot-split: one dot per code slot of a word, so that no join/reshape separates the load from the dot.
# Word row r of the stored qweight holds codes k = r·PER .. r·PER + PER − 1 (PER = 32/bits). A K step reads
# KW = 16 word rows ([BLOCK_N, 16] words, the weight as the A operand) and, for each slot j (a compile-time
# shift), runs acc += W_j · X_j with W_j[n, i] = w[n, k0 + PER·i + j] and X_j[i, m] = x[m, k0 + PER·i + j].
# Only elementwise ops (constant shifts, masks, one FFMA per field) lie between the word load and each dot, so
# Triton loads the words from shared memory straight into the wgmma register layout (no layout conversion),
# and the dequantization of slot j+1 overlaps the asynchronous wgmma of slot j. x is permuted once per call
# (`slot_permute_x`) so that each X_j is a contiguous [16, BLOCK_M] tile: xp[m, k0 + j·16 + i] = x[m, k0 + PER·i + j].
# BLOCK_K = 16·PER (int4: 128, int2: 256). Groups smaller than BLOCK_K take per-word-row group parameters.
# Correct under TRITON_INTERPRET (int4 g128/g256, int2 g64/g256, hlq2 g64: bf16 output rounding). Compiled
# offline for sm_90 with triton 3.6 (compile_offline.py) it does NOT become what the design wants:
# - the words tile feeds 8 (int2: 16) elementwise chains, and Triton only hoists the dot-operand layout through
#   single-use chains: the words are read from shared memory in a blocked layout and every slot's bf16 tile
#   goes back through shared memory (local_alloc + local_load) before its dot;
# - with several dots in one loop body every wgmma is followed by `warp_group_dot_wait {pendings = 0}`;
# - each X_j is a separately pipelined load: int4 at BLOCK_M 128 needs 119 KB of shared memory, int2 230 KB
#   (over the limit).
# A single-dot, single-use chain (int8 codes, or uint8 nibble pairs split into two dots) does get the direct
# shared → register load (probed offline). Kept so the GPU sweep can time it against the others.


@triton.jit
def _slot_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, ONE_ARG,
                 GS: tl.constexpr, FMT: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                 DOT_F32: tl.constexpr = False):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    PER: tl.constexpr = 32 // BITS
    KW: tl.constexpr = 16
    BLOCK_K: tl.constexpr = KW * PER
    ri = tl.arange(0, KW)
    one = ONE_ARG.to(tl.uint32)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for t in range(0, K // BLOCK_K):
        k0 = t * BLOCK_K
        rows = t * KW + ri
        words = tl.load(q_ptr + rows[None, :] * N + offs_n[:, None], mask=nm[:, None], other=0)
        words = words.to(tl.uint32, bitcast=True)
        if GS >= BLOCK_K:
            a0, a1, a2, a3, b = _group_params(s_ptr, z_ptr, k0 // GS, offs_n, N, FMT, BITS, HAS_ZERO)
            a0 = a0[:, None]
            a1 = a1[:, None]
            b = b[:, None]
        else:
            g = (k0 + ri * PER) // GS
            a0, a1, a2, a3, b = _group_params(s_ptr, z_ptr, g[None, :], offs_n[:, None], N, FMT, BITS, HAS_ZERO)
        for j in tl.static_range(PER):
            u = _top(words, j * BITS + BITS - 1)  # code j's top bit at bit 22
            if FMT == 0:
                w = b + a0 * _f(u, 23 - BITS, BITS, one)
            else:  # hlq, 2 planes (plane 0 at bit 21, plane 1 at bit 22)
                w = b + a0 * _f(u, 21, 1, one) + a1 * _f(u, 22, 1, one)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + j * KW + ri)[:, None],
                         mask=offs_m[None, :] < M, other=0)
            if DOT_F32:  # Triton's CPU interpreter: fp32 copies of the same bf16-exact operands
                acc = tl.dot(w.to(xt.dtype).to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w.to(xt.dtype), xt, acc)
    acc = tl.trans(acc)
    mask = (offs_m[:, None] < M) & nm[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def slot_permute_x(x: torch.Tensor, bits: int) -> torch.Tensor:
    """xp[m, k0 + j·16 + i] = x[m, k0 + PER·i + j] within each K step of 16·PER (PER = 32/bits)."""
    per = 32 // bits
    m, k = x.shape
    return x.view(m, k // (16 * per), 16, per).transpose(2, 3).reshape(m, k)


def slot_gemm(p, x: torch.Tensor, cfg: dict, xp: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(p)^T with `_slot_kernel` (2/4-bit int, 2-bit hlq; K a multiple of 16·32/bits)."""
    assert p.bits in (2, 4) and p.gs > 0 and (p.fmt == 0 or p.bits == 2)
    assert p.k % (16 * 32 // p.bits) == 0
    m = x.shape[0]
    if xp is None:
        xp = slot_permute_x(x, p.bits)
    out = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    c = {k: v for k, v in cfg.items() if k not in ("SWAP", "BLOCK_K")}
    c.setdefault("DOT_F32", os.environ.get("TRITON_INTERPRET") == "1")
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(p.n, c["BLOCK_N"]),)
    _slot_kernel[grid](xp, p.q0, p.scales, p.zeros, out, m, p.n, p.k, xp.stride(0), ONE, GS=p.gs, FMT=p.fmt,
                       BITS=p.bits, HAS_ZERO=p.has_zero, **c)
    return out
