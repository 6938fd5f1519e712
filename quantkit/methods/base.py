"""The weight-algorithm contract: how a Linear's weight becomes codes + parameters in a format.

An algorithm registers itself under a name (the recipe's `method.name`) and declares:

- `Settings`: a frozen dataclass of its own recipe keys (`method: {name: gptq, damping: 0.01}`), with
  defaults; `validate()` checks their ranges.
- `needs_data`: whether it needs calibration windows.
- `sequential`: whether the pipeline quantizes a layer's sub-blocks (Linears reading one input) in
  execution order, collecting each sub-block's calibration inputs after the earlier ones are quantized
  (default); False collects once, at the layer's last Linear, for all of them.
- `statistics(in_features, device)`: an accumulator with `add(x)` fed with every calibration input of the
  Linears it serves, and `result()`, a float32 mean over the rows it was fed (the pipeline gives each
  calibration window its own accumulator and combines them exactly, for any number of processes); None when
  it collects nothing. Optional on the accumulator: `window_rows(x)` -> (shape, bound, rows(lo, hi)), the
  result of a fresh accumulator fed `x` alone, by row panels, with a bound of its magnitudes (the exact
  sum then never holds it whole: GPTQ's K x K Hessian on a GPU).
- `quantize(weight, fmt, stats, act=..., host_factorization=...)` → (codes, params), the same shapes as
  `fmt.quantize_rtn`.
- `work_bytes(n_out, k, device, host_factorization)`: its temporaries for one Linear (device, host), for the
  streaming pipeline's memory estimate.

The pipeline (quantkit.pipeline, quantkit.offload) only ever calls these; it never names an algorithm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import Params, WeightFormat


@dataclass(frozen=True)
class NoSettings:
    def validate(self) -> None:
        pass


class WeightAlgorithm:
    name: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    needs_data: ClassVar[bool] = False

    def __init__(self, settings: Any = None):
        self.settings = settings if settings is not None else self.Settings()

    @property
    def sequential(self) -> bool:
        return True

    def statistics(self, in_features: int, device: torch.device):
        return None

    def quantize(self, weight: torch.Tensor, fmt: WeightFormat, stats, act=None,
                 host_factorization: bool = False) -> tuple[torch.Tensor, Params]:
        raise NotImplementedError

    def work_bytes(self, n_out: int, k: int, device: torch.device, host_factorization: bool) -> tuple[int, int]:
        """(device, host) bytes of temporaries while quantizing one [n_out, k] weight."""
        return n_out * k * (4 + 8), 0


ALGORITHMS: dict[str, type[WeightAlgorithm]] = {}


def register_algorithm(cls: type[WeightAlgorithm]) -> type[WeightAlgorithm]:
    """Class decorator: make `cls` available as `method: {name: <cls.name>}` in recipes."""
    ALGORITHMS[cls.name] = cls
    return cls


def settings_from_dict(cls: type[WeightAlgorithm], d: dict, typed, where: str = "method") -> Any:
    """`cls.Settings` from a recipe's method mapping (without `name`); `typed(value, type, key, where)`
    converts and checks one value. Unknown keys are the caller's to reject."""
    kw = {}
    for f in dataclasses.fields(cls.Settings):
        if f.name in d:
            kw[f.name] = typed(d[f.name], type(f.default), f.name, where)
    settings = cls.Settings(**kw)
    settings.validate()
    return settings


def algorithm_for(spec) -> WeightAlgorithm:
    """The algorithm object of a recipe's `method` (a `quantkit.recipe.MethodSpec`)."""
    try:
        cls = ALGORITHMS[spec.name]
    except KeyError:
        raise QuantkitError(f"unknown method '{spec.name}': use one of {', '.join(sorted(ALGORITHMS))}") from None
    return cls(spec.settings)
