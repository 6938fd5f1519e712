"""Round-to-nearest: each group's parameters from its own weights, no calibration data."""

from __future__ import annotations

import torch

from quantkit.formats.base import Params, WeightFormat
from quantkit.methods.base import WeightAlgorithm, register_algorithm


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, Params]:
    """weight [N, K] → codes [N, K] and parameters stacked per group [N, groups, ...]."""
    return fmt.quantize_rtn(weight.detach().float())


@register_algorithm
class RTN(WeightAlgorithm):
    """Round-to-nearest in the recipe's format: no data, no statistics."""

    name = "rtn"

    def quantize(self, weight, fmt, stats, act=None, host_factorization=False):
        return rtn_quantize(weight, fmt)
