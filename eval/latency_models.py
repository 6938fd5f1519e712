"""Models for the latency benchmark (`quantkit bench latency`, eval/bench_latency.py): random-weight Llamas of
named shapes, on-the-fly quantization of a model's decoder Linears (through the pipeline's per-layer step), an
int lm_head, the dequantized twin of a checkpoint, and the model's bytes by part.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from quantkit.errors import QuantkitError


def shape_names() -> list[str]:
    from quantkit.eval.make_random_checkpoint import PRESETS

    return sorted(PRESETS)


def shape_config(shape: str):
    """The LlamaConfig of a named shape (the presets of make_random_checkpoint: llama3-8b, cpu-3g, tiny, ...)."""
    from transformers import LlamaConfig

    from quantkit.eval.make_random_checkpoint import PRESETS

    if shape not in PRESETS:
        raise QuantkitError(f"unknown --shape '{shape}': choose one of {', '.join(shape_names())}")
    a = PRESETS[shape]
    cfg = LlamaConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                      num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                      num_key_value_heads=a["kv_heads"], tie_word_embeddings=a["tie"],
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "sdpa"
    return cfg


@torch.no_grad()
def random_model(shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight Llama of a named shape, built on `device` in `dtype`: matrices N(0, 0.02), norms 1."""
    from transformers import LlamaForCausalLM

    cfg = shape_config(shape)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.fill_(1.0)
    return model.eval()


