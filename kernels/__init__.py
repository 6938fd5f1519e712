"""GPU kernels, installed as `quantkit.kernels`, each next to a torch reference of the same math.

- `wq_gemv`    the decode GEMV (M ≤ 2) for uniform-int and HLQ weights in packed half2 arithmetic.
- `wq_gemm`    Triton weight-only GEMM (fused dequant + tl.dot, dequant-to-workspace) and the earlier fp32
               GEMV (path "gemv_f32") for uniform-int and HLQ weights (2/3/4 bits); imports triton.
- `reference`  the torch reference those kernels are tested against (pure torch, any device).
- `dispatch`   QuantLinear hook: repack/caching and the per-M choice of path (imports triton lazily).
- `int8_gemm` (+ `int8_prefill`, `int8_common`), `nvfp4_gemm` (+ `nvfp4_tuning`, `nvfp4_dispatch`), each with
  its `*_reference`: activation-quantized GEMMs (FlexQ/COMET, ARCQuant); `act_dispatch` routes
  activation-quantized QuantLinears to them.
- `triton_common` Triton helpers the GEMMs share (tile order, split-K epilogues and workspace).
- `decode_attention` (+ reference): single-token GQA attention.

`registry.register_kernels(table)` fills `quantkit.nn.quant_linear.KERNELS`; quantkit.nn imports it lazily, on
first use (`quantkit.nn.quant_linear.load_kernels`), never at import. Kernels import `quantkit.formats` /
`quantkit.arc_numerics` (numerics) but not `quantkit.nn`, the pipeline or `quantkit.eval`.
"""

from __future__ import annotations

if __name__ != "quantkit.kernels":  # imported as a bare `kernels` from the repository root
    from quantkit.shadowing import hand_over

    hand_over(__name__, __file__)

