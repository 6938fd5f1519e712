"""Weight algorithms (RTN, GPTQ) behind the contract in `quantkit.methods.base`, and the activation-side
methods (ARCQuant, COMET, FlexQ) that register activation schemes (see quantkit.nn.act_quant)."""

from quantkit.methods.base import (
           ALGORITHMS,
           WeightAlgorithm,
           algorithm_for,
           register_algorithm,
           settings_from_dict,
)
from quantkit.methods.gptq import GPTQ, HessianAccumulator, gptq_quantize
from quantkit.methods.rtn import RTN, rtn_quantize

__all__ = ["ALGORITHMS", "GPTQ", "RTN", "HessianAccumulator", "WeightAlgorithm", "algorithm_for", "gptq_quantize",
           "register_algorithm", "rtn_quantize", "settings_from_dict"]
