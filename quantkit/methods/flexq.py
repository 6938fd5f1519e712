"""FlexQ's layer-wise activation precision search: which Linears keep 8-bit inputs (the rest 6-bit).

The paper describes a sensitivity analysis; its code hard-codes down_proj to A8. Here the damage is
measured. For every quantized Linear, over its calibration inputs X (and its float weight W):

    e_b   = ‖(Q_b(X) − X) Wᵀ‖²        (output error of b-bit activations, per-token per-group quantization)
    score = (e_low − e_high) / ‖X Wᵀ‖²   ("rel_output"; default)  or  e_low − e_high  ("abs_output")

i.e. how much output error the higher precision removes, relative to the output's energy. After all layers
are quantized, the `a8_budget` Linears with the largest scores (a fraction of the quantized Linears when
< 1, a count when >= 1) get `high_bits` (8) activations; the choice and each score are recorded in the
checkpoint (`quantization_config.modules[...].act`) and shown by `quantkit inspect`.

Activation precision is dynamic (no stored activation parameters), so the choice can be made after the
weights: the calibration pass propagates weight-quantized, activation-float layer outputs.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.act_int import fake_quant_act_int
from quantkit.recipe import ActSpec

METRICS = ("rel_output", "abs_output")


def search_enabled(spec: ActSpec) -> bool:
    return parse_budget(spec.option("a8_budget", 0)) > 0


class SensitivityCollector:
    """Accumulates e_low, e_high and the output energy of one Linear over its calibration inputs."""

    def __init__(self, spec: ActSpec, linear: nn.Module):
        metric = spec.option("sensitivity", "rel_output")
        if metric not in METRICS:
            raise QuantkitError(f"activations.sensitivity = '{metric}' is unknown: use one of {', '.join(METRICS)}")
        self.metric = metric
        self.low, self.high = spec.bits, int(spec.option("high_bits", 8))
        self.group = spec.group_size
        self.weight = linear.weight
        self.e_low = self.e_high = self.energy = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        w = self.weight.float()
        g = self.group or x.shape[-1]
        self.energy += float((x @ w.t()).square().sum())
        self.e_low += float(((fake_quant_act_int(x, self.low, g) - x) @ w.t()).square().sum())
        self.e_high += float(((fake_quant_act_int(x, self.high, g) - x) @ w.t()).square().sum())

    def score(self) -> float:
        gain = self.e_low - self.e_high
        return gain / max(self.energy, 1e-30) if self.metric == "rel_output" else gain


def parse_budget(budget) -> Fraction:
    """a8_budget: a count (>= 1), a fraction (< 1), or a string fraction such as "1/7"."""
    try:
        b = Fraction(str(budget))
    except (ValueError, ZeroDivisionError):
        raise QuantkitError(f"activations.a8_budget = {budget!r} is not a number or a fraction like '1/7'") \
            from None
    if b < 0:
        raise QuantkitError(f"activations.a8_budget = {budget} must be >= 0 (a fraction < 1 or a count)")
    return b


def budget_count(budget, n_modules: int) -> int:
    b = parse_budget(budget)
    return int(b) if b >= 1 else math.floor(b * n_modules)


def _choose(scores: dict[str, float], budget: float) -> list[str]:
    k = budget_count(budget, len(scores))
    return sorted(scores, key=lambda n: scores[n], reverse=True)[:k]


def select_high_precision_entries(entries: dict[str, dict]) -> list[str]:
    """The same choice on `quantization_config.modules` entries (the streaming pipeline's finalize)."""
    scored = {n: e for n, e in entries.items()
              if (e.get("act") or {}).get("format") == "int" and parse_budget(e["act"].get("a8_budget") or 0) > 0
              and e["act"].get("sensitivity") is not None}
    if not scored:
        return []
    budget = next(iter(scored.values()))["act"]["a8_budget"]
    chosen = _choose({n: float(e["act"]["sensitivity"]) for n, e in scored.items()}, budget)
    for n in chosen:
        act = scored[n]["act"]
        act["bits"] = int(act.get("high_bits", 8))
    return chosen


def select_high_precision(modules: dict[str, nn.Module]) -> list[str]:
    """Give the highest-scoring searched Linears `high_bits` activations, in place. Returns their names.

    modules: name -> QuantLinear. Only modules whose act spec enables the search take part; the budget
    (from their spec) counts them.
    """
    searched = {n: m for n, m in modules.items()
                if getattr(m, "act", None) is not None and m.act.spec.format == "int" and search_enabled(m.act.spec)
                and m.act.sensitivity is not None}
    if not searched:
        return []
    spec = next(iter(searched.values())).act.spec
    ranked = _choose({n: m.act.sensitivity for n, m in searched.items()}, spec.option("a8_budget"))
    for n in ranked:
        act = searched[n].act
        act.spec = dataclasses.replace(act.spec, bits=int(act.spec.option("high_bits", 8)))
    return ranked
