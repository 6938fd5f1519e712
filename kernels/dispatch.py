"""Kernel dispatch for `QuantLinear` (formats "int" and "hlq"): prepare (repack, cache), pick a path by M, launch.

Imports only torch at module level; triton (and `wq_gemm`) is imported on the first call, so CPU-only code
that imports quantkit never loads triton.

Paths, chosen per M by measurement (eval/bench_kernels.py and eval/bench_decode.py on an H200, torch 2.11 /
triton 3.6, weights rotated over > 2.5x L2, CUDA-graph replays; JSON in docs/results/kernels_h200.json):
- M <= GEMV_MAX_M (2):           `wq_gemv._gemv_h2_kernel`, split-K GEMV in packed half2 arithmetic (int4 g128,
                                 4096x14336: 11.8 us vs 14.9 us for the fp32 `_gemv_kernel`, still reachable as
                                 path "gemv_f32", and 26.8 us for the tl.dot kernel). Its cost grows ~linearly
                                 with M (M = 2: 18.5-23.5 us, M = 4: 26-41 us by format) while the tl.dot kernel is
                                 flat in M up to 16 (~26-48 us), so M >= 3 goes to the GEMM.
- GEMV_MAX_M < M < DEQUANT_MIN_M (128): `_gemm_kernel` (dequant in registers + tl.dot, split-K); M = 16: 5.9-26.8 us.
- M >= DEQUANT_MIN_M:            `_dequant_kernel` into a bf16/fp16 workspace, then cuBLAS. It won at M = 128 on
                                 3 of 4 shapes (lost 4096x14336: 76.7 vs 63.7 us, first benchmark) and at
                                 M = 1024 / 4096 on all (M = 4096: ~1.0-1.1x cuBLAS bf16, whose own time moved
                                 614-702 us between runs; the fused tl.dot GEMM ran 2.2-2.4x slower than it).
                                 int4 moves to 256 (`dequant_min_m`): on an H100 (experiments/device/
                                 prefill_gemm_sweep.py, docs/results/prefill_gemm_h100.json) the fused GEMM beat the
                                 workspace at M = 128 on 4 of the 5 fused Llama-3-8B shapes (4096x28672: 168 vs 194
                                 us; lost 4096x4096, 30.5 vs 28.0), while for hlq 2-bit the workspace won all three
                                 shapes measured. From M = 512 the workspace won every shape and format by 1.3-1.9x over
                                 the fused GEMM's best config. The workspace costs the dequantization's write of 2
                                 bytes per weight (at the copy-bandwidth floor: 4096x28672 105 us), so it is ~1.5-1.7x
                                 cuBLAS bf16 at M = 512, ~1.1-1.35x at M = 1024 and ~1.0-1.15x at M = 2048. Its layout
                                 ([K, N] or nn.Linear's [N, K], `DEQUANT_NK`) made no consistent difference.
No weight is repacked for 2/4 bits (the kernels read the stored layout); 3-bit weights are split once into a
2-bit and a 1-bit stream (`prepare`), cached on the module by `prepared_for`, stored buffers untouched.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

GEMV_MAX_M = 2
DEQUANT_MIN_M = 128
DEQUANT_NK = False  # the dequantize-then-cuBLAS path's workspace layout (see `dequant_matmul`)
DEQUANT_MIN_M_BY_FORMAT = {(0, 4): 256}  # (fmt code, bits) -> first M of the workspace path, where measured apart

_FMT_CODE = {"int": 0, "hlq": 1}
ONE = 0x3F800000  # bits of 1.0f, a runtime kernel argument (see wq_gemm._f)


@dataclass
class Prepared:
    """Kernel-ready tensors of one quantized weight (views of the stored buffers, or a 3-bit repack)."""

    fmt: int  # 0 int, 1 hlq
    bits: int
    gs: int  # group size; 0 = per-channel
    k: int
    n: int
    q0: torch.Tensor  # int32 [R0, N]: the stored qweight (2/4 bit) or the low-2-bit stream (3 bit)
    q1: torch.Tensor  # int32 [R1, N]: high-bit stream (3 bit), else q0 again (unused)
    scales: torch.Tensor  # fp16 [G, N] (int) / [G, bits, N] (hlq)
    zeros: torch.Tensor  # uint8 [G, N] (int, asymmetric) / fp16 offsets [G, N] (hlq) / scales (unused)
    has_zero: bool


def supports(fmt: str, bits: int, group_size: int | None) -> bool:
    return fmt in _FMT_CODE and bits in (2, 3, 4) and (group_size is None or group_size % 32 == 0)


def prepare(fmt: str, bits: int, group_size: int | None, k: int, n: int,
            packed: dict[str, torch.Tensor]) -> Prepared:
    """Stored tensors → `Prepared`. 3-bit codes are repacked into a 2-bit + a 1-bit stream (same packing rule),
    so that no code straddles a word; 2/4-bit weights are used in place."""
    from quantkit.formats.packing import pack_codes, unpack_codes

    qw = packed["qweight"]
    if bits == 3:
        kp = qw.shape[0] // 3 * 32
        codes = unpack_codes(qw, 3, kp)  # uint8 [N, kp]
        q0 = pack_codes(codes & 3, 2)
        q1 = pack_codes(codes >> 2, 1)
        del codes
    else:
        q0 = q1 = qw
    scales = packed["scales"].contiguous()
    if fmt == "int":
        zeros = packed.get("zeros")
        has_zero = zeros is not None
        zeros = zeros.contiguous() if has_zero else scales
    else:
        zeros, has_zero = packed["offsets"].contiguous(), False
    return Prepared(_FMT_CODE[fmt], bits, group_size or 0, k, n, q0.contiguous(), q1.contiguous(), scales,
                    zeros, has_zero)


def launch_args(p: Prepared, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """The positional arguments of the weight-only kernels (`wq_gemm`, `wq_gemv`) for x [M, K] → out [M, N]."""
    from quantkit.kernels.triton_common import bucket, workspace

    m = x.shape[0]
    ws, cnt = workspace(x.device, m * p.n, m * p.n // 16 + 1)
    return (x, p.q0, p.q1, p.scales, p.zeros, bias if bias is not None else out, out, ws, cnt,
            m, p.n, p.k, p.q0.shape[0], p.q1.shape[0], x.stride(0), out.stride(0), bucket(m), ONE)


def launch_consts(p: Prepared, bias) -> dict:
    """The compile-time (constexpr) arguments of the weight-only kernels."""
    return {"GS": p.gs, "FMT": p.fmt, "BITS": p.bits, "HAS_ZERO": p.has_zero, "HAS_BIAS": bias is not None}


def _use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch for the decode GEMV (QUANTKIT_PDL=1, Hopper and newer): its launch and
    first weight loads overlap the tail of the kernel before it (in CUDA graphs too, as a programmatic edge).
    Off by default: on an H200 (Llama-3-8B shape, B = 1, CUDA graphs; experiments/bench_history/latency_notes.md) it took the
    decode step from 2.317 to 2.190 ms with an int4 lm_head but slowed it from 2.511 to 2.578 ms with the bf16
    (cuBLAS) lm_head, a slowdown we have not explained."""
    if device.type != "cuda" or os.environ.get("QUANTKIT_PDL", "0") != "1":
        return False
    return _major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.cache
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def gemv(p: Prepared, x: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None):
    """x: [M, K] bf16/fp16 (row-contiguous) → [M, N], split-K GEMV. `config`: explicit meta-parameters
    (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) instead of the autotuned choice (tests, interpreter)."""
    import triton

    from quantkit.kernels import wq_gemm
    from quantkit.kernels.triton_common import set_sms

    m = x.shape[0]
    out = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    args = launch_args(p, x, out, bias)
    if config is None:
        set_sms(x.device)
        grid = lambda a: (triton.cdiv(p.n, a["BLOCK_N"]), a["SPLIT_K"], m)
        wq_gemm.gemv_tuned[grid](*args, **launch_consts(p, bias))
    else:
        c = dict(config)
        c.setdefault("EVEN_K", p.k % (32 * c["RUNS"]) == 0)
        grid = (triton.cdiv(p.n, c["BLOCK_N"]), c["SPLIT_K"], m)
        wq_gemm._gemv_kernel[grid](*args, **launch_consts(p, bias), **c)
    return out


