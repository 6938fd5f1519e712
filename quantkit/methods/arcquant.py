"""ARCQuant: NVFP4 activations with augmented residual channels (numerics: quantkit.arc_numerics).

Calibration, per quantized Linear input (q/k/v read one input, gate/up one: they get identical statistics
and hence one shared reorder and residual count):

- reorder = ascending sort of the per-channel max |x| over all calibration tokens: outliers come last.
- residual count s: the share of entries above τ = 2^-3 · max, rounded up to a multiple of
  `residual_multiple` (16 by default; the paper's code uses 64), capped at K. Two variants of the max:
    `per_token` (the paper's code): each entry against its own token's max |x|;
    `layer_max` (the paper's text): every entry against the layer-wide max |x| over all calibration tokens.
  The layer variant needs the global max before counting, so entries are binned into a log2 histogram
  (64 bins per octave) and counted above τ at bin resolution (≤ 1.1% off in the threshold).
  `residual_rule` picks the variant (default per_token, the authors' code; docs/methods/arcquant.md).
- `max_residual` (fraction of K, default 1) caps s.

Runtime (fake-quant reference; kernels in quantkit.kernels.nvfp4_gemm):
    x [.., K] → Xr = x[.., reorder] → X' = [NVFP4(Xr) | NVFP4(residual of the last s channels)] (K' = Kp + s)
    y = X' · W'ᵀ, W' = [NVFP4(Wr) | NVFP4(Wr[:, K−s:])]
Kp = K rounded up to 16; its padding columns are zero in X' and W' (so any K works). The weight is stored
by the `nvfp4` weight format over the K' columns; RTN by default, GPTQ optional: it solves for the Kp main
columns with the Hessian of X̃ = Q1 + Q2 scattered onto the outlier channels (the input those weights
effectively meet), and the appended columns are copies of the quantized outlier columns;
`gptq_hessian: float` takes the Hessian over the plain reordered input instead (measured worse still,
docs/methods/arcquant.md).

`residual: false` gives plain NVFP4 W4A4 (recipe nvfp4-rtn): no reorder, no residual channels.

Both variants record the largest |x| over all calibration tokens (`input_amax`, saved in the module's entry):
a static statistic for exporters (compressed-tensors' input_global_scale = 448·6 / input_amax). quantkit's own
runtime keeps its dynamic per-call tensor scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.nvfp4 import BLOCK, compute_tensor_scale, nvfp4_fake_quant
from quantkit.nn.act_quant import ActKernelLayout, ActQuantizer, register_act_quantizer
from quantkit.recipe import ActSpec, register_act_format

RULES = ("per_token", "layer_max")
_BINS_PER_OCTAVE = 64
_LOG2_LO, _LOG2_HI = -64, 64  # |x| outside [2^-64, 2^64) lands in the end bins


class ARCCollector:
    """Per-channel max |x|, per-token threshold counts and a log2 histogram of |x| (layer-max rule)."""

    def __init__(self, in_features: int, rules: tuple[str, ...] = RULES):
        self.k = in_features
        self.rules = rules  # the histogram (the costly part) is only kept for the layer-max rule
        self.chan_max = torch.zeros(in_features)
        self.tokens = 0
        self.above_token = 0
        self.hist = torch.zeros((_LOG2_HI - _LOG2_LO) * _BINS_PER_OCTAVE, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float().abs()
        self.chan_max = torch.maximum(self.chan_max, x.amax(dim=0).cpu())
        tmax = x.amax(dim=-1, keepdim=True)
        self.above_token += int((x > tmax / 8).sum())
        self.tokens += x.shape[0]
        if "layer_max" not in self.rules:
            return
        nz = x[x > 0]
        idx = ((torch.log2(nz) - _LOG2_LO) * _BINS_PER_OCTAVE).floor().clamp(0, self.hist.numel() - 1)
        self.hist += torch.bincount(idx.long().cpu(), minlength=self.hist.numel()).double()

    def ratio(self, rule: str) -> float:
        """Share of entries above τ = max/8 under `rule`."""
        total = max(self.tokens * self.k, 1)
        if rule not in self.rules:
            raise ValueError(f"this collector did not record what the '{rule}' rule needs")
        if rule == "per_token":
            return self.above_token / total
        tau = float(self.chan_max.max()) / 8
        if tau <= 0:
            return 0.0
        b = math.floor((math.log2(tau) - _LOG2_LO) * _BINS_PER_OCTAVE)
        return float(self.hist[b + 1:].sum()) / total  # bins wholly above the threshold's bin

    def residual_channels(self, rule: str, multiple: int = BLOCK, cap: float = 1.0) -> int:
        return _residual_count(self.k, self.ratio(rule), multiple, cap)

    @property
    def amax(self) -> float:
        return float(self.chan_max.max()) if self.k else 0.0


class AmaxCollector:
    """max |x| over every calibration input: all plain NVFP4 activations (no residual channels) calibrate."""

    def __init__(self):
        self._amax = torch.zeros(())

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.numel():
            self._amax = torch.maximum(self._amax, x.detach().abs().amax().float().cpu())

    @property
    def amax(self) -> float:
        return float(self._amax)


def _residual_count(k: int, ratio: float, multiple: int, cap: float) -> int:
    """ratio · K rounded up to `multiple`, capped at cap · K (whole blocks)."""
    s = math.ceil(k * ratio / multiple) * multiple
    limit = (int(cap * k) // BLOCK) * BLOCK
    return max(0, min(s, limit))


# bench latency's made-up layout: s = 256 residual channels at K = 4096, the kernel benchmark's setting
# (the demo model's calibration gives 3-50% per Linear, 14% size-weighted; docs/methods/arcquant.md)
SPEED_OUTLIER_SHARE = 1 / 16


def _residual_settings(spec: ActSpec) -> tuple[bool, str, int, float]:
    use = bool(spec.option("residual", True))
    rule = spec.option("residual_rule", "per_token")
    if rule not in RULES:
        raise QuantkitError(f"activations.residual_rule = '{rule}' is unknown: use one of {', '.join(RULES)}")
    mult = int(spec.option("residual_multiple", BLOCK))
    if mult <= 0 or mult % BLOCK:
        raise QuantkitError(f"activations.residual_multiple = {mult} must be a positive multiple of {BLOCK}")
    return use, rule, mult, float(spec.option("max_residual", 1.0))


@register_act_quantizer
class ARCActQuantizer(ActQuantizer):
    """Reorder + NVFP4 + residual channels; the weight spans Kp + s columns."""

    format = "nvfp4"

    def __init__(self, spec: ActSpec, in_features: int, reorder: torch.Tensor | None = None, residual: int = 0):
        super().__init__(spec, in_features)
        if spec.group_size != BLOCK:
            raise QuantkitError(f"activations.group_size = {spec.group_size}: NVFP4 blocks are {BLOCK} channels; "
                                f"set group_size: {BLOCK}")
        self.gptq_hessian = spec.option("gptq_hessian", "quantized")
        if self.gptq_hessian not in ("quantized", "float"):
            raise QuantkitError(f"activations.gptq_hessian = '{self.gptq_hessian}' is unknown: use 'quantized' "
                                f"or 'float'")
        if residual % BLOCK or not 0 <= residual <= in_features:
            raise QuantkitError(f"ARCQuant residual channels = {residual} must be a multiple of {BLOCK} in "
                                f"[0, {in_features}]")
        self.residual = int(residual)
        self.input_amax: float | None = None  # max |x| over the calibration inputs (for exporters)
        self.kp = -(-in_features // BLOCK) * BLOCK
        self.register_buffer("reorder", reorder.to(torch.int32) if reorder is not None
                             else torch.arange(in_features, dtype=torch.int32))

    @property
    def weight_in_features(self) -> int:
        return self.kp + self.residual

    def kernel_layout(self, device):
        return ActKernelLayout(bits=int(self.spec.bits), reorder=self.reorder.to(device, torch.int32),
                               residual=self.residual)

    @classmethod
    def wants_calibration(cls, spec: ActSpec) -> bool:
        _residual_settings(spec)  # (checks the keys)
        return True  # the reorder and residual count, or at least the activation amax

    @classmethod
    def collector(cls, spec: ActSpec, linear: nn.Module):
        use, rule, _, _ = _residual_settings(spec)
        return ARCCollector(linear.in_features, (rule,)) if use else AmaxCollector()

    @classmethod
    def from_calibration(cls, spec: ActSpec, linear: nn.Module, collected) -> ActQuantizer:
        use, rule, mult, cap = _residual_settings(spec)
        if use and isinstance(collected, ARCCollector):
            reorder = torch.argsort(collected.chan_max, stable=True)
            q = cls(spec, linear.in_features, reorder, collected.residual_channels(rule, mult, cap))
            q.collected = collected  # in memory only: lets quantkit.eval.act_variants re-plan under another rule
        else:
            q = cls(spec, linear.in_features)
        if collected is not None:
            q.input_amax = collected.amax
        return q

    @classmethod
    def for_speed(cls, spec: ActSpec, in_features: int, outlier_share: float | None = None,
                  generator: torch.Generator | None = None) -> ActQuantizer:
        use, _, mult, cap = _residual_settings(spec)
        if not use:
            return cls(spec, in_features)
        share = SPEED_OUTLIER_SHARE if outlier_share is None else outlier_share
        return cls(spec, in_features, torch.randperm(in_features, generator=generator),
                   _residual_count(in_features, share, mult, cap))

    def with_spec(self, spec: ActSpec) -> ActQuantizer:
        c = getattr(self, "collected", None)
        q = type(self).from_calibration(spec, nn.Linear(self.in_features, 1, bias=False, device="meta"), c)
        q.input_amax = self.input_amax
        return q

    def extra_state(self) -> dict[str, Any]:
        e = {"residual_channels": self.residual, "bits_per_activation": round(4.5 * (self.kp + self.residual)
                                                                     / self.in_features, 4)}
        if self.input_amax is not None:
            e["input_amax"] = self.input_amax  # an fp32 value: exact as a JSON float
        return e

    @classmethod
    def from_entry(cls, spec: ActSpec, in_features: int, extra: dict[str, Any]) -> ActQuantizer:
        q = cls(spec, in_features, None, int(extra.get("residual_channels", 0)))
        amax = extra.get("input_amax")
        q.input_amax = None if amax is None else float(amax)
        return q

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        idx = self.reorder.to(device=t.device, dtype=torch.long)
        tr = t.index_select(-1, idx)
        pad = self.kp - self.in_features
        parts = [tr]
        if pad:
            parts.append(tr.new_zeros(*tr.shape[:-1], pad))
        if self.residual:
            parts.append(tr[..., self.in_features - self.residual:])
        return torch.cat(parts, dim=-1) if len(parts) > 1 else tr

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._gather(x)

    def transform_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self._gather(w)

    # GPTQ (beyond the paper) solves for the Kp main columns only; the appended ones are copies of the
    # quantized outlier columns. Then y = Q1·Ŵᵀ + Q2·Ŵ[:, out]ᵀ = X̃·Ŵᵀ with X̃ = Q1 + Q2 scattered back onto
    # the outlier channels, so X̃ is the input GPTQ's Hessian is taken over. (Measured on the demo model:
    # 74.7 PTB, vs 73.0 solving for all Kp + s columns and 65.3 with RTN weights: GPTQ still hurts here,
    # see docs/methods/arcquant.md.)
    @property
    def gptq_in_features(self) -> int:
        return self.kp

    def gptq_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, : self.kp]

    def hessian_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.gptq_hessian == "float":  # the plain reordered input, as weight-only GPTQ sees it
            return self.transform_input(x)[..., : self.kp]
        q = self.quantize_input(self.transform_input(x))
        if not self.residual:
            return q
        k, s = self.in_features, self.residual
        main = q[..., : self.kp].clone()
        main[..., k - s : k] += q[..., self.kp :]
        return main

    def complete_gptq(self, codes: torch.Tensor, params: dict, fmt) -> tuple[torch.Tensor, dict]:
        if not self.residual:
            return codes, params
        k, s = self.in_features, self.residual
        if (k - s) % BLOCK == 0:  # the outlier columns are whole blocks: copy their codes and scales
            g0, g1 = (k - s) // BLOCK, k // BLOCK
            return (torch.cat([codes, codes[:, k - s : k]], dim=1),
                    {key: torch.cat([v, v[:, g0:g1]], dim=1) for key, v in params.items()})
        # blocks straddle the outlier range (K % 16 != 0): re-block the dequantized columns (same tensor scale)
        c2, p2 = fmt.quantize_rtn(fmt.dequantize_grouped(codes, params)[:, k - s : k])
        return torch.cat([codes, c2], dim=1), {key: torch.cat([params[key], p2[key]], dim=1) for key in params}

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x: transformed [.., Kp + s]. One dynamic tensor scale per call (over every entry of x)."""
        main = x[..., : self.kp]
        s = compute_tensor_scale(main.float())
        q1 = nvfp4_fake_quant(main.float(), s)
        if not self.residual:
            return q1.to(x.dtype)
        k = self.in_features
        r = x[..., self.kp:].float() - q1[..., k - self.residual : k]
        return torch.cat([q1, nvfp4_fake_quant(r, s)], dim=-1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"format=nvfp4, residual={self.residual}, K'={self.weight_in_features}"


register_act_format("nvfp4", 4, 4, 16, options=("residual", "residual_rule", "residual_multiple", "max_residual",
                                               "gptq_hessian"))
