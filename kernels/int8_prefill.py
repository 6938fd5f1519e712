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
                    add into the dot's accumulator initialisation).
- `_gemm_tma_kernel` the same math with both operands read by TMA (in-kernel descriptors; Hopper+, compiled):
                    no pointer tiles or masks in the K loop, bit-identical results, 18% faster at M = 4096 on
                    an H200. `prefill_gemm` picks it where `tma_available`. (Triton 3.6's Hopper warp
                    specialization, `tl.range(..., warp_specialize=True)`, did split this loop into a TMA
                    producer and two consumer warp groups, but its results were wrong from M = 256 and it was
                    slower: 837 vs 721 us; experiments/bench_history/decode_notes.md.)

Per-token activations with per-channel weight scales (`per_token`, WGB = 0: every block has the same a_scale and
w_scale) take the kernels' PLAIN form: the int8 dots accumulate in int32 over the whole of K (|codes| <= 127·127
per product, K < 2^17: no overflow) and the two scales are applied once in the epilogue. No per-block promotion
in the K loop, so the wgmma chain is the loop's only work (the block-scaled form waits on every block's dot).

Results equal `int8_gemm.lowbit_gemm` up to fp32 rounding order (same blocks, same order; PLAIN: the exact
integer sum, rounded once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.int8_common import MAGIC, MAGIC_F, load_codes
from quantkit.kernels.int8_reference import ACT_GROUP, LowbitWeight
from quantkit.kernels.triton_common import bucket, grouped_tile, interpreting, quick_bench

_INTERPRET = interpreting()


@triton.jit
def _unpack_kernel(w_ptr, wz_ptr, out_ptr, N, stride_w, stride_out, WBITS: tl.constexpr, WGB: tl.constexpr,
                   HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), KB): one 128-block of K of BLOCK_N rows → signed int8 codes."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1)
    nmask = offs_n < N
    i32 = tl.arange(0, 32)
    wb = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + b * (16 * WBITS) + i32[None, :]
    c = load_codes(wb, nmask, WBITS, BLOCK_N, USE_ASM).to(tl.int32)  # [BLOCK_N, 128]
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
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile in the grouped order: first row m0, first column n0, offs_m, offs_n."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    return m0, n0, m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N)


@triton.jit
def _store_tile(acc, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_out, WGB: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """Per-channel weight scale (WGB = 0), bias, cast and masked store of one output tile."""
    nmask = offs_n < N
    if WGB == 0:
        acc = acc * tl.load(ws_ptr + offs_n, mask=nmask, other=0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0).to(tl.float32)[None, :]
    optrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & nmask[None, :])


