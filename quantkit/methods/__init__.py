"""Quantization methods. Weight-only methods turn (weight, statistics, format) into (codes, params)."""

from quantkit.methods.gptq import HessianAccumulator, gptq_quantize
from quantkit.methods.rtn import rtn_quantize

__all__ = ["HessianAccumulator", "gptq_quantize", "rtn_quantize"]
