"""Recipes: YAML presets validated into dataclasses.

A recipe says which Linear modules of the decoder get which weight scheme and which method quantizes them::

    name: gptq-w4g128
    description: GPTQ, 4-bit asymmetric integer weights, groups of 128
    method: {name: gptq, damping: 0.01, block_size: 128, act_order: false}
    weights: {format: int, bits: 4, group_size: 128, symmetric: false}
    targets: ["*"]          # module-name patterns inside the decoder layers (glob, or "re:<regex>")
    ignore: []              # patterns left in full precision (lm_head and embeddings are never touched)
    overrides:              # later entries win; keys merge over `weights`
      - {match: ["*.down_proj"], weights: {bits: 8}}

`quantkit recipes` lists the shipped ones; `--recipe NAME` finds them, a path to a .yaml works too.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class WeightSpec:
    """How one Linear's weights are stored. group_size None = per output channel."""

    format: str = "int"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # format-specific settings (e.g. HLQ fitting), hashable

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def to_dict(self) -> dict[str, Any]:
        d = {"format": self.format, "bits": self.bits, "group_size": self.group_size,
             "symmetric": self.symmetric}
        d.update(dict(self.options))
        return d


@dataclass(frozen=True)
class ActSpec:
    """How one Linear's input activations are quantized online (dynamic; per token unless the format says).

    group_size None = one group per token. `options` holds the act format's extra settings (e.g. the FlexQ
    sensitivity search budget), hashable.
    """

    format: str = "int"
    bits: int = 8
    group_size: int | None = 128
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def to_dict(self) -> dict[str, Any]:
        d = {"format": self.format, "bits": self.bits, "group_size": self.group_size}
        d.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.options})
        return d


@dataclass(frozen=True)
class MethodSpec:
    """The recipe's weight algorithm: its registered name and its own settings (a dataclass declared by the
    algorithm, see quantkit.methods.base)."""

    name: str = "rtn"
    settings: Any = None  # the algorithm's Settings; None = its defaults

    def to_dict(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.settings) if self.settings is not None else {}
        return {"name": self.name, **RECORDED_METHOD_KEYS, **settings}


# Checkpoints (format_version 1) record a recipe's method with these keys; an algorithm without one of them
# records this value. Reading such a record back accepts them at exactly these values.
RECORDED_METHOD_KEYS: dict[str, Any] = {"damping": 0.01, "block_size": 128, "act_order": False,
                                        "true_sequential": True, "sink_weight": 1.0}


@dataclass(frozen=True)
class Override:
    match: tuple[str, ...]
    weights: dict[str, Any]
    activations: dict[str, Any] | None = None  # merged over the recipe's `activations`


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    method: MethodSpec = field(default_factory=MethodSpec)
    weights: WeightSpec = field(default_factory=WeightSpec)
    activations: ActSpec | None = None  # None: weight-only (activations stay in the model dtype)
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    kv_cache: dict[str, Any] | None = None  # {format: int4, group_size: G, rotate: bool}: quantized KV cache (quantkit.kvcache)

    def scheme_for(self, module_name: str) -> WeightSpec | None:
        """The weight spec of a decoder Linear, or None when it stays in full precision."""
        if not any(match_pattern(p, module_name) for p in self.targets):
            return None
        if any(match_pattern(p, module_name) for p in self.ignore):
            return None
        spec = self.weights
        for ov in self.overrides:
            if any(match_pattern(p, module_name) for p in ov.match):
                spec = weights_from_dict({**spec.to_dict(), **ov.weights}, where=f"override {ov.match}")
        return spec

    def act_scheme_for(self, module_name: str) -> ActSpec | None:
        """The activation spec of a targeted decoder Linear (None: its input is not quantized)."""
        if self.activations is None or self.scheme_for(module_name) is None:
            return None
        spec = self.activations
        for ov in self.overrides:
            if ov.activations and any(match_pattern(p, module_name) for p in ov.match):
                spec = acts_from_dict({**spec.to_dict(), **ov.activations}, where=f"override {ov.match}")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description,
            "method": self.method.to_dict(), "weights": self.weights.to_dict(),
            "activations": self.activations.to_dict() if self.activations else None,
            "targets": list(self.targets), "ignore": list(self.ignore), "kv_cache": self.kv_cache,
            "overrides": [{"match": list(o.match), "weights": o.weights,
                           **({"activations": o.activations} if o.activations else {})}
                          for o in self.overrides],
        }