def layers_and_prefix(model: nn.Module) -> tuple[nn.ModuleList, str]:
    from quantkit.models import decoder_layers

    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return layers, name
    raise QuantkitError("could not locate the decoder layers inside the model")


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def quantize_on_the_fly(model: nn.Module, recipe, fit_budget_s: float | None = None,
                        log: Callable[[str], None] = print, outlier_share: float | None = None,
                        seed: int = 0) -> dict:
    """Replace every Linear the recipe targets by a QuantLinear of its weight format (RTN fit), in place, on the
    model's device. Past `fit_budget_s` seconds of fitting, each later layer gets copies of the last fitted
    layer's packed tensors (same shapes, formats and bytes: the same speed; recorded in the result).
    Activation-quantized recipes get a made-up calibration (`ActQuantizer.for_speed`: `outlier_share` of the
    channels, at random positions, as outliers; None = the format's default), since there is no data here:
    the timing holds for that layout, the model's outputs mean nothing.

    Weight-only Linears are quantized by the pipeline's per-layer step (`quantkit.pipeline.quantize_layer`,
    no calibration data, the recipe's method replaced by RTN). Activation-quantized ones cannot be: the
    pipeline builds their quantizers from calibration data (`from_calibration`) and takes no made-up layout,
    so they are fitted here (`_fit_with_layout`: the layout's weight transform, then RTN, as the pipeline does
    without data)."""
    from quantkit.nn import QuantLinear, load_kernels
    from quantkit.nn.act_quant import ACT_QUANTIZERS
    from quantkit.nn.fused import SHARED_INPUT_GROUPS
    from quantkit.pipeline import QuantizeReport, quantize_layer
    from quantkit.recipe import MethodSpec

    if outlier_share is not None and not 0.0 <= outlier_share <= 1.0:
        raise QuantkitError(f"--outlier-share {outlier_share:g} must be in [0, 1]")
    notes = []
    gen = torch.Generator().manual_seed(seed)
    made_up_layouts = False
    if recipe.method.name != "rtn":
        notes.append(f"weights fitted by RTN in the recipe's format ({recipe.method.name} would give the same "
                     f"format, bytes and kernels)")
    if recipe.kv_cache:
        notes.append("the recipe's kv_cache section is not applied: the benchmark's KV cache is a plain "
                     "StaticCache in the model dtype")
    rtn = dataclasses.replace(recipe, method=MethodSpec(name="rtn"))
    report = QuantizeReport(recipe=recipe.name)
    layers, prefix = layers_and_prefix(model)
    t0 = time.perf_counter()
    fitted_layers, cloned_layers, n_mod = 0, 0, 0
    last: dict[str, nn.Module] = {}
    keys = set()
    for i, layer in enumerate(layers):
        elapsed = time.perf_counter() - t0
        clone = (fit_budget_s is not None and fitted_layers > 0
                 and elapsed + elapsed / fitted_layers > fit_budget_s)
        targets = []
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear):
                spec = recipe.scheme_for(f"{prefix}.{i}.{name}")
                if spec is not None:
                    targets.append((name, mod, spec, recipe.act_scheme_for(f"{prefix}.{i}.{name}")))
        layer_layouts: dict = {}
        for name, mod, spec, aspec in targets:
            src = last.get(name)
            if clone and src is not None and src.spec == spec and (src.in_features, src.out_features) == (
                    mod.in_features, mod.out_features):
                bias = mod.bias.detach().clone() if mod.bias is not None else None
                q = QuantLinear(mod.in_features, mod.out_features, spec,
                                {k: v.clone() for k, v in src.packed().items()}, bias,
                                copy.deepcopy(src.act) if src.act is not None else None)
            elif aspec is not None:
                # Linears reading one input share one layout, as calibration gives them (and can fuse)
                parent, _, leaf = name.rpartition(".")
                key = (parent, next((g for g in SHARED_INPUT_GROUPS if leaf in g), leaf), aspec)
                if key not in layer_layouts:
                    layer_layouts[key] = ACT_QUANTIZERS[aspec.format].for_speed(
                        aspec, mod.in_features, outlier_share, gen).to(mod.weight.device)
                q = _fit_with_layout(mod, spec, copy.deepcopy(layer_layouts[key]))
            else:
                continue  # weight-only: the pipeline's layer step below
            set_module(layer, name, q)
        if targets:  # the remaining (weight-only) Linears, RTN through the pipeline, on their device
            quantize_layer(layer, f"{prefix}.{i}", rtn, [], {}, targets[0][1].weight.device, report)
        for name, *_ in targets:
            q = layer.get_submodule(name)
            made_up_layouts |= q.act is not None
            last[name] = q
            keys.add(q.kernel_key)
            n_mod += 1
        del targets
        if clone:
            cloned_layers += 1
        else:
            fitted_layers += 1
    secs = time.perf_counter() - t0
    if cloned_layers:
        notes.append(f"fitting stopped after {fitted_layers} of {len(layers)} layers (--fit-budget "
                     f"{fit_budget_s:g} s); the other {cloned_layers} hold copies of the last fitted layer's "
                     f"packed tensors (timing-equivalent)")
    if made_up_layouts:
        share = "the format's default" if outlier_share is None else f"{outlier_share:g}"
        notes.append(f"activation quantizers calibrated on nothing: a made-up layout with outlier share {share} "
                     f"(--outlier-share) at random channels; timings hold for that layout, outputs are "
                     f"meaningless")
    if any(p.is_cuda for p in model.parameters()):
        kernels = load_kernels()  # the kernels register themselves on first use
        no_kernel = sorted(k for k in keys if k not in kernels)
        if no_kernel:
            notes.append(f"no CUDA kernel registered for {', '.join(no_kernel)}: the torch reference "
                         f"(dequantize per call) serves those modules")
    for n in notes:
        log(f"  note: {n}")
    out = {"recipe": recipe.name, "method": "rtn", "modules": n_mod, "fitted_layers": fitted_layers,
           "cloned_layers": cloned_layers, "seconds": secs, "notes": notes}
    if made_up_layouts:
        out["act_layout"] = act_layout_summary(model)
    return out


def _fit_with_layout(mod: nn.Linear, spec, act) -> nn.Module:
    """A QuantLinear of `mod` under the activation quantizer `act` (a made-up layout): the weight in the
    layout's input space, RTN in the spec's format."""
    from quantkit.formats import make_format
    from quantkit.methods import rtn_quantize
    from quantkit.nn import QuantLinear

    w = act.transform_weight(mod.weight)
    fmt = make_format(spec)
    if hasattr(fmt, "prepare"):  # formats with a whole-matrix parameter bind it first
        fmt = fmt.prepare(w)
    codes, params = rtn_quantize(w, fmt)
    return QuantLinear.from_codes(mod, spec, codes, params, act=act).to(mod.weight.device)


