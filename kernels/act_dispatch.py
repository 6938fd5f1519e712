"""Kernel dispatch for activation-quantized `QuantLinear`s (FlexQ, COMET, ARCQuant) on CUDA.

`QuantLinear.kernel_key` is "<act format>:<weight format>"; `register_kernels` maps
- "int:int6", "int:int"  → FlexQ W6A6/W6A8 (and INT4-weight A8/A6) through `int8_gemm.lowbit_linear`
                           (per-token activations in groups of 128 channels, int8 tensor cores);
- "fmpq:int"             → COMET: channel gather + per-block INT4/INT8 activations, same GEMM;
- "nvfp4:nvfp4"          → ARCQuant / plain NVFP4 W4A4 through `nvfp4_gemm.arc_linear`.
A forward returns None (QuantLinear then runs its torch reference) when the module is outside what the
kernels serve: activation quantization switched off (calibration), per-token activation groups other
than 128, weight groups the int8 kernels cannot read, or unsupported dtypes. Prepared weights are cached
on the module (`_act_kernel_cache`); the stored buffers are never modified.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.bfloat16, torch.float16)


def _cached(mod, build):
    c = getattr(mod, "_act_kernel_cache", None)
    if c is None or c[0] != mod.weight_in_features:
        c = (mod.weight_in_features, build())
        mod._act_kernel_cache = c
    return c[1]


def int8_forward(mod, x: torch.Tensor) -> torch.Tensor | None:
    from quantkit.kernels.int8_gemm import lowbit_linear, supports
    from quantkit.kernels.int8_reference import ACT_GROUP, prepare_int4, prepare_int6

    act = mod.act
    spec = mod.spec
    if act is None or not act.enabled or x.dtype not in _DTYPES or act.spec.group_size != ACT_GROUP:
        return None
    if not supports(spec.format, spec.bits, spec.group_size):
        return None

    def build():
        packed, k = mod.packed(), mod.weight_in_features
        w = prepare_int6(packed, k, spec.group_size) if spec.format == "int6" else \
            prepare_int4(packed, k, spec.group_size, spec.symmetric)
        if act.spec.format == "fmpq":
            return w, act.block_bits.to(device=x.device, dtype=torch.int32), act.perm.to(x.device, torch.int32)
        return w, act.spec.bits, None

    w, bits, perm = _cached(mod, build)
    return lowbit_linear(x, w, bits, perm, mod.bias)


def nvfp4_forward(mod, x: torch.Tensor) -> torch.Tensor | None:
    from quantkit.kernels.nvfp4_gemm import arc_linear, prepare_arc_weight

    act = mod.act
    if act is None or not act.enabled or x.dtype not in _DTYPES:
        return None

    def build():
        p = mod.packed()
        w = prepare_arc_weight(p["qweight"], p["block_scales"], p["tensor_scale"], mod.in_features, act.residual)
        return w, act.reorder.to(x.device, torch.int32)

    w, ridx = _cached(mod, build)
    return arc_linear(x, ridx, w, mod.bias)
