"""The weight-format interface every quantization method (RTN, GPTQ, ...) works through.

A format turns float weights into integer codes plus per-group parameters and back, exactly:

    params = fmt.fit(w)                 # w: [..., g] float32, the weights of one group per leading index
    codes  = fmt.quantize(w, params)    # [..., c] int64, any c columns of that group
    w_hat  = fmt.dequantize(codes, params)

`params` is a dict of float32 tensors whose leading dims match `w`'s (one entry per group). Parameters are
rounded to their storage dtype inside `fit`, so the values GPTQ quantizes against are the values saved.
`pack` / `unpack` convert (codes [N, K], params stacked per group [N, G, ...]) to the tensors stored in a
checkpoint and held by the runtime module. Group-size padding rule (docs/format.md): groups run along K from
column 0; when the group size does not divide K, the last group is short. Parameters are fitted on its real
columns only; in packed form K is padded with zero codes up to a whole number of groups (and of 32-code
runs) and consumers pad activations with zeros, so padding never contributes to a product.

The contract: every format class also *declares*, in one place,

- its recipe keys: `bits_range`, `min_group_size` and `recipe_keys` (its own keys with their defaults and,
  where they are a few names, their valid values), plus `check_options` for other value checks. Registering
  the class hands them to the recipe validator (`quantkit.recipe.register_format_limits`), and `from_spec`
  builds the format from a recipe `WeightSpec` with those defaults;
- its stored tensors: `packed_tensors(out_features, in_features)` → {name: TensorSpec(shape, dtype)}, exactly
  what `pack` returns for that Linear, in that order (`quantkit.formats.packed_tensors(spec, n, k)` for a
  recipe spec). The checkpoint loader's checks, the save-time check and the streaming pipeline's size
  estimate read it (through quantkit.checkpoint.packed_names), and `bits_per_weight` counts it;
- `example_specs()`: a few recipe specs it accepts, which tests/test_contracts.py runs through
  pack → unpack → dequantize → QuantLinear → save → load, so a new registered format is tested by adding it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

Params = dict[str, torch.Tensor]


class TensorSpec(NamedTuple):
    """One stored tensor of a packed Linear: its shape (a tuple of ints) and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class RecipeKey:
    """A format-specific recipe key (`weights: {format: hlq, fit: adam}`): its name, the value used when the
    recipe leaves it out, and `choices`: the valid values, checked when the recipe is read (None: any value
    the format's `check_options` / constructor accepts, described in `doc`)."""

    name: str
    default: Any = None
    choices: tuple | None = None
    doc: str = ""