def act_layout_summary(model: nn.Module) -> dict:
    """What the activation quantizers' layouts cost: ARC residual channels, COMET INT8 blocks (size-weighted)."""
    from quantkit.nn import QuantLinear

    extra = k_total = int8 = blocks = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.act is not None:
            k_total += mod.in_features
            extra += mod.weight_in_features - mod.in_features
            bits = getattr(mod.act, "block_bits", None)
            if bits is not None:
                int8 += int((bits >= 8).sum())
                blocks += bits.numel()
    out = {"extra_input_channels_share": extra / k_total if k_total else 0.0}
    if blocks:
        out["int8_block_share"] = int8 / blocks
    return out


@torch.no_grad()
def quantize_lm_head(model: nn.Module, bits: int) -> str:
    """Replace an untied lm_head by a uniform-int (asymmetric, group 128) RTN QuantLinear; the same kernels as
    the decoder Linears serve it. A tied lm_head is left alone (it is the embedding table): said in the result."""
    from quantkit.formats import make_format
    from quantkit.methods import rtn_quantize
    from quantkit.nn import QuantLinear
    from quantkit.recipe import WeightSpec

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or not isinstance(head, nn.Linear) or head.weight is emb.weight:
        return "left in full precision (tied to the embedding table)"
    spec = WeightSpec(format="int", bits=bits, group_size=128, symmetric=False)
    codes, params = rtn_quantize(head.weight, make_format(spec))
    q = QuantLinear.from_codes(head, spec, codes, params).to(head.weight.device)
    model.set_output_embeddings(q)
    return f"int{bits} g128 asym (RTN)"


@torch.no_grad()
def dequantized_twin(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every QuantLinear by a plain Linear with its dequantized weight (random N(0, 0.02) where an
    activation scheme changed the weight's input space); returns how many got random weights."""
    from quantkit.nn import QuantLinear

    randoms = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        dev = mod.qweight.device if hasattr(mod, "qweight") else next(iter(mod.packed().values())).device
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=dev, dtype=dtype)
        if mod.act is None:
            lin.weight.copy_(mod.dequantize_weight(torch.float32)[:, : mod.in_features].to(dtype))
        else:
            lin.weight.normal_(0.0, 0.02)
            randoms += 1
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.to(dtype))
        set_module(model, name, lin)
    return randoms


def model_bytes(model: nn.Module) -> dict:
    """Bytes of the model's parameters and buffers (each storage once), split into decoder Linears (quantized
    or not), input embedding, lm_head (0 when tied) and the rest."""
    from quantkit.nn import QuantLinear

    seen: set = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            key = (t.untyped_storage().data_ptr(), t.device)
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return total

    layers, _ = layers_and_prefix(model)
    linear, linear_weights = 0, 0
    for layer in layers:
        for mod in layer.modules():
            if isinstance(mod, (nn.Linear, QuantLinear)):
                linear += nbytes(list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)))
                linear_weights += mod.in_features * mod.out_features
    emb = model.get_input_embeddings()
    embed = nbytes([emb.weight])
    head = model.get_output_embeddings()
    lm_head = nbytes(list(head.parameters(recurse=False)) + list(head.buffers(recurse=False))) \
        if head is not None else 0
    rest = nbytes(list(model.parameters()) + list(model.buffers()))
    return {"total": linear + embed + lm_head + rest, "linear": linear, "embedding": embed, "lm_head": lm_head,
            "other": rest, "tied_lm_head": head is not None and getattr(head, "weight", None) is emb.weight,
            "linear_bits_per_weight": 8 * linear / max(linear_weights, 1), "linear_weights": linear_weights}