def gemv_h2(p: Prepared, x: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None):
    """x: [M, K] → [M, N] with the half2 split-K GEMV (`wq_gemv.py`); `config` as for `gemv` (BLOCK_N,
    SPLIT_K, num_warps). Under TRITON_INTERPRET the same algorithm runs without its PTX."""
    import triton

    from quantkit.kernels import wq_gemv
    from quantkit.kernels.triton_common import set_sms

    m = x.shape[0]
    out = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    args = launch_args(p, x, out, bias)
    use_asm = os.environ.get("TRITON_INTERPRET") != "1"
    if config is None:
        set_sms(x.device)
        grid = lambda a: (triton.cdiv(p.n, a["BLOCK_N"]), a["SPLIT_K"], m)
        pdl = _use_pdl(x.device) and wq_gemv.gdc_wait is not None
        wq_gemv.gemv_h2_tuned[grid](*args, **launch_consts(p, bias), USE_ASM=use_asm, PDL=pdl, launch_pdl=pdl)
    else:
        c = dict(config)
        c.setdefault("EVEN_K", p.k % 32 == 0)
        c.setdefault("USE_ASM", use_asm)
        grid = (triton.cdiv(p.n, c["BLOCK_N"]), c["SPLIT_K"], m)
        wq_gemv._gemv_h2_kernel[grid](*args, **launch_consts(p, bias), **c)
    return out