@triton.jit
def _gemm_kernel(qa_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, KB, stride_qa, stride_as, stride_w,
                 stride_out, MB, WGB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, PLAIN: tl.constexpr = False):
    """Grid (cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N),). qa int8 [M, KB·128], w int8 [N, KB·128] (signed codes),
    ws fp32 [groups, N]. PLAIN: one a_scale per row (column 0) and per-channel ws: int32 accumulation."""
    _, _, offs_m, offs_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    mmask = offs_m < M
    nmask = offs_n < N
    kk = tl.arange(0, 128)
    a_ptrs = qa_ptr + offs_m.to(tl.int64)[:, None] * stride_qa + kk[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + kk[None, :]
    if PLAIN:
        acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for b in range(KB):
            a = tl.load(a_ptrs + b * 128, mask=mmask[:, None], other=0)
            w = tl.load(w_ptrs + b * 128, mask=nmask[:, None], other=0)
            acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
        sa = tl.load(as_ptr + offs_m * stride_as, mask=mmask, other=0)
        acc = acc_i.to(tl.float32) * sa[:, None]
        _store_tile(acc, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_out, WGB, HAS_BIAS)
        return
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # the scales of the next block are loaded one step ahead: their latency hides behind the dot
    sa, sw = _block_scales(0, KB, as_ptr, ws_ptr, offs_m, offs_n, M, N, stride_as, WGB)
    for b in range(KB):
        a = tl.load(a_ptrs + b * 128, mask=mmask[:, None], other=0)
        w = tl.load(w_ptrs + b * 128, mask=nmask[:, None], other=0)
        d = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        sa_next, sw_next = _block_scales(b + 1, KB, as_ptr, ws_ptr, offs_m, offs_n, M, N, stride_as, WGB)
        acc = _promote(acc, d, sa, sw)
        sa = sa_next
        sw = sw_next
    _store_tile(acc, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_out, WGB, HAS_BIAS)


@triton.jit
def _gemm_tma_kernel(qa_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, KB, stride_qa, stride_as, stride_w,
                     stride_out, MB, WGB: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, PLAIN: tl.constexpr = False):
    """`_gemm_kernel` with both int8 operands read by TMA (descriptors built in the kernel): the copy
    engine computes the addresses and zero-fills past M / N, so the K loop holds no pointer tiles or masks and
    the 64 x 128 tile needs fewer registers and issue slots (H200, M = 4096: 721 instead of 880 us).
    Same blocks in the same order: bit-identical to `_gemm_kernel`."""
    m0, n0, offs_m, offs_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_desc = tl.make_tensor_descriptor(qa_ptr, shape=[M, KB * 128], strides=[stride_qa, 1],
                                       block_shape=[BLOCK_M, 128])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, KB * 128], strides=[stride_w, 1],
                                       block_shape=[BLOCK_N, 128])
    # scale rows / columns past the end are clamped rather than masked: they only reach masked-off outputs
    sa_ptrs = as_ptr + tl.minimum(offs_m, M - 1) * stride_as
    sw_ptrs = ws_ptr + tl.minimum(offs_n, N - 1)
    if PLAIN:
        acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for b in range(KB):
            a = a_desc.load([m0, b * 128])
            w = w_desc.load([n0, b * 128])
            acc_i = tl.dot(a, w.T, acc_i, out_dtype=tl.int32)
        acc = acc_i.to(tl.float32) * tl.load(sa_ptrs)[:, None]
        _store_tile(acc, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_out, WGB, HAS_BIAS)
        return
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(KB):
        a = a_desc.load([m0, b * 128])
        w = w_desc.load([n0, b * 128])
        d = tl.dot(a, w.T, out_dtype=tl.int32)
        sa = tl.load(sa_ptrs + b)
        if WGB == 0:
            sw = tl.full(offs_n.shape, 1.0, tl.float32)
        else:
            sw = tl.load(sw_ptrs + (b // WGB) * N)
        acc = _promote(acc, d, sa, sw)
    _store_tile(acc, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, M, N, stride_out, WGB, HAS_BIAS)


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """In-kernel TMA descriptors live in a global scratch buffer that Triton asks an allocator for; install one
    (torch's caching allocator, so CUDA-graph capture works) unless the caller has set their own."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def tma_available(device: torch.device) -> bool:
    """The TMA GEMM runs compiled on Hopper or newer with a Triton that has in-kernel tensor descriptors
    (elsewhere, and in the interpreter, the pointer GEMM runs; the tests call the TMA kernel interpreted)."""
    return (not _INTERPRET and device.type == "cuda" and hasattr(tl, "make_tensor_descriptor")
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _prefill_configs():
    # H200, M = 4096, K = 4096, N = 14336 (experiments/bench_history/probe_int8_prefill_h200.json): 64x128 / 4 warps / 3 stages won
    # (884 us; 128x128 / 8 warps 977 us: one CTA per SM cannot overlap one tile's promotion with another's dots)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, w, st in ((64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3),
                                  (128, 64, 4, 3))]


def _tma_configs():
    # H200, same shape (experiments/bench_history/probe_int8_tma_h200.json): 64x128 / 4 warps / 3 stages 721 us; 4 stages 830,
    # 5 stages 1369 (shared memory per CTA → CTAs per SM), 128x128 / 8 warps 1041, 64x256 / 8 warps 896,
    # 128x64 / 4 warps 988
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, w, st in ((64, 128, 4, 3), (64, 128, 4, 2), (64, 64, 4, 3), (64, 256, 8, 3),
                                  (128, 256, 8, 3), (128, 128, 8, 3))]  # the last two for the PLAIN form


gemm_tuned = triton.autotune(_prefill_configs(), key=["MB", "N", "KB", "WGB", "PLAIN"],
                             do_bench=quick_bench)(_gemm_kernel)
gemm_tma_tuned = triton.autotune(_tma_configs(), key=["MB", "N", "KB", "WGB", "PLAIN"],
                                 do_bench=quick_bench)(_gemm_tma_kernel)

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
                 config: dict | None = None, w_scale: torch.Tensor | None = None,
                 tma: bool | None = None, per_token: bool = False) -> torch.Tensor:
    """(qa int8 [M, Kp], a_scale fp32 [M, G]) × (wt = unpack_weight(w), int8 [N, Kp]) → y [M, N] `out_dtype`.
    `config`: explicit BLOCK_M, BLOCK_N (GROUP_M, num_warps, num_stages) instead of the autotuned choice;
    `tma`: the TMA kernel (None: where `tma_available`); `per_token`: a_scale holds one scale per row (in every
    column), which with a per-channel weight scale selects the kernels' PLAIN (int32-accumulating) form."""
    m = qa.shape[0]
    out = torch.empty(m, w.n, dtype=out_dtype, device=qa.device)
    if m == 0:
        return out
    wgb = (w.group_size // ACT_GROUP) if w.group_size else 0
    plain = per_token and wgb == 0
    ws = scales_f32(w) if w_scale is None else w_scale
    if tma is None:
        tma = tma_available(qa.device)
    args = (qa, a_scale, wt, ws, bias if bias is not None else out, out, m, w.n, w.blocks, qa.stride(0),
            a_scale.stride(0), wt.stride(0), out.stride(0), bucket(m))
    if tma:
        _ensure_allocator()
        kernel, tuned = _gemm_tma_kernel, gemm_tma_tuned
    else:
        kernel, tuned = _gemm_kernel, gemm_tuned
    if config is None:
        tuned[lambda a: (triton.cdiv(m, a["BLOCK_M"]) * triton.cdiv(w.n, a["BLOCK_N"]),)](
            *args, WGB=wgb, HAS_BIAS=bias is not None, PLAIN=plain)
        return out
    c = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, **(config or {})}
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(w.n, c["BLOCK_N"]),)
    kernel[grid](*args, WGB=wgb, HAS_BIAS=bias is not None, PLAIN=plain, **c)
    return out


def prefill_linear_gemm(qa: torch.Tensor, a_scale: torch.Tensor, w: LowbitWeight, bias: torch.Tensor | None,
                        out_dtype: torch.dtype, config: dict | None = None, per_token: bool = False) -> torch.Tensor:
    """`int8_gemm.lowbit_gemm`'s large-M path: unpack into the device workspace, then the GEMM."""
    ws = workspace(qa.device, w.n * w.blocks * ACT_GROUP)[: w.n * w.blocks * ACT_GROUP].view(w.n, -1)
    return prefill_gemm(qa, a_scale, unpack_weight(w, ws), w, bias, out_dtype, config, per_token=per_token)
