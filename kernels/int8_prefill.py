"""Large-M (prefill) path of the W{4,6}A{4,6,8} int8-tensor-core linears: unpack once, then a plain block-scaled
int8 GEMM. Torch reference of the same math: `int8_reference.py` (`lowbit_gemm_ref`).

Why a second GEMM next to `int8_gemm._gemm_kernel`: that kernel unpacks the 6/4-bit weight tile in registers
and stores it to shared memory for the tensor cores in every M tile, so at M = 4096 each weight tile is
unpacked 32 times and every K step waits on a register → shared-memory round trip (H200: 348 int8 TOPS,
2.3x cuBLAS bf16). Here:

- `_unpack_kernel`  LowbitWeight → int8 [N, Kp] *signed* codes c − z (int6: c − 32; int4: c − z[g, n], both
                    fit int8), K-contiguous. One pass over the weights per call (~25 µs for 4096 x 14336):
                    the zero point is gone from the GEMM, so it needs no activation block sums.
- `_gemm_kernel`    both operands streamed by pipelined loads straight into the tensor cores' shared memory;
                    per 128-block of K one int8 `tl.dot` into int32, promoted into the fp32 accumulator:
                        acc += (bitcast_f32(I + 0x4B400000) − 1.5·2^23) · a_scale[m] · w_scale[n]
                    (exact int → float for |I| < 2^22 without the slow I2F; the compiler folds the integer
                    add into the dot's accumulator initialisation). MODE 0 is a timing-only ceiling (one
                    int32 sum over all of K, wrong for real scales).

Results equal `int8_gemm.lowbit_gemm` up to fp32 rounding order (same blocks, same order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.int8_gemm import _INTERPRET, MAGIC, MAGIC_F, _bench, _bucket, _load_codes
from quantkit.kernels.int8_reference import ACT_GROUP, LowbitWeight
from quantkit.kernels.wq_gemm import _grouped_tile


@triton.jit
def _unpack_kernel(w_ptr, wz_ptr, out_ptr, N, stride_w, stride_out, WBITS: tl.constexpr, WGB: tl.constexpr,
                   HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), KB): one 128-block of K of BLOCK_N rows → signed int8 codes."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1)
    nmask = offs_n < N
    i32 = tl.arange(0, 32)
    wb = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + b * (16 * WBITS) + i32[None, :]
    c = _load_codes(wb, nmask, WBITS, BLOCK_N, USE_ASM).to(tl.int32)  # [BLOCK_N, 128]
    if HAS_ZERO:
        g = 0 if WGB == 0 else b // WGB
        z = tl.load(wz_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)
        c = c - z[:, None]
    else:
        c = c - (1 << (WBITS - 1))
    optrs = out_ptr + offs_n.to(tl.int64)[:, None] * stride_out + b * 128 + tl.arange(0, 128)[None, :]
    tl.store(optrs, c.to(tl.int8), mask=nmask[:, None])


@triton.jit
def _block_scales(b, KB, as_ptr, ws_ptr, offs_m, offs_n, M, N, stride_as, WGB: tl.constexpr):
    """(a_scale [BLOCK_M], w_scale [BLOCK_N]) of K block b (zeros at b >= KB: a prefetch past the end)."""
    m_lim = tl.where(b < KB, M, 0)  # (a scalar & tensor mask trips the CPU interpreter)
    sa = tl.load(as_ptr + offs_m * stride_as + b, mask=offs_m < m_lim, other=0)
    if WGB == 0:
        sw = tl.full(offs_n.shape, 1.0, tl.float32)
    else:
        n_lim = tl.where(b < KB, N, 0)
        sw = tl.load(ws_ptr + (b // WGB) * N + offs_n, mask=offs_n < n_lim, other=0)
    return sa, sw


@triton.jit
def _promote(acc, d, sa, sw):
    """acc += I·a_scale·w_scale for one K block (per-channel w_scale: sw = 1 here, applied at the end)."""
    f = (d + MAGIC).to(tl.float32, bitcast=True) - MAGIC_F
    return acc + f * (sa[:, None] * sw[None, :])


@triton.jit
def _gemm_kernel(qa_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, KB, stride_qa, stride_as, stride_w,
                 stride_out, MB, WGB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, MODE: tl.constexpr = 1):
    """Grid (cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N),). qa int8 [M, KB·128], w int8 [N, KB·128] (signed codes),
    ws fp32 [groups, N]."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    kk = tl.arange(0, 128)
    a_ptrs = qa_ptr + offs_m.to(tl.int64)[:, None] * stride_qa + kk[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + kk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if MODE == 0:  # timing only: one int32 sum over all of K
        acci = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for b in range(KB):
            a = tl.load(a_ptrs + b * 128, mask=mmask[:, None], other=0)
            w = tl.load(w_ptrs + b * 128, mask=nmask[:, None], other=0)
            acci = tl.dot(a, tl.trans(w), acci, out_dtype=tl.int32)
        sa, sw = _block_scales(0, KB, as_ptr, ws_ptr, offs_m, offs_n, M, N, stride_as, WGB)
        acc = _promote(acc, acci, sa, sw)
    else:
        # the scales of the next block are loaded one step ahead: their latency hides behind the dot
        sa, sw = _block_scales(0, KB, as_ptr, ws_ptr, offs_m, offs_n, M, N, stride_as, WGB)
        for b in range(KB):
            a = tl.load(a_ptrs + b * 128, mask=mmask[:, None], other=0)
            w = tl.load(w_ptrs + b * 128, mask=nmask[:, None], other=0)
            d = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
            sa_next, sw_next = _block_scales(b + 1, KB, as_ptr, ws_ptr, offs_m, offs_n, M, N, stride_as,
                                             WGB)
            acc = _promote(acc, d, sa, sw)
            sa = sa_next
            sw = sw_next
    if WGB == 0:
        acc = acc * tl.load(ws_ptr + offs_n, mask=nmask, other=0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
    optrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _prefill_configs():
    # H200, M = 4096, K = 4096, N = 14336 (eval/probe_int8_prefill.py): 64x128 / 4 warps / 3 stages won
    # (884 us; 128x128 / 8 warps 977 us: one CTA per SM cannot overlap one tile's promotion with another's dots)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, w, st in ((64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3),
                                  (128, 64, 4, 3))]


