"""Registration of the GPU kernels in QuantLinear's kernel table (`quantkit.nn.quant_linear.KERNELS`).

Dependency direction: `quantkit.nn` never imports this package at import time. `quantkit.nn.quant_linear.
load_kernels()` imports this module on first use (a QuantLinear forward on CUDA, or a read of
`quantkit.nn.KERNELS`) and hands it the table; nothing here imports `quantkit.nn`. Registration imports
neither triton nor the kernels themselves: the forwards below import them on their first call.
"""

from __future__ import annotations

import importlib.util


def register_kernels(table: dict) -> bool:
    """Register the Triton forwards in `table` (kernel_key → forward(module, x) → y or None) when CUDA and
    triton are present: weight-only formats "int" / "hlq", activation-quantized "int:int6", "int:int",
    "fmpq:int" (int8 tensor cores) and "nvfp4:nvfp4" (ARCQuant). Entries already in `table` are kept."""
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