def match_pattern(pattern: str, name: str) -> bool:
    """`re:<regex>` (full match), else a glob that may match the whole name or a trailing part of it."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


# ---------------------------------------------------------------- validation

_FORMAT_LIMITS = {  # format -> (min bits, max bits, min group size, format-specific option names)
    "int": (2, 8, 8, ()),
}
_FORMAT_CHOICES: dict[str, dict[str, tuple]] = {}  # format -> {option: its allowed values}


_FORMAT_CHECKS: dict[str, Any] = {}  # format -> fn(options: dict, where: str) raising QuantkitError


def register_format_limits(name: str, min_bits: int, max_bits: int, min_group: int, options=(),
                           choices: dict[str, tuple] | None = None, check=None) -> None:
    """Formats added by later modules declare their valid ranges and extra recipe keys here. `choices` lists
    the allowed values of options that take one of a few names; `check` (optional) validates the options'
    values otherwise: either way a bad value fails at once with one line when the recipe is read, not after
    the model has been loaded and calibrated."""
    _FORMAT_LIMITS[name] = (min_bits, max_bits, min_group, tuple(options))
    _FORMAT_CHOICES[name] = dict(choices or {})
    if check is not None:
        _FORMAT_CHECKS[name] = check


def _unknown_key(key: str, valid, where: str) -> QuantkitError:
    near = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    return QuantkitError(f"unknown recipe key '{key}' in {where}{hint}")


def _check_keys(d: dict, valid, where: str) -> None:
    if not isinstance(d, dict):
        raise QuantkitError(f"recipe section '{where}' must be a mapping, got {type(d).__name__}")
    for k in d:
        if k not in valid:
            raise _unknown_key(str(k), valid, where)


def _typed(value, typ, key: str, where: str):
    if typ is bool:
        if not isinstance(value, bool):
            raise QuantkitError(f"recipe key '{key}' in {where} must be true or false, got {value!r}")
        return value
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise QuantkitError(f"recipe key '{key}' in {where} must be an integer, got {value!r}")
    if typ is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise QuantkitError(f"recipe key '{key}' in {where} must be a number, got {value!r}")
    return typ(value)


def _bits_and_group(d: dict, where: str, what: str, default_bits: int, limits: tuple[int, int, int],
                    whole: str, whole_means: str) -> tuple[int, int | None]:
    """`bits` and `group_size` of a weights / activations section, checked against a format's limits;
    group_size None (also -1, `whole`, `per-<whole>`) = one group per row / token."""
    lo, hi, min_group = limits
    bits = _typed(d.get("bits", default_bits), int, "bits", where)
    if not lo <= bits <= hi:
        raise QuantkitError(f"{where}.bits = {bits} is out of range for {what}: use {lo}..{hi}")
    gs = d.get("group_size", 128)
    if gs in (None, -1, whole, f"per-{whole}"):
        return bits, None
    gs = _typed(gs, int, "group_size", where)
    if gs < min_group:
        raise QuantkitError(f"{where}.group_size = {gs} is out of range for {what}: use >= {min_group}, "
                            f"or '{whole}' for {whole_means}")
    return bits, gs


def weights_from_dict(d: dict, where: str = "weights") -> WeightSpec:
    fmt = d.get("format", "int")
    # format modules register their limits and options on import; "int" is seeded above without its
    # options, so import them whatever the format name
    import quantkit.formats  # noqa: F401
    if fmt not in _FORMAT_LIMITS:
        raise _unknown_key(str(fmt), _FORMAT_LIMITS, f"{where}.format (a weight format)")
    lo, hi, min_group, opts = _FORMAT_LIMITS[fmt]
    _check_keys(d, {"format", "bits", "group_size", "symmetric", *opts}, where)
    bits, gs = _bits_and_group(d, where, f"format '{fmt}'", 4, (lo, hi, min_group), "channel",
                               "one group per output row")
    sym = _typed(d.get("symmetric", False), bool, "symmetric", where)
    for k, allowed in _FORMAT_CHOICES.get(fmt, {}).items():
        if k in d and d[k] not in allowed:
            raise QuantkitError(f"{where}.{k} = {d[k]!r} is unknown for format '{fmt}': use one of "
                                f"{', '.join(map(str, allowed))}")
    options = tuple(sorted((k, d[k]) for k in opts if k in d))
    if fmt in _FORMAT_CHECKS:
        _FORMAT_CHECKS[fmt](dict(options), where)
    return WeightSpec(format=fmt, bits=bits, group_size=gs, symmetric=sym, options=options)


ACT_FORMAT_LIMITS: dict[str, tuple[int, int, int, tuple[str, ...]]] = {}
# modules that define activation formats (each registers its quantizer and limits on import)
ACT_FORMAT_MODULES = ("quantkit.nn.act_quant", "quantkit.methods.comet", "quantkit.methods.arcquant")


def load_act_formats() -> None:
    import importlib
    import importlib.util

    for mod in ACT_FORMAT_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def register_act_format(name: str, min_bits: int, max_bits: int, min_group: int, options=()) -> None:
    """Activation formats (quantkit.nn.act_quant and method modules) declare their ranges and keys here."""
    ACT_FORMAT_LIMITS[name] = (min_bits, max_bits, min_group, tuple(options))


def acts_from_dict(d: dict, where: str = "activations") -> ActSpec:
    if d.get("format", "int") not in ACT_FORMAT_LIMITS if isinstance(d, dict) else False:
        load_act_formats()
    if not isinstance(d, dict):
        raise QuantkitError(f"recipe section '{where}' must be a mapping, got {type(d).__name__}")
    fmt = d.get("format", "int")
    if fmt not in ACT_FORMAT_LIMITS:
        raise _unknown_key(str(fmt), ACT_FORMAT_LIMITS, f"{where}.format (an activation format)")
    lo, hi, min_group, opts = ACT_FORMAT_LIMITS[fmt]
    _check_keys(d, {"format", "bits", "group_size", *opts}, where)
    bits, gs = _bits_and_group(d, where, f"activation format '{fmt}'", hi, (lo, hi, min_group), "token",
                               "one group per token")
    options = tuple(sorted((k, tuple(d[k]) if isinstance(d[k], list) else d[k]) for k in opts if k in d))
    return ActSpec(format=fmt, bits=bits, group_size=gs, options=options)


def _kv_from_dict(d) -> dict[str, Any] | None:
    if d is None:
        return None
    _check_keys(d, {"format", "group_size", "rotate"}, "kv_cache")
    if d.get("format", "int4") != "int4":
        raise QuantkitError(f"kv_cache.format = '{d.get('format')}' is not supported: use int4")
    gs = d.get("group_size")
    if gs is not None:
        gs = _typed(gs, int, "group_size", "kv_cache")
        if gs < 2 or gs % 2:
            raise QuantkitError(f"kv_cache.group_size = {gs} must be an even number that divides head_dim")
    rotate = d.get("rotate", False)
    if not isinstance(rotate, bool):
        raise QuantkitError(f"kv_cache.rotate = {rotate!r} must be true or false")
    # rotate (Hadamard along head_dim before quantizing) is recorded only when on: older entries stay valid
    return {"format": "int4", "group_size": gs, **({"rotate": True} if rotate else {})}


def _method_from_dict(d: dict) -> MethodSpec:
    from quantkit.methods import ALGORITHMS, settings_from_dict  # the registry (imports torch)

    _check_keys(d, {"name"} | set(RECORDED_METHOD_KEYS) | {k for a in ALGORITHMS.values()
                                                            for k in (f.name for f in dataclasses.fields(a.Settings))},
                "method")
    name = d.get("name", "rtn")
    if name not in ALGORITHMS:
        raise _unknown_key(str(name), ALGORITHMS, "method.name (a method)")
    algo = ALGORITHMS[name]
    own = {f.name for f in dataclasses.fields(algo.Settings)}
    for k, v in d.items():
        if k != "name" and k not in own and not (k in RECORDED_METHOD_KEYS and v == RECORDED_METHOD_KEYS[k]
                                                 and type(v) is type(RECORDED_METHOD_KEYS[k])):
            settings = ", ".join(sorted(own)) or "none"
            raise QuantkitError(f"recipe key '{k}' in method is not a setting of method '{name}' "
                                f"(its settings: {settings})")
    return MethodSpec(name=name, settings=settings_from_dict(algo, {k: v for k, v in d.items() if k in own},
                                                             _typed))


def _patterns(value, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QuantkitError(f"recipe key '{key}' must be a pattern or a list of patterns")
    for v in value:
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise QuantkitError(f"recipe key '{key}': bad regular expression '{v[3:]}': {e}") from None
    return tuple(value)


def recipe_from_dict(d: dict, default_name: str = "recipe") -> Recipe:
    top = {"name", "description", "method", "weights", "activations", "targets", "ignore", "overrides",
           "kv_cache"}
    _check_keys(d, top, "the recipe")
    weights = weights_from_dict(d.get("weights") or {})
    overrides = []
    for i, ov in enumerate(d.get("overrides") or []):
        _check_keys(ov, {"match", "weights", "activations"}, f"overrides[{i}]")
        if "match" not in ov:
            raise QuantkitError(f"overrides[{i}] needs a 'match' pattern list")
        w = ov.get("weights") or {}
        weights_from_dict({**weights.to_dict(), **w}, where=f"overrides[{i}].weights")  # validate early
        a = ov.get("activations")
        if a is not None:
            if d.get("activations") is None:
                raise QuantkitError(f"overrides[{i}].activations needs a recipe-level 'activations' section")
            acts_from_dict({**acts_from_dict(d["activations"]).to_dict(), **a},
                            where=f"overrides[{i}].activations")
        overrides.append(Override(match=_patterns(ov["match"], f"overrides[{i}].match"), weights=dict(w),
                                  activations=dict(a) if a else None))
    acts = d.get("activations")
    acts = acts_from_dict(acts) if acts is not None else None
    return Recipe(
        name=str(d.get("name", default_name)),
        description=str(d.get("description", "")),
        method=_method_from_dict(d.get("method") or {}),
        weights=weights,
        activations=acts,
        kv_cache=_kv_from_dict(d.get("kv_cache")),
        targets=_patterns(d.get("targets", ["*"]), "targets"),
        ignore=_patterns(d.get("ignore", []), "ignore"),
        overrides=tuple(overrides),
    )


# ---------------------------------------------------------------- lookup

def _shipped_dir():
    return resources.files("quantkit.recipes")


def shipped_recipes() -> dict[str, str]:
    """name -> description of every recipe shipped with the package."""
    out = {}
    for entry in sorted(_shipped_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            out[entry.name[:-5]] = str(data.get("description", ""))
    return out


def load_recipe(name_or_path: str | Path | Recipe | dict) -> Recipe:
    """A shipped recipe by name, a YAML path, a dict, or a Recipe (returned as is)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, dict):
        return recipe_from_dict(name_or_path)
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise QuantkitError(f"recipe file '{s}' does not exist")
        try:
            text, default = p.read_text(), p.stem
        except (OSError, UnicodeDecodeError) as e:
            why = "not a text (YAML) file" if isinstance(e, UnicodeDecodeError) else e.strerror or str(e)
            raise QuantkitError(f"cannot read recipe file '{s}' ({why})") from None
    else:
        entry = _shipped_dir() / f"{s}.yaml"
        if not entry.is_file():
            names = list(shipped_recipes())
            near = difflib.get_close_matches(s, names, n=1)
            hint = f"did you mean '{near[0]}'?" if near else "run 'quantkit recipes' to list them"
            raise QuantkitError(f"unknown recipe '{s}': {hint}")
        text, default = entry.read_text(), s
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise QuantkitError(f"recipe '{s}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:  # an empty file (or only comments) would silently quantize with every default
        raise QuantkitError(f"recipe file '{s}' is empty; write at least a 'weights:' section (e.g. "
                            f"'weights: {{bits: 4, group_size: 128}}') or pass a shipped recipe name "
                            f"(see 'quantkit recipes')")
    if not isinstance(data, dict):
        raise QuantkitError(f"recipe '{s}' must be a YAML mapping (keys such as method:, weights:), not a "
                            f"{type(data).__name__}")
    return recipe_from_dict(data, default_name=default)
