"""COMET's FMPQ: fine-grained mixed-precision activations (INT4 blocks, INT8 blocks for outlier channels).

COMET's calibration code is not public; this is our design (measurements: docs/methods/comet.md and
docs/results/comet_ptb.json).

Statistic. For every input channel c of a Linear, over all calibration tokens t:

    score[c] = max_t |x[t, c]| / rms_t          (rms_t = the token's root-mean-square over channels)

i.e. how far the channel rises above its token's typical magnitude. Per-token normalisation matters
because activations are quantized per token: a channel that is large only on tokens that are large
everywhere does not hurt a 4-bit grid, one that spikes above its own token's level does.

Outliers. A channel is an outlier when score[c] >= `outlier_threshold` (default 8: an INT4 grid with
7 levels per sign keeps a channel at 1/8 of the block's maximum at about one step). Channels are then
permuted in descending score order, so the outliers fill the first ceil(n_outliers / 128) blocks; those
blocks are INT8, the rest INT4 (per token, per block, symmetric: quantkit.formats.act_int). The short last
block that a K not divisible by 128 leaves (the backbone's padding rule) holds the lowest-score channels.
`max_int8_share` caps the INT8 blocks (the highest-score ones stay INT8).

The permutation is applied to the activation in the quantization kernel (a gather; it cannot be folded
into RMSNorm exactly because the residual stream stays in model order) and to the weight columns
offline, so the product is unchanged: x[:, perm] @ W[:, perm]ᵀ = x @ Wᵀ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quantkit.formats.act_int import fake_quant_act_int
from quantkit.nn.act_quant import ActKernelLayout, ActQuantizer, register_act_quantizer
from quantkit.recipe import ActSpec, register_act_format

BLOCK = 128


class ChannelScoreCollector:
    """max over tokens of |x_c| / rms(x_token), per channel."""

    def __init__(self, in_features: int):
        self.score = torch.zeros(in_features, dtype=torch.float32)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        rms = x.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
        self.score = torch.maximum(self.score, (x.abs() / rms).amax(dim=0).cpu())


def plan_blocks(score: torch.Tensor, threshold: float, max_int8_share: float = 1.0, block: int = BLOCK,
                low_bits: int = 4, high_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm int64 [K], block_bits int8 [ceil(K / block)]) from channel scores."""
    k = score.numel()
    perm = torch.argsort(score, descending=True, stable=True)
    n_blocks = math.ceil(k / block)
    outliers = int((score >= threshold).sum())
    n8 = min(math.ceil(outliers / block), math.floor(max_int8_share * n_blocks + 1e-9))
    bits = torch.full((n_blocks,), low_bits, dtype=torch.int8)
    bits[:n8] = high_bits
    return perm, bits


@register_act_quantizer
class FMPQActQuantizer(ActQuantizer):
    """Permute channels, then per-token per-block symmetric INT4/INT8 (block widths from calibration)."""

    format = "fmpq"

    def __init__(self, spec: ActSpec, in_features: int, perm: torch.Tensor | None = None,
                 block_bits: torch.Tensor | None = None):
        super().__init__(spec, in_features)
        g = spec.group_size or BLOCK
        n_blocks = math.ceil(in_features / g)
        self.register_buffer("perm", perm.to(torch.int32) if perm is not None
                             else torch.arange(in_features, dtype=torch.int32))
        self.register_buffer("block_bits", block_bits.to(torch.int8) if block_bits is not None
                             else torch.full((n_blocks,), spec.bits, dtype=torch.int8))

    def kernel_layout(self, device):
        return ActKernelLayout(block_bits=self.block_bits.to(device=device, dtype=torch.int32),
                               perm=self.perm.to(device, torch.int32))

    @classmethod
    def wants_calibration(cls, spec: ActSpec) -> bool:
        return True

    @classmethod
    def collector(cls, spec: ActSpec, linear: nn.Module):
        return ChannelScoreCollector(linear.in_features)

    @classmethod
    def from_calibration(cls, spec: ActSpec, linear: nn.Module, collected) -> ActQuantizer:
        k = linear.in_features
        if collected is None:  # no data: identity order, every block at the base width
            return cls(spec, k)
        q = cls(spec, k, *cls._plan(spec, collected.score))
        q.score = collected.score  # kept in memory (not saved) so a variant spec can re-plan: `with_spec`
        return q

    @classmethod
    def for_speed(cls, spec: ActSpec, in_features: int, outlier_share: float | None = None,
                  generator: torch.Generator | None = None) -> ActQuantizer:
        # default: as many outlier channels as the INT8 cap allows (the demo model's calibration reaches it)
        share = float(spec.option("max_int8_share", 1.0)) if outlier_share is None else outlier_share
        score = torch.zeros(in_features)
        score[torch.randperm(in_features, generator=generator)[: round(share * in_features)]] = math.inf
        return cls(spec, in_features, *cls._plan(spec, score))

    @staticmethod
    def _plan(spec: ActSpec, score: torch.Tensor):
        return plan_blocks(score, float(spec.option("outlier_threshold", 8.0)),
                           float(spec.option("max_int8_share", 1.0)), spec.group_size or BLOCK,
                           spec.bits, int(spec.option("high_bits", 8)))

    def with_spec(self, spec: ActSpec) -> ActQuantizer:
        score = getattr(self, "score", None)
        if score is None:
            raise ValueError("this FMPQ quantizer has no calibration scores (loaded from a checkpoint?)")
        perm, bits = self._plan(spec, score)
        if not torch.equal(perm.to(torch.int32), self.perm.cpu()):
            raise ValueError("the variant spec permutes channels differently from the stored weights")
        q = FMPQActQuantizer(spec, self.in_features, perm, bits).to(self.perm.device)
        q.score = score
        return q

    def extra_state(self) -> dict[str, Any]:
        return {"int8_blocks": int((self.block_bits >= 8).sum()),
                "blocks": int(self.block_bits.numel())}

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.perm.to(device=x.device, dtype=torch.long))

    def transform_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.index_select(1, self.perm.to(device=w.device, dtype=torch.long))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_act_int(x, self.block_bits, self.spec.group_size or BLOCK)

    def int8_share(self) -> float:
        return float((self.block_bits >= 8).float().mean())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int8_blocks={int((self.block_bits >= 8).sum())}/" \
            f"{self.block_bits.numel()}"


register_act_format("fmpq", 4, 8, 16, options=("outlier_threshold", "max_int8_share", "high_bits"))
