"""Kernel dispatch for activation-quantized `QuantLinear`s (FlexQ, COMET, ARCQuant) on CUDA.

`QuantLinear.kernel_key` is "<act format>:<weight format>"; `registry.register_kernels` maps
- "int:int6", "int:int"  → FlexQ W6A6/W6A8 (and INT4-weight A8/A6) through `int8_gemm.lowbit_linear`
                           (per-token activations in groups of 128 channels, int8 tensor cores);
- "fmpq:int"             → COMET: channel gather + per-block INT4/INT8 activations, same GEMM;
- "nvfp4:nvfp4"          → ARCQuant / plain NVFP4 W4A4 through `nvfp4_gemm.arc_linear`.
A forward returns None (QuantLinear then runs its torch reference) when the module is outside what the
kernels serve: activation quantization switched off (calibration), activation groups other than 128
channels or the whole token (per-token scales: the activation kernel writes the token's one scale into
every group, the GEMM is unchanged), weight groups the int8 kernels cannot read, or unsupported dtypes. Prepared weights are cached
on the module (`_act_kernel_cache`); the stored buffers are never modified.

Under torch.compile each forward is one opaque custom op (`quantkit::lowbit_act_linear`,
`quantkit::arc_act_linear`), like the weight-only `quantkit::wq_matmul`: inductor then fuses the glue around
the Linears instead of breaking the graph at each of them. As there, the prepared weights must exist before
tracing (any eager forward builds them); a module never run eagerly falls back to the traced torch reference.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.bfloat16, torch.float16)


def _cached(mod, build=None):
    """The module's prepared weights; built by `build` when missing or stale. Without `build` (while tracing:
    no new build) a missing or stale cache gives None."""
    c = getattr(mod, "_act_kernel_cache", None)
    if c is None or c[0] != mod.weight_in_features:
        if build is None:
            return None
        c = (mod.weight_in_features, build())
        mod._act_kernel_cache = c
    return c[1]


@torch.library.custom_op("quantkit::lowbit_act_linear", mutates_args=())
def lowbit_act_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      block_bits: torch.Tensor | None, perm: torch.Tensor | None, bias: torch.Tensor | None,
                      act_bits: int, bits: int, k: int, group_size: int, per_token: bool = False) -> torch.Tensor:
    """`int8_gemm.lowbit_linear` as one op (FlexQ: act_bits per layer; COMET: block_bits + perm; per_token:
    one activation scale per token)."""
    from quantkit.kernels.int8_gemm import lowbit_linear
    from quantkit.kernels.int8_reference import LowbitWeight

    w = LowbitWeight(bits, k, qweight.shape[0], qweight, scales, zeros, group_size or None)
    return lowbit_linear(x, w, block_bits if block_bits is not None else act_bits, perm, bias, per_token)


@lowbit_act_linear.register_fake
def _lowbit_act_linear_fake(x, qweight, scales, zeros, block_bits, perm, bias, act_bits, bits, k, group_size,
                            per_token=False):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("quantkit::arc_act_linear", mutates_args=())
def arc_act_linear(x: torch.Tensor, ridx: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                   bias: torch.Tensor | None, sw: float, k: int, s_res: int) -> torch.Tensor:
    """`nvfp4_gemm.arc_linear` as one op."""
    from quantkit.kernels.nvfp4_gemm import ArcWeight, arc_linear

    return arc_linear(x, ridx, ArcWeight(q, s, sw, k, s_res), bias)


@arc_act_linear.register_fake
def _arc_act_linear_fake(x, ridx, q, s, bias, sw, k, s_res):
    return x.new_empty(*x.shape[:-1], q.shape[0])


def int8_forward(mod, x: torch.Tensor) -> torch.Tensor | None:
    from quantkit.kernels.int8_gemm import lowbit_linear, supports
    from quantkit.kernels.int8_reference import ACT_GROUP, prepare_int4, prepare_int6

    act = mod.act
    spec = mod.spec
    if act is None or not act.enabled or x.dtype not in _DTYPES or act.spec.group_size not in (ACT_GROUP, None):
        return None
    if not supports(spec.format, spec.bits, spec.group_size):
        return None
    per_token = act.spec.group_size is None  # one scale per token (e.g. W4A8 / W8A8-style recipes)
    if torch.compiler.is_compiling():
        prepared = _cached(mod)
        if prepared is None:
            return None
        w, bits, perm = prepared
        block_bits, act_bits = (bits, 0) if isinstance(bits, torch.Tensor) else (None, int(bits))
        return lowbit_act_linear(x, w.qweight, w.scales, w.zeros, block_bits, perm, mod.bias, act_bits, w.bits,
                                 w.k, w.group_size or 0, per_token)

    def build():
        packed, k = mod.packed(), mod.weight_in_features
        w = prepare_int6(packed, k, spec.group_size) if spec.format == "int6" else \
            prepare_int4(packed, k, spec.group_size, spec.symmetric)
        layout = act.kernel_layout(x.device)  # the scheme's typed layout (quantkit.nn.act_quant.ActKernelLayout)
        if layout.block_bits is not None:
            return w, layout.block_bits, layout.perm
        return w, layout.bits, None

    w, bits, perm = _cached(mod, build)
    if per_token and (isinstance(bits, torch.Tensor) or perm is not None):
        return None  # per-block widths / a channel order come with 128-channel groups only
    return lowbit_linear(x, w, bits, perm, mod.bias, per_token)


def nvfp4_forward(mod, x: torch.Tensor) -> torch.Tensor | None:
    from quantkit.kernels.nvfp4_gemm import arc_linear, prepare_arc_weight

    act = mod.act
    if act is None or not act.enabled or x.dtype not in _DTYPES:
        return None
    if torch.compiler.is_compiling():
        prepared = _cached(mod)
        if prepared is None:
            return None
        w, ridx = prepared
        return arc_act_linear(x, ridx, w.q, w.s, mod.bias, w.sw, w.k, w.s_res)

    def build():
        p = mod.packed()
        layout = act.kernel_layout(x.device)
        w = prepare_arc_weight(p["qweight"], p["block_scales"], p["tensor_scale"], mod.in_features, layout.residual)
        return w, layout.reorder

    w, ridx = _cached(mod, build)
    return arc_linear(x, ridx, w, mod.bias)
