"""Runtime modules."""

from quantkit.kernels import register_kernels
from quantkit.nn.quant_linear import KERNELS, QuantLinear, set_weight_cache

register_kernels(KERNELS)  # CUDA + triton only; triton itself is imported on the first kernel call

__all__ = ["KERNELS", "QuantLinear", "set_weight_cache"]