def gemm(p: Prepared, x: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None):
    """x: [M, K] → [M, N] with the fused dequant + tl.dot kernel."""
    import triton

    from quantkit.kernels import wq_gemm
    from quantkit.kernels.triton_common import set_sms

    m = x.shape[0]
    out = torch.empty(m, p.n, dtype=x.dtype, device=x.device)
    args = launch_args(p, x, out, bias)

    def grid(a):
        return (triton.cdiv(m, a["BLOCK_M"]) * triton.cdiv(p.n, a["BLOCK_N"]), a["SPLIT_K"])

    if config is None:
        set_sms(x.device)
        fn = wq_gemm.gemm_small_tuned if m <= 64 else wq_gemm.gemm_large_tuned
        fn[grid](*args, **launch_consts(p, bias))
    else:
        c = dict(config)
        c.setdefault("GROUP_M", 1)
        c.setdefault("DOT_F32", os.environ.get("TRITON_INTERPRET") == "1")
        wq_gemm._gemm_kernel[grid(c)](*args, **launch_consts(p, bias), **c)
    return out


def dequant(p: Prepared, dtype: torch.dtype, device: torch.device | None = None,
            block_n: int = 128, block_k: int | None = None, nk: bool = False, num_warps: int = 4,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight transposed, wt: [K, N] in `dtype` (for cuBLAS); `nk`: the weight itself, [N, K]. `out`: a
    contiguous tensor of that shape and dtype to write into (a reused workspace)."""
    import triton

    from quantkit.kernels import wq_gemm

    if block_k is None:
        block_k = min(128, p.gs) if p.gs else 128
    shape = (p.n, p.k) if nk else (p.k, p.n)
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"dequant: out must be a contiguous {dtype} tensor of shape {shape}")
        wt = out
    else:
        wt = torch.empty(*shape, dtype=dtype, device=device or p.q0.device)
    grid = (triton.cdiv(p.n, block_n), triton.cdiv(p.k, block_k))
    wq_gemm._dequant_kernel[grid](p.q0, p.q1, p.scales, p.zeros, wt, p.n, p.k, p.q0.shape[0], p.q1.shape[0], ONE,
                                  GS=p.gs, FMT=p.fmt, BITS=p.bits, HAS_ZERO=p.has_zero, BLOCK_N=block_n,
                                  BLOCK_K=block_k, NK=nk, num_warps=num_warps)
    return wt


def dequant_matmul(p: Prepared, x: torch.Tensor, bias: torch.Tensor | None = None,
                   nk: bool | None = None) -> torch.Tensor:
    """Dequantize into a workspace, then cuBLAS (`nk`: the workspace in nn.Linear's [N, K] layout, the product
    the one the bf16 model runs; default DEQUANT_NK)."""
    if nk if nk is not None else DEQUANT_NK:
        w = dequant(p, x.dtype, x.device, nk=True)
        return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    wt = dequant(p, x.dtype, x.device)
    return torch.addmm(bias.to(x.dtype), x, wt) if bias is not None else x @ wt


def dequant_min_m(p: Prepared) -> int:
    """The first M at which weight `p` goes through the dequantize-then-cuBLAS workspace."""
    return DEQUANT_MIN_M_BY_FORMAT.get((p.fmt, p.bits), DEQUANT_MIN_M)


def choose_path(p: Prepared, m: int) -> str:
    """The path `matmul` takes for M rows of weight `p` (module docstring: the measurements behind it)."""
    return "gemv" if m <= GEMV_MAX_M else ("gemm" if m < dequant_min_m(p) else "dequant")


def matmul(p: Prepared, x: torch.Tensor, bias: torch.Tensor | None = None, path: str | None = None):
    """y = x @ Wᵀ + bias for x: [M, K]; `path` in {None (by M: `choose_path`), "gemv" (half2), "gemv_f32",
    "gemm", "dequant", "dequant_kn", "dequant_nk"}."""
    m = x.shape[0]
    if path is None:
        path = choose_path(p, m)
        if path == "dequant" and x.is_cuda:
            from quantkit.kernels import prefetch

            hit = prefetch.lookup(p)
            if hit is not None:
                return hit[0].matmul(hit[1], p, x, bias)
    if path == "gemv":
        return gemv_h2(p, x, bias)
    if path == "gemv_f32":
        return gemv(p, x, bias)
    if path == "gemm":
        return gemm(p, x, bias)
    if path == "dequant_nk":
        return dequant_matmul(p, x, bias, nk=True)
    if path == "dequant_kn":
        return dequant_matmul(p, x, bias, nk=False)
    return dequant_matmul(p, x, bias)


def prepared_for(module) -> Prepared | None:
    """The module's `Prepared` (built on first use, cached on the module; rebuilt if its buffers change)."""
    fmt = module.fmt
    if not supports(fmt.name, fmt.bits, fmt.group_size):
        return None
    qw = module.qweight
    key = (qw.device, qw.data_ptr(), qw._version, module.scales.data_ptr())
    cached = getattr(module, "_kernel_prepared", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    p = prepare(fmt.name, fmt.bits, fmt.group_size, module.in_features, module.out_features, module.packed())
    module._kernel_prepared = (key, p)
    return p


@torch.library.custom_op("quantkit::wq_matmul", mutates_args=())
def wq_matmul(x: torch.Tensor, q0: torch.Tensor, q1: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              bias: torch.Tensor | None, fmt: int, bits: int, gs: int, k: int, n: int, has_zero: bool) -> torch.Tensor:
    """`matmul` of a `Prepared` weight as one opaque torch op: torch.compile traces a QuantLinear into this
    call (no graph break), so inductor fuses the norm / rotary / activation glue on both sides of it."""
    p = Prepared(fmt, bits, gs, k, n, q0, q1, scales, zeros, has_zero)
    return matmul(p, x, bias)


@wq_matmul.register_fake
def _wq_matmul_fake(x, q0, q1, scales, zeros, bias, fmt, bits, gs, k, n, has_zero):
    return x.new_empty(x.shape[0], n)


def quant_linear_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """`KERNELS` entry: x: [..., K] bf16/fp16 on CUDA → [..., N], or None when the kernels cannot serve.

    Under torch.compile the module's `Prepared` must exist already (any eager forward builds it; the latency
    harness runs the prefill eagerly first): tracing cannot key the cache on buffer pointers, so a module
    never run eagerly falls back to the torch reference, traced."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or x.shape[-1] != module.in_features:
        return None
    compiling = torch.compiler.is_compiling()
    if compiling:
        cached = getattr(module, "_kernel_prepared", None)
        p = cached[1] if cached is not None else None
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            return None
        p = prepared_for(module)
    if p is None:
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, p.n)
    bias = module.bias
    if compiling:
        y = wq_matmul(x2, p.q0, p.q1, p.scales, p.zeros, bias, p.fmt, p.bits, p.gs, p.k, p.n, p.has_zero)
    else:  # eager: the direct call (the op dispatcher's host overhead matters in host-bound eager steps)
        y = matmul(p, x2, bias)
    return y.reshape(*lead, p.n)
