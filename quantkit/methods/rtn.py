"""Round-to-nearest: each group's parameters from its own weights, no calibration data."""

from __future__ import annotations

import torch

from quantkit.formats.base import Params, WeightFormat


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, Params]:
    """weight [N, K] → codes [N, K] and parameters stacked per group [N, groups, ...]."""
    return fmt.quantize_rtn(weight.detach().float())
