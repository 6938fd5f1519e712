"""Runtime modules."""

from quantkit.nn.quant_linear import KERNELS, QuantLinear, set_weight_cache

__all__ = ["KERNELS", "QuantLinear", "set_weight_cache"]