class WeightFormat(ABC):
    name: ClassVar[str]
    # ---- recipe declaration: what `weights:` may say for this format (read by quantkit.recipe) ----
    bits_range: ClassVar[tuple[int, int]]  # (min, max) bits, inclusive
    min_group_size: ClassVar[int]  # smallest group size; per-channel (group_size None) is always accepted
    recipe_keys: ClassVar[tuple[RecipeKey, ...]] = ()  # its own keys, beyond format/bits/group_size/symmetric

    @classmethod
    def check_options(cls, options: dict[str, Any], where: str) -> None:
        """Validate the values of this format's `recipe_keys` (beyond `choices`) when the recipe is read;
        raise a one-line QuantkitError naming `where`.<key>. Default: nothing more to check."""
        return None

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {k.name: k.default for k in cls.recipe_keys}

    @classmethod
    def from_spec(cls, spec) -> WeightFormat:
        """The format object for a recipe `WeightSpec`: its bits / group size / symmetric and its own keys,
        the declared defaults where the spec leaves a key out."""
        opts = {key: spec.option(key, default) for key, default in cls.option_defaults().items()}
        return cls(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric, **opts)

    @classmethod
    @abstractmethod
    def example_specs(cls) -> tuple:
        """A few recipe `WeightSpec`s this format accepts, covering its variants (for the contract tests)."""

    # ---- storage declaration ----

    @abstractmethod
    def packed_tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes of the tensors `pack` returns (and a QuantLinear stores, and a checkpoint
        holds under `<module>.<name>`) for an [out_features, in_features] weight, in `pack`'s order."""

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """Stored bytes of one [out_features, in_features] weight (from the declaration)."""
        decl = self.packed_tensors(out_features, in_features)
        return sum(math.prod(t.shape) * t.dtype.itemsize for t in decl.values())

    def __init__(self, bits: int, group_size: int | None):
        self.bits = bits
        self.group_size = group_size  # None = one group per output row (per-channel)

    def groups(self, k: int) -> int:
        g = self.group_size or k
        return -(-k // g)

    def padded_k(self, k: int) -> int:
        g = self.group_size or k
        return self.groups(k) * g

    def group_bounds(self, k: int) -> list[tuple[int, int]]:
        g = self.group_size or k
        return [(s, min(s + g, k)) for s in range(0, k, g)]

    def pad_codes(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """Zero-pad codes [N, K] along K to a whole number of groups (the packed K)."""
        kp = self.padded_k(k)
        return torch.nn.functional.pad(codes, (0, kp - codes.shape[1])) if kp > codes.shape[1] else codes

    def bind(self, weights) -> WeightFormat:
        """The format to quantize `weights` with when they must share any whole-matrix parameter: the
        (transformed) weights of the Linears of one sub-block with this scheme, which read one input and which
        serving engines fuse into one matrix (q/k/v, gate/up). The pipeline calls it once per such group, one
        matrix for a Linear alone. Formats with per-group parameters only: self (the default); NVFP4 binds its
        tensor scale."""
        return self

    # fit / quantize / dequantize work on any leading dims: w [..., g] with params [..., (extra)]
    @abstractmethod
    def fit(self, w: torch.Tensor) -> Params: ...

    @abstractmethod
    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor: ...

    @abstractmethod
    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor: ...

    @abstractmethod
    def pack(self, codes: torch.Tensor, params: Params, k: int) -> dict[str, torch.Tensor]:
        """codes: [N, K] int, params: {name: [N, groups, ...]} → tensors to store."""

    @abstractmethod
    def unpack(self, packed: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, Params]: ...

    # ---- whole-matrix helpers built from the per-group primitives ----

    def quantize_rtn(self, w: torch.Tensor) -> tuple[torch.Tensor, Params]:
        """Round-to-nearest over all groups at once. w: [N, K] → codes [N, K], params [N, groups, ...]."""
        n, k = w.shape
        g = self.group_size or k
        full = k // g
        codes, parts = [], []
        if full:
            wf = w[:, : full * g].reshape(n, full, g).float()
            p = self.fit(wf)
            codes.append(self.quantize(wf, p).reshape(n, full * g))
            parts.append(p)
        if full * g < k:  # the short last group is fitted on its real columns only
            wl = w[:, full * g :].unsqueeze(1).float()
            p = self.fit(wl)
            codes.append(self.quantize(wl, p).reshape(n, k - full * g))
            parts.append(p)
        params = {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}
        return torch.cat(codes, dim=1), params

    def dequantize_grouped(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """codes [N, K] with params [N, groups, ...] → float32 [N, K] (all groups in one call)."""
        n, k = codes.shape
        g = self.group_size or k
        c = self.pad_codes(codes, k).reshape(n, self.groups(k), g)
        return self.dequantize(c, params).reshape(n, -1)[:, :k]

    def bits_per_weight(self, k: int, n: int) -> float:
        """Stored bits per real weight, parameters included (from the declared packed tensors)."""
        return self.packed_bytes(n, k) * 8 / (n * k)


FORMATS: dict[str, type[WeightFormat]] = {}


def register_format(cls: type[WeightFormat]) -> type[WeightFormat]:
    """Class decorator: make `cls` the recipe format `cls.name`, and hand its recipe declaration (bits range,
    minimum group size, its own keys and their valid values, `check_options`) to the recipe validator."""
    from quantkit.recipe import register_format_limits

    FORMATS[cls.name] = cls
    lo, hi = cls.bits_range
    check = cls.check_options if cls.check_options.__func__ is not WeightFormat.check_options.__func__ else None
    register_format_limits(cls.name, lo, hi, cls.min_group_size, options=tuple(k.name for k in cls.recipe_keys),
                           choices={k.name: tuple(k.choices) for k in cls.recipe_keys if k.choices is not None},
                           check=check)
    return cls
