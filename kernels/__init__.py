"""GPU kernels, installed as `quantkit.kernels`, each next to a torch reference of the same math.

- `wq_gemv`    the decode GEMV (M ≤ 2) for uniform-int and HLQ weights in packed half2 arithmetic.
- `wq_gemm`    Triton weight-only GEMM (fused dequant + tl.dot, dequant-to-workspace) and the earlier fp32
               GEMV (path "gemv_f32") for uniform-int and HLQ weights (2/3/4 bits); imports triton.
- `reference`  the torch reference those kernels are tested against (pure torch, any device).
- `dispatch`   QuantLinear hook: repack/caching and the per-M choice of path (imports triton lazily).
- `int8_gemm`, `nvfp4_gemm` (+ `*_reference`): activation-quantized GEMMs (FlexQ/COMET, ARCQuant);
  `act_dispatch` routes activation-quantized QuantLinears to them.

`register_kernels(table)` fills `quantkit.nn.quant_linear.KERNELS`; quantkit.nn calls it on import. It
registers only where CUDA and triton are present, and imports neither triton nor the kernels themselves.
"""

from __future__ import annotations

import importlib.util

if __name__ != "quantkit.kernels":  # imported as a bare `kernels` from the repository root
    from quantkit.shadowing import hand_over

    hand_over(__name__, __file__)


def register_kernels(table: dict) -> bool:
    """Register the Triton forward for formats "int" and "hlq" in `table` when CUDA + triton are present."""
    import torch

    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    from quantkit.kernels.act_dispatch import int8_forward, nvfp4_forward
    from quantkit.kernels.dispatch import quant_linear_forward

    table.setdefault("int", quant_linear_forward)
    table.setdefault("hlq", quant_linear_forward)
    for key in ("int:int6", "int:int", "fmpq:int"):
        table.setdefault(key, int8_forward)
    table.setdefault("nvfp4:nvfp4", nvfp4_forward)
    return True


__all__ = ["register_kernels"]
