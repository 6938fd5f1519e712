"""The sequential (layer-by-layer) quantization driver every method rides.

1. Run the embeddings on the calibration windows and capture decoder layer 0's inputs (and the keyword
   arguments the model passes its layers: position embeddings, masks).
2. For each decoder layer: find the Linear modules the recipe targets; split them into "sub-blocks" of
   modules that read the same input tensor (q/k/v, o, gate/up, down on Llama), discovered by a traced
   forward, not hard-coded. For GPTQ, per sub-block: collect Hessians with forward hooks over all windows
   (stopping the forward right after that sub-block), quantize, swap in the QuantLinear; later sub-blocks
   then see the quantized earlier ones ("true sequential"). RTN needs no data.
3. Run the quantized layer on all windows: its outputs are the next layer's inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.distributed import Dist, ExactSum, current, main_band
from quantkit.errors import QuantkitError
from quantkit.formats import make_format
from quantkit.methods import WeightAlgorithm, algorithm_for
from quantkit.models import adapter_for, decoder_layers
from quantkit.nn import ACT_QUANTIZERS, QuantLinear, set_weight_cache
from quantkit.recipe import ActSpec, Recipe, WeightSpec, acts_from_dict


@dataclass
class QuantizeReport:
    recipe: str
    modules: dict[str, dict] = field(default_factory=dict)  # name -> scheme dict (+ shapes)
    seconds: float = 0.0
    nsamples: int = 0
    seq_len: int = 0
    high_precision: list[str] = field(default_factory=list)  # Linears the activation search gave high_bits


class _StopForward(Exception):
    pass


def layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise QuantkitError("could not locate the decoder layers inside the model")


def _targets(layer: nn.Module, prefix: str, recipe: Recipe) -> dict[str, tuple[nn.Linear, WeightSpec]]:
    out = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear):
            full = f"{prefix}.{name}"
            spec = recipe.scheme_for(full)
            if spec is not None:
                out[name] = (mod, spec)
    return out


def _check_finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QuantkitError(f"weight of '{name}' holds {bad} NaN/Inf values; the model's weights are damaged: "
                            f"fix that tensor or re-download / re-convert the model")


_FINITE_CHUNK = 1 << 24  # elements per isfinite() pass: a bounded temporary, even for an embedding matrix


def _nonfinite(t: torch.Tensor) -> int:
    if not t.is_floating_point() or t.is_meta:
        return 0
    flat = t.detach().reshape(-1)
    bad = 0
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[i : i + _FINITE_CHUNK]
        if not torch.isfinite(chunk).all():
            bad += int((~torch.isfinite(chunk)).sum())
    return bad


def check_finite_tensors(tensors: dict[str, torch.Tensor], quantized: set[str] = frozenset()) -> None:
    """Refuse a NaN/Inf in any floating-point tensor: one left unquantized (a norm, the embeddings) would
    make every output NaN. `quantized`: module names whose `.weight` gets quantized (their own message)."""
    for name, t in tensors.items():
        bad = _nonfinite(t)
        if not bad:
            continue
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in quantized:
            _check_finite(module, t)
        raise QuantkitError(f"tensor '{name}' holds {bad} NaN/Inf values; the model's weights are damaged "
                            f"(the result would be NaN): fix that tensor or re-download / re-convert the model")


def quantized_modules(layer: nn.Module, prefix: str, recipe: Recipe) -> set[str]:
    """Full names of the Linears of `layer` (named `prefix`) that `recipe` quantizes."""
    return {f"{prefix}.{n}" for n in _targets(layer, prefix, recipe)}


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _KwargsRecorder(nn.Module):
    """Stands in for a decoder layer during input capture: records the keyword arguments the model passes
    that layer (they differ per layer on some models: Gemma-3's sliding-window layers get another RoPE base
    and mask than its full-attention layers) and passes the hidden states through untouched. Attribute
    reads the model's loop makes on its layers (e.g. `attention_type`) go to the real layer."""

    def __init__(self, layer: nn.Module, index: int, sink, last: bool):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_sink", sink)
        self.index, self.last = index, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.pop("hidden_states")
        self._sink(self.index, hidden_states, kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device,
                         store_device: torch.device, sink=None) -> tuple[list[torch.Tensor], list[dict]]:
    """Inputs of decoder layer 0 for every window ([1, seq, hidden] each) and each layer's kwargs.

    Returns (inputs, kwargs per layer). The layers are swapped for pass-through recorders while the
    windows run, so no layer computes (and no layer needs to be materialized: the streaming pipeline
    captures on a skeleton). With `sink`, each input is handed to `sink(x)` (x on `device`) instead of
    being collected in the list.
    """
    layers = decoder_layers(model)
    originals = list(layers)
    captured: dict = {"kwargs": [None] * len(originals)}

    def record(i, hs, kwargs):
        if i == 0:
            captured["x"] = hs
        captured["kwargs"][i] = kwargs

    for i, layer in enumerate(originals):
        layers[i] = _KwargsRecorder(layer, i, record, last=i == len(originals) - 1)
    # only what runs before layer 0 (embeddings, rotary: the adapter's `before_layers`) needs to be on the
    # compute device
    moved = [m for _, m in adapter_for(model).before_layers(model)]
    for m in moved:
        m.to(device)
    xs = []
    try:
        for i in range(windows.shape[0]):
            try:
                model(windows[i : i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            if sink is not None:
                sink(captured.pop("x"))
            else:
                xs.append(captured.pop("x").to(store_device))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for m in moved:
            m.to(store_device)
    per_layer = []
    for kw in captured["kwargs"]:
        kwargs = {}
        for k, v in kw.items():
            if k in ("past_key_values", "past_key_value"):
                v = None
            if k == "use_cache":
                v = False
            kwargs[k] = v
        per_layer.append(kwargs)
    return xs, per_layer


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def group_by_input(order: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Names grouped by the tensor object they read (identity, not value), in first-seen order; a name seen
    again is skipped. `order`: (name, input) as forward hooks saw them."""
    blocks: list[list[str]] = []
    block_inputs: list[torch.Tensor] = []
    for name, inp in order:
        if name in {n for b in blocks for n in b}:
            continue
        same = [i for i, t in enumerate(block_inputs) if t is inp]
        if same:
            blocks[same[0]].append(name)
        else:
            block_inputs.append(inp)
            blocks.append([name])
    return blocks


@torch.no_grad()
def _traced_groups(layer: nn.Module, targets: dict, x: torch.Tensor,
                   kwargs: dict) -> tuple[list[list[str]], list[str]]:
    """Target Linears grouped by the input tensor they read, in execution order (one traced forward), and the
    targets the forward never reached."""
    order: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their identities unique
    handles = []
    for name, (mod, _) in targets.items():
        def hook(m, args, _name=name):
            order.append((_name, args[0]))
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        _run_layer(layer, x, kwargs)
    finally:
        for h in handles:
            h.remove()
    blocks = group_by_input(order)
    return blocks, [n for n in targets if n not in {n for b in blocks for n in b}]


def _declared_groups(names, declared) -> list[list[str]]:
    """`names` grouped by the adapter's declared sub-blocks (names under the layer), the others alone."""
    groups = [[n for n in b if n in names] for b in declared]
    groups = [g for g in groups if g]
    seen = {n for g in groups for n in g}
    return groups + [[n] for n in names if n not in seen]


def _bound_formats(lprefix: str, group: list[str], targets: dict, acts: dict) -> dict:
    """The weight format of each Linear of `group` (Linears that read one input), bound once over all members
    with the same weight scheme (`WeightFormat.bind`): a format's whole-matrix parameter (a tensor scale) is
    then shared by the matrices a serving engine fuses."""
    by_spec: dict = {}
    for n in group:
        by_spec.setdefault(targets[n][1], []).append(n)
    out = {}
    for spec, members in by_spec.items():
        for n in members:
            _check_finite(f"{lprefix}.{n}", targets[n][0].weight)

        def weights(members=members):
            for n in members:
                a, w = acts.get(n), targets[n][0].weight
                yield a.transform_weight(w) if a is not None else w

        out.update(dict.fromkeys(members, make_format(spec).bind(weights())))
    return out


def _quantize_linear(name: str, mod: nn.Linear, spec: WeightSpec, algo: WeightAlgorithm,
                     stats, act=None, host_factorization: bool = False, fmt=None) -> QuantLinear:
    """stats: what `algo.statistics` collected for this Linear: None, the result (kept), or a one-element
    list handing it over (the algorithm may free it as it goes). fmt: the format bound for this Linear's
    group (`_bound_formats`); None binds it to this Linear alone."""
    _check_finite(name, mod.weight)
    weight = act.transform_weight(mod.weight) if act is not None else mod.weight
    if fmt is None:
        fmt = make_format(spec).bind([weight])
    codes, params = algo.quantize(weight, fmt, stats, act=act, host_factorization=host_factorization)
    q = QuantLinear.from_codes(mod, spec, codes, params, act=act)
    if act is not None:
        act.enabled = False  # calibration propagates activation-float outputs (see finalize_activations)
    return q.to(mod.weight.device)


def _scheme_entry(mod: QuantLinear, recipe: Recipe) -> dict:  # "method": the algorithm's name
    return {**mod.scheme_entry(), "method": recipe.method.name}


def _act_class(spec: ActSpec | None):
    return ACT_QUANTIZERS[spec.format] if spec is not None else None


def _run_block_hook(layer: nn.Module, last: nn.Module, fn, xs, kwargs: dict, device: torch.device) -> None:
    """Run the layer on every input, hand `last`'s input to `fn`, and stop each forward right there."""
    def hook(m, args):
        fn(args[0])
        raise _StopForward

    handle = last.register_forward_pre_hook(hook)
    try:
        for i in range(len(xs)):
            try:
                _run_layer(layer, xs[i].to(device), kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()


def _calibrate_acts(layer, block: list[str], targets: dict, act_specs: dict, xs, kwargs, device,
                    dist: Dist | None = None) -> dict:
    """Activation quantizers of a sub-block's Linears, from one calibration pass where any needs data."""
    collectors = {}
    for n in block:
        spec = act_specs.get(n)
        if spec is not None:
            c = _act_class(spec).collector(spec, targets[n][0])
            if c is not None:
                collectors[n] = c
    if collectors:
        dist = dist or current()
        # several processes: the collectors visit the ranks in turn (rank r holds the windows after rank r-1's),
        # so every collector sees its inputs in the one-process order, whatever it sums
        for r in range(dist.world):
            if r == dist.rank:
                _run_block_hook(layer, targets[block[-1]][0], lambda x, cs=collectors: [c.add(x) for c in cs.values()],
                                xs, kwargs, device)
            collectors = dist.pass_on(collectors, r, device)
    return {n: _act_class(act_specs[n]).from_calibration(act_specs[n], targets[n][0], collectors.get(n))
            for n in block if act_specs.get(n) is not None}


@torch.no_grad()
def _block_statistics(algo: WeightAlgorithm, k: int, layer: nn.Module, last: nn.Module, act, xs, kwargs: dict,
                      device: torch.device, dist: Dist):
    """The algorithm's statistics over every calibration input of a sub-block (None if it collects none).

    Each window's statistics are computed alone (what `algo.statistics` gives when fed that window only; by row
    panels where the accumulator offers `window_rows`), and the per-window results, row means by the contract,
    are summed exactly (`ExactSum`, its main band set by the first window, which rank 0 holds) and reduced over
    the ranks: the result has the same bits for any number of processes and any split of the windows."""
    probe = algo.statistics(k, device)
    if probe is None:
        return None
    panels = getattr(probe, "window_rows", None)
    state: dict = {}

    def per_window(x):
        x = act.hessian_input(x) if act is not None else x
        w = x.numel() // max(x.shape[-1], 1)  # rows: the weight of this window's mean
        if panels is not None:
            shape, bound, rows = panels(x)
        else:
            acc = algo.statistics(k, device)
            acc.add(x)
            r = acc.result()
            del acc
            bound = float(r.abs().max()) if r.numel() else 0.0
        if "total" not in state:  # this rank's first window; rank 0's is the first of all
            band = main_band(bound * w) if dist.is_writer else None
            state["total"] = ExactSum(dist.broadcast_object(band, 0))
        total = state["total"]
        if panels is not None:
            total.add_panels(shape, torch.device(device), bound, rows, w)
        else:
            total.add(r, w)

    _run_block_hook(layer, last, per_window, xs, kwargs, device)
    total = state.get("total") or ExactSum(dist.broadcast_object(None, 0))
    total.reduce(dist)
    return total.result()


def _solve_cost(algo: WeightAlgorithm, mod: nn.Linear, act, device: torch.device, host_factorization: bool) -> float:
    """What spreading the solves over ranks balances: the algorithm's temporaries for this Linear (they grow
    with the work, K² for GPTQ's factorization) plus its weight."""
    k = act.gptq_in_features if act is not None else mod.in_features
    dev, host = algo.work_bytes(mod.out_features, k, device, host_factorization)
    return float(dev + host + mod.out_features * k)


def _install(layer: nn.Module, n: str, targets: dict, q: QuantLinear, recipe: Recipe, report: QuantizeReport,
             cache_weights: bool, lprefix: str) -> None:
    del targets[n]
    q.cache_weight = cache_weights  # later sub-blocks and the output pass reuse it
    _set_module(layer, n, q)
    report.modules[f"{lprefix}.{n}"] = _scheme_entry(q, recipe)


def _share_quant_linear(dist: Dist, owner: int, q: QuantLinear | None, mod: nn.Linear, spec: WeightSpec, act,
                        device: torch.device) -> QuantLinear:
    """The QuantLinear rank `owner` solved, on every rank: its packed tensors are broadcast as raw bytes, the
    other ranks build the same module around them (their activation quantizer is already the same)."""
    if not dist.active:
        return q
    meta = dist.broadcast_object([(n, tuple(t.shape), str(t.dtype).replace("torch.", ""))
                                  for n, t in q.packed().items()] if q is not None else None, owner)
    packed = {}
    for name, shape, dtype in meta:
        dt = getattr(torch, dtype)
        if q is not None:
            t = q.packed()[name]
            dist.broadcast_(t.contiguous().reshape(-1).view(torch.uint8), owner)
        else:
            nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            buf = dist.broadcast_(torch.empty(nbytes, dtype=torch.uint8, device=device), owner)
            packed[name] = buf.view(dt).reshape(shape)
    if q is not None:
        return q
    bias = mod.bias.detach().clone() if mod.bias is not None else None
    q = QuantLinear(mod.in_features, mod.out_features, spec, packed, bias, act).to(mod.weight.device)
    if act is not None:
        act.enabled = False  # as _quantize_linear leaves it
    return q


@torch.no_grad()
def quantize_layer(layer: nn.Module, lprefix: str, recipe: Recipe, xs, kwargs: dict, device: torch.device,
                   report: QuantizeReport, bar=None, cache_weights: bool = True,
                   host_factorization: bool = False, input_groups: tuple[tuple[str, ...], ...] = (),
                   dist: Dist | None = None) -> None:
    """Quantize one decoder layer in place (its Linears become QuantLinear): the per-layer step that the
    in-memory driver (`quantize_model`) and the streaming driver (`quantkit.offload`) share.

    layer: already on `device`; lprefix: its full module name ("model.layers.3"); xs: a sequence (list or
    `ActivationStore`) of its inputs, [1, seq, hidden] each, empty for methods without data; kwargs: the
    keyword arguments the model passes its layers, on `device`. Scheme entries go to `report.modules`.
    cache_weights: keep each new QuantLinear's dequantized weight for the rest of the layer (faster CPU
    forwards, one more float copy of the layer in memory; the values are the same either way).
    host_factorization: let the algorithm factorize wide statistics on the host, not the GPU
    (the streaming pipeline's VRAM bound; same result up to the devices' float rounding).
    dist: the process group (default `distributed.current()`): `xs` holds this rank's calibration windows;
    statistics are reduced over the ranks, solves spread over them, every rank ends with the same layer.
    input_groups: the layer's Linears that read one input as the adapter declares them (`sub_blocks`, names
    under the layer): with calibration data the groups are traced instead. Each group's weight formats are
    bound together (`WeightFormat.bind`: e.g. one tensor scale for q/k/v, one for gate/up).
    """
    dist = dist or current()
    targets = _targets(layer, lprefix, recipe)
    act_specs = {n: recipe.act_scheme_for(f"{lprefix}.{n}") for n in targets}
    algo = algorithm_for(recipe.method)
    act_data = any(s is not None and _act_class(s).wants_calibration(s) for s in act_specs.values())
    if (algo.needs_data or act_data) and targets and len(xs):
        groups, missing = _traced_groups(layer, targets, xs[0].to(device), kwargs)
        if algo.sequential:  # modules the forward never reached come last, quantized without data
            blocks = groups + [missing] if missing else groups
        else:
            blocks = [list(targets)]
        bind_groups = groups + [[n] for n in missing]
        for block in blocks:
            if bar is not None:
                bar.set_postfix_str(",".join(n.rsplit(".", 1)[-1] for n in block))
            acts = _calibrate_acts(layer, block, targets, act_specs, xs, kwargs, device, dist)
            # every module of a sub-block reads the same tensor: one set of statistics serves them all
            # (modules of a block share their activation transform: same format, same calibration input)
            first = acts.get(block[0])
            k = first.gptq_in_features if first is not None else targets[block[0]][0].in_features
            stats = _block_statistics(algo, k, layer, targets[block[-1]][0], first, xs, kwargs, device, dist)
            fmts = {}
            for g in bind_groups:
                members = [n for n in g if n in block]
                if members:
                    fmts.update(_bound_formats(lprefix, members, targets, acts))
            # the solves are spread over the ranks (longest first); each rank solves its share, then every
            # solved Linear is sent from its owner to all ranks, in block order
            owners = dist.assign([_solve_cost(algo, targets[n][0], acts.get(n), device, host_factorization)
                                  for n in block])
            mine = [n for n, o in zip(block, owners, strict=True) if o == dist.rank]
            if not mine:
                stats = None
            solved = {}
            for n in mine:
                mod, spec = targets[n]
                # the last module this rank solves takes the statistics over: the algorithm may use them as
                # scratch and free them as it goes (GPTQ: no K x K copy kept alive for the sweep, which decides a
                # streamed 8B layer's VRAM)
                arg = stats
                if stats is not None and n == mine[-1]:
                    arg, stats = [stats], None
                solved[n] = _quantize_linear(f"{lprefix}.{n}", mod, spec, algo, arg, act=acts.get(n),
                                             host_factorization=host_factorization, fmt=fmts[n])
                del arg, mod
                if not dist.active:  # one process: drop the float module as soon as its QuantLinear exists
                    _install(layer, n, targets, solved.pop(n), recipe, report, cache_weights, lprefix)
            for n, owner in zip(block, owners, strict=True):
                if n in targets:
                    mod, spec = targets[n]
                    q = _share_quant_linear(dist, owner, solved.pop(n, None), mod, spec, acts.get(n), device)
                    _install(layer, n, targets, q, recipe, report, cache_weights, lprefix)
    else:
        acts = {n: _act_class(a).from_calibration(a, targets[n][0], None) for n, a in act_specs.items()
                if a is not None}
        fmts = {}
        for g in _declared_groups(list(targets), input_groups):
            fmts.update(_bound_formats(lprefix, g, targets, acts))
        for n, (mod, spec) in list(targets.items()):
            q = _quantize_linear(f"{lprefix}.{n}", mod, spec, algo, None, act=acts.get(n), fmt=fmts[n])
            _set_module(layer, n, q)
            report.modules[f"{lprefix}.{n}"] = _scheme_entry(q, recipe)
            del targets[n], mod


@torch.no_grad()
def layer_outputs(layer: nn.Module, xs, kwargs: dict, device: torch.device, sink) -> None:
    """Run `layer` on every input in `xs` (on `device`) and hand each output to `sink` in order."""
    for i in range(len(xs)):
        sink(_run_layer(layer, xs[i].to(device), kwargs))


def needs_calibration(recipe: Recipe) -> bool:
    specs = [recipe.activations] + [
        acts_from_dict({**recipe.activations.to_dict(), **o.activations})
        for o in recipe.overrides if o.activations and recipe.activations is not None]
    return algorithm_for(recipe.method).needs_data or any(
        s is not None and _act_class(s).wants_calibration(s) for s in specs)


def kv_cache_entry(config, kv: dict | None) -> dict | None:
    """The recipe's KV-cache scheme as the checkpoint records it (group size resolved for this model)."""
    if kv is None:
        return None
    from quantkit.kvcache import check_group, default_group, hadamard, head_dim_of

    hd = head_dim_of(config)
    if kv.get("rotate"):
        hadamard(hd)  # refuses a head_dim the rotation cannot serve, before any quantization
    return {**kv, "group_size": check_group(hd, kv.get("group_size") or default_group(hd))}


def set_kv_cache(model: nn.Module, kv: dict | None) -> None:
    """Record the recipe's KV-cache scheme on the model (saved in the checkpoint, applied by evaluation)."""
    model.quantkit_kv_cache = kv_cache_entry(model.config, kv)


def kv_cache_context(model: nn.Module):
    """A context in which forwards of `model` use its quantized KV cache (a no-op without one)."""
    import contextlib

    kv = getattr(model, "quantkit_kv_cache", None)
    if not kv:
        return contextlib.nullcontext()
    from quantkit.kvcache import kv4_enabled

    return kv4_enabled(model, kv["group_size"], bool(kv.get("rotate", False)))


def finalize_activations(model: nn.Module, report: QuantizeReport | None = None) -> list[str]:
    """After all layers: run each activation scheme's model-wide step (`ActQuantizer.finalize_model`, e.g.
    FlexQ's A8 search), switch activation quantization on for inference, and refresh the report's entries.
    Returns the names the steps changed."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.act is not None}
    chosen: list[str] = []
    for cls in dict.fromkeys(type(m.act) for m in modules.values()):
        chosen += cls.finalize_model({n: m for n, m in modules.items() if type(m.act) is cls})
    for n, m in modules.items():
        m.act.enabled = True
        if report is not None and n in report.modules:
            report.modules[n] = {**m.scheme_entry(), "method": report.modules[n].get("method")}
    return chosen


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calibration: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> QuantizeReport:
    """Quantize `model` in place, layer by layer. calibration: LongTensor [nsamples, seq_len] or None.

    The model stays where it is (normally CPU); each decoder layer visits `device` for its turn. Under
    torchrun (`distributed.init_from_env` called) every rank holds the model and runs its share of the windows;
    all ranks end with the same quantized model.
    (`quantkit.offload.quantize_streaming` runs the same per-layer step on a model streamed from disk.)
    """
    device = torch.device(device)
    store = next(model.parameters()).device
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    needs_data = needs_calibration(recipe)
    if needs_data and (calibration is None or calibration.numel() == 0):
        raise QuantkitError(f"recipe '{recipe.name}' needs calibration data (method '{recipe.method.name}'"
                            f"{', activation calibration' if recipe.activations is not None else ''}); pass a dataset")
    quantized = set().union(*(quantized_modules(layer, f"{prefix}.{li}", recipe)
                              for li, layer in enumerate(layers)))
    check_finite_tensors(dict(model.named_parameters()), quantized)  # before the long part, not in the output
    report = QuantizeReport(recipe=recipe.name)
    t0 = time.perf_counter()
    set_kv_cache(model, recipe.kv_cache)

    xs: list[torch.Tensor] = []
    layer_kwargs: list[dict] = []
    dist = current()
    if needs_data:
        report.nsamples, report.seq_len = calibration.shape
        lo, hi = dist.shard(calibration.shape[0])  # several processes: this rank's windows
        xs, layer_kwargs = capture_layer_inputs(model, calibration[lo:hi], device, store)

    bar = tqdm(range(len(layers)), desc=f"quantize [{recipe.name}]", unit="layer",
               disable=not progress or not dist.is_writer)
    for li in bar:
        layer = layers[li].to(device)
        kwargs = to_device(layer_kwargs[li], device) if needs_data else {}
        quantize_layer(layer, f"{prefix}.{li}", recipe, xs, kwargs, device, report, bar,
                       input_groups=adapter_for(model).sub_blocks)
        if needs_data:
            outs: list[torch.Tensor] = []
            layer_outputs(layer, xs, kwargs, device, lambda y, outs=outs: outs.append(y.to(store)))
            xs = outs
        set_weight_cache(layer, False)
        layers[li] = layer.to(store)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.high_precision = finalize_activations(model, report)
    report.seconds = time.perf_counter() - t0
    model.quantkit_report = report
    return report
