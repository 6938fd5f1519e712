"""Runtime modules."""

from quantkit.kernels import register_kernels
from quantkit.nn.act_quant import ACT_QUANTIZERS, ActQuantizer, build_act_quantizer
from quantkit.nn.quant_linear import KERNELS, QuantLinear, set_weight_cache

register_kernels(KERNELS)  # CUDA + triton only; triton itself is imported on the first kernel call

__all__ = ["ACT_QUANTIZERS", "KERNELS", "ActQuantizer", "QuantLinear", "build_act_quantizer", "set_weight_cache"]
