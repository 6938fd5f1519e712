"""The per-group clip search shared by the `int` and `int6` formats (`clip_search: none | mse | mse_h`).

A format's `fit_at(c)` gives group parameters for its range shrunk by c; `search` tries c on `grid` (c = 1
first), keeping per group the parameters with the smallest `error` (strictly smaller: c = 1 and larger c win
ties, so the search never has a larger group error than the plain rule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import Params, RecipeKey

CLIP_SEARCHES = ("none", "mse", "mse_h")

RECIPE_KEYS = (
    RecipeKey("clip_search", "none", doc="none | mse | mse_h"),
    RecipeKey("clip_min", 0.7, doc="smallest clip factor c, a number in (0, 1]"),
    RecipeKey("clip_steps", 31, doc="number of c values tried, an integer in 1..1000"),
)


def check_options(opts: dict, where: str = "weights", fmt: str = "int6") -> None:
    """Validates the `clip_*` recipe options (one-line QuantkitError naming the key and the valid values)."""
    mode = opts.get("clip_search", "none")
    if mode not in CLIP_SEARCHES:
        raise QuantkitError(f"{where}.clip_search = {mode!r} is unknown for format '{fmt}': use "
                            f"{', '.join(CLIP_SEARCHES)}")
    lo = opts.get("clip_min", 0.7)
    if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not 0 < lo <= 1:
        raise QuantkitError(f"{where}.clip_min = {lo!r} is out of range for format '{fmt}': use a number "
                            "in (0, 1]")
    steps = opts.get("clip_steps", 31)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise QuantkitError(f"{where}.clip_steps = {steps!r} is out of range for format '{fmt}': use an "
                            "integer in 1..1000")


def grid(clip_min: float, clip_steps: int) -> list[float]:
    return torch.linspace(1.0, float(clip_min), clip_steps).tolist()  # c = 1 first


def search(grid: list[float], fit_at: Callable[[float], Params],
           error: Callable[[Params], torch.Tensor]) -> Params:
    """Per group, the parameters of the c in `grid` with the smallest error (all groups at once per
    candidate: memory stays O(w))."""
    p = fit_at(grid[0])
    best = error(p)
    for c in grid[1:]:
        cand = fit_at(c)
        err = error(cand)
        better = err < best  # strict: c = 1 (and larger c) win ties
        p = {k: torch.where(better, cand[k], v) for k, v in p.items()}
        best = torch.where(better, err, best)
    return p
