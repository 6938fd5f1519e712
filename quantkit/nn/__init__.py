"""Runtime modules.

`KERNELS` (QuantLinear's kernel table) is filled lazily: the GPU kernels register themselves on the first CUDA
forward of a QuantLinear, or when `quantkit.nn.KERNELS` is read (`quant_linear.load_kernels`); importing
quantkit.nn imports neither `quantkit.kernels` nor triton.
"""

from quantkit.nn.act_quant import ACT_QUANTIZERS, ActKernelLayout, ActQuantizer, build_act_quantizer
from quantkit.nn.quant_linear import QuantLinear, load_kernels, set_weight_cache


def __getattr__(name: str):
    if name == "KERNELS":  # the table, with the kernels registered (CUDA + triton only)
        return load_kernels()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ACT_QUANTIZERS", "KERNELS", "ActKernelLayout", "ActQuantizer", "QuantLinear", "build_act_quantizer", "load_kernels",
           "set_weight_cache"]