gemm_tuned = triton.autotune(_prefill_configs(), key=["MB", "N", "KB", "WGB"], do_bench=_bench)(_gemm_kernel)

# one int8 weight workspace per device, grown to the largest Linear seen (reused by every call: calls on one
# stream are ordered, and the workspace is only read by the GEMM that follows its unpack)
_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def workspace(device: torch.device, numel: int) -> torch.Tensor:
    ws = _WORKSPACE.get(device)
    if ws is None or ws.numel() < numel:
        ws = torch.empty(numel, dtype=torch.int8, device=device)
        _WORKSPACE[device] = ws
    return ws


def scales_f32(w: LowbitWeight) -> torch.Tensor:
    """The weight's group scales as fp32 [groups, N], converted once and cached on the LowbitWeight."""
    if w.scales_f32 is None or w.scales_f32.device != w.scales.device:
        w.scales_f32 = w.scales.float().contiguous()
    return w.scales_f32


def unpack_weight(w: LowbitWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """LowbitWeight → int8 [N, KB·128] signed codes (c − z), K-contiguous; `out` reuses a workspace."""
    kb = w.blocks
    if out is None:
        out = torch.empty(w.n, kb * ACT_GROUP, dtype=torch.int8, device=w.qweight.device)
    wgb = (w.group_size // ACT_GROUP) if w.group_size else 0
    bn = 64
    _unpack_kernel[(triton.cdiv(w.n, bn), kb)](
        w.qweight, w.zeros if w.zeros is not None else w.scales, out, w.n, w.qweight.stride(0), out.stride(0),
        WBITS=w.bits, WGB=wgb, HAS_ZERO=w.zeros is not None, BLOCK_N=bn, USE_ASM=not _INTERPRET, num_warps=4)
    return out


def prefill_gemm(qa: torch.Tensor, a_scale: torch.Tensor, wt: torch.Tensor, w: LowbitWeight,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 config: dict | None = None, mode: int = 1, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(qa int8 [M, Kp], a_scale fp32 [M, G]) × (wt = unpack_weight(w), int8 [N, Kp]) → y [M, N] `out_dtype`.
    `config`: explicit BLOCK_M, BLOCK_N (GROUP_M, num_warps, num_stages) instead of the autotuned choice."""
    m = qa.shape[0]
    out = torch.empty(m, w.n, dtype=out_dtype, device=qa.device)
    if m == 0:
        return out
    wgb = (w.group_size // ACT_GROUP) if w.group_size else 0
    ws = scales_f32(w) if w_scale is None else w_scale
    args = (qa, a_scale, wt, ws, bias if bias is not None else out, out, m, w.n, w.blocks, qa.stride(0),
            a_scale.stride(0), wt.stride(0), out.stride(0), _bucket(m))
    if config is None and mode == 1:
        gemm_tuned[lambda a: (triton.cdiv(m, a["BLOCK_M"]) * triton.cdiv(w.n, a["BLOCK_N"]),)](
            *args, WGB=wgb, HAS_BIAS=bias is not None)
        return out
    c = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, **(config or {})}
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(w.n, c["BLOCK_N"]),)
    _gemm_kernel[grid](*args, WGB=wgb, HAS_BIAS=bias is not None, MODE=mode, **c)
    return out


def prefill_linear_gemm(qa: torch.Tensor, a_scale: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None,
                        out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """`int8_gemm.lowbit_gemm`'s large-M path: unpack into the device workspace, then the GEMM."""
    ws = workspace(qa.device, w.n * w.blocks * ACT_GROUP)[: w.n * w.blocks * ACT_GROUP].view(w.n, -1)
    return prefill_gemm(qa, a_scale, unpack_weight(w, ws), w, bias, out_dtype, config)
