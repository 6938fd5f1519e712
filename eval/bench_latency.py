"""End-to-end latency (`quantkit bench latency`): prefill tokens/s, decode ms/token and tokens/s, peak GPU memory
and model bytes of quantized models next to the unquantized (bf16) model, measured in one run by one harness.

Imported as `quantkit.eval.bench_latency`; `run_latency(...)` is the entry point, the CLI parses the options.

Models:
- `--shape llama3-8b` (or any preset of `quantkit.eval.make_random_checkpoint`): a random-weight Llama of that
  shape built directly on the device in the baseline dtype (N(0, 0.02) Linears and embeddings, seeded), then,
  per recipe, built again and quantized on the fly, Linear by Linear (the recipe's weight format, fitted by
  RTN: the kernels and bytes depend on the format only). No weights travel.
- an HF folder / `demo` / `.gguf` + `--recipe`: loaded in the baseline dtype, quantized on the fly the same way.
- a quantkit checkpoint folder: loaded as is; the baseline is its twin with every QuantLinear replaced by a
  plain Linear holding the dequantized weight (random N(0, 0.02) where an activation scheme changed its input).

Harness, per model and batch B (prompt P random token ids, G generated tokens, greedy):
- transformers `StaticCache` of P + G positions; `prefill` = reset the cache, one forward over the prompt
  (`logits_to_keep=1`), argmax; it runs eagerly (compute-bound; launch gaps are a few % of it).
- `decode step` = one forward of B tokens at a position held in a device tensor, argmax written back into the
  input buffer, position += 1: no host value changes between steps, so on CUDA one step is captured once in a
  `torch.cuda.CUDAGraph` (after eager warm-up steps, which also run Triton's autotuning) and the G - 1 decode
  steps are G - 1 graph replays. Where capture fails the harness says why and times eager steps instead
  (and on CPU, where there are no graphs).
- `--compile` (`LatencyConfig.compile`): the decode step's forward goes through `torch.compile` (inductor,
  static shapes); each QuantLinear is one opaque op (`quantkit::wq_matmul`, or `lowbit_act_linear` /
  `arc_act_linear` with activation quantization), so the ~45 small norm / rotary / attention / residual
  kernels per layer fuse into a few, while the Triton kernels run as they are; the compiled
  step is then captured the same way. Same harness for the baseline. (H200, Llama-3-8B, B = 1: bf16 7.56 ->
  5.42 ms/step, rtn-w4g128 5.32 -> 3.28.) A compile failure falls back to the uncompiled step, recorded.
- Llama-like models (all layers full attention) get an explicit 4-D boolean mask and, for single-token
  queries, a GQA attention that reads each KV head once (`gqa_decode_attention`, 2 batched matmuls + softmax);
  prompts go through SDPA. Other architectures use transformers' own masks and attention.
- `repeats` timed runs after `warmup` untimed ones; each run = prefill (timed with device events) + the decode
  loop (timed separately); medians reported. Peak GPU memory = `max_memory_allocated` over the whole batch
  (model, cache, graph pool, activations).
- checks: the logits of the first decode step (graph replay or eager step) against an uncached forward over
  prompt + first token (relative L2 error and argmax agreement).
- profile (CUDA): `torch.profiler` over a few decode steps (graph replays; eager steps if the profiler sees no
  kernels inside graphs), kernels grouped by kind and the top kernels, µs per step; bandwidth floors (bytes a
  decode step must read / measured copy bandwidth) per part of the model.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.eval.report import Column, environment, format_table, write_json
from quantkit.kvcache import cache_argument

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
DECODE_ATTN = "quantkit_gqa_decode"
METHOD_GRAPHS = ("CUDA graphs: manual torch.cuda.CUDAGraph capture of one decode step (StaticCache, position "
                 "and next token kept in device tensors), replayed once per generated token")
METHOD_EAGER = "eager decode steps (StaticCache), no CUDA graphs"
METHOD_FUSE = ("; q/k/v and gate/up projections fused into one Linear per group (concatenated output "
               "features, quantkit.nn.fused) in every model, the baseline included")
METHOD_PDL = "; decode GEMVs launched with programmatic dependent launch (QUANTKIT_PDL=1)"
METHOD_COMPILE = ("; the decode step's forward compiled by torch.compile (inductor, default mode, static "
                  "shapes), "
                  "each QuantLinear one opaque op (quantkit::wq_matmul, lowbit_act_linear, arc_act_linear: "
                  "its Triton kernels run as they are)")


@dataclass
class LatencyConfig:
    batches: tuple[int, ...] = (1, 16)
    prompt: int = 512
    gen: int = 128
    repeats: int = 5
    warmup: int = 2
    graphs: bool = True
    compile: bool = False  # torch.compile the decode step's glue (norms, rotary, attention), Linears eager
    profile: bool = True
    check: bool = True
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0
    fit_budget_s: float | None = None  # on-the-fly fitting: past this, later layers reuse fitted codes
    outlier_share: float | None = None  # activation recipes on the fly: made-up outlier share (None: default)
    lm_head_bits: int | None = None  # also measure each on-the-fly variant with an int (g128) lm_head
    fuse: bool = True  # q/k/v and gate/up as one Linear each (quantkit.nn.fused), every model alike
    pdl: bool = False  # decode GEMVs with programmatic dependent launch (QUANTKIT_PDL=1 for this run)


def _dtype(name: str) -> torch.dtype:
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]
    except KeyError:
        raise QuantkitError(f"unknown --dtype '{name}': use bfloat16, float16 or float32") from None


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


# ---------------------------------------------------------------------------------------------------------
# models


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


def _layers_prefix(model: nn.Module) -> tuple[nn.ModuleList, str]:
    from quantkit.models import decoder_layers

    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return layers, name
    raise QuantkitError("could not locate the decoder layers inside the model")


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
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
    the timing holds for that layout, the model's outputs mean nothing."""
    import copy

    from quantkit.formats import make_format
    from quantkit.methods import rtn_quantize
    from quantkit.nn import KERNELS, QuantLinear
    from quantkit.nn.act_quant import ACT_QUANTIZERS
    from quantkit.nn.fused import SHARED_INPUT_GROUPS

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
    layers, prefix = _layers_prefix(model)
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
            if isinstance(mod, nn.Linear):
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
            else:
                act, w = None, mod.weight
                if aspec is not None:
                    # Linears reading one input share one layout, as calibration gives them (and can fuse)
                    parent, _, leaf = name.rpartition(".")
                    key = (parent, next((g for g in SHARED_INPUT_GROUPS if leaf in g), leaf), aspec)
                    if key not in layer_layouts:
                        layer_layouts[key] = ACT_QUANTIZERS[aspec.format].for_speed(
                            aspec, mod.in_features, outlier_share, gen).to(mod.weight.device)
                    act = copy.deepcopy(layer_layouts[key])
                    w = act.transform_weight(w)
                fmt = make_format(spec)
                if hasattr(fmt, "prepare"):  # formats with a whole-matrix parameter bind it first
                    fmt = fmt.prepare(w)
                codes, params = rtn_quantize(w, fmt)
                q = QuantLinear.from_codes(mod, spec, codes, params, act=act).to(mod.weight.device)
                del codes, params, w
            made_up_layouts |= q.act is not None
            _set_module(layer, name, q)
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
    no_kernel = sorted(k for k in keys if k not in KERNELS)
    if no_kernel and any(p.is_cuda for p in model.parameters()):
        notes.append(f"no CUDA kernel registered for {', '.join(no_kernel)}: the torch reference "
                     f"(dequantize per call) serves those modules")
    for n in notes:
        log(f"  note: {n}")
    out = {"recipe": recipe.name, "method": "rtn", "modules": n_mod, "fitted_layers": fitted_layers,
           "cloned_layers": cloned_layers, "seconds": secs, "notes": notes}
    if made_up_layouts:
        out["act_layout"] = _act_layout_summary(model)
    return out


def _act_layout_summary(model: nn.Module) -> dict:
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
        _set_module(model, name, lin)
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

    layers, _ = _layers_prefix(model)
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


# ---------------------------------------------------------------------------------------------------------
# attention for single-token queries (GQA without repeating K/V)


def gqa_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface. query [B, H, q, D], key/value [B, Hkv, L, D] → ([B, q, H, D], None).
    q == 1: scores of the query heads of each KV head against that head's keys (K and V read once, not
    repeated per query head), masked (boolean: True attends; float: added), softmax in fp32; on CUDA with a
    boolean mask one Triton kernel (`quantkit.kernels.decode_attention`), else its torch reference. q > 1:
    SDPA."""
    if query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, 0, 0, :]  # [B or 1, L]: one query row, heads broadcast
    if query.is_cuda:
        from quantkit.kernels import decode_attention as da

        if da.supports(query, key, value, mask):  # boolean masks only; additive ones take the torch path
            return torch.ops.quantkit.decode_attention(query, key, value, mask, scale), None
    from quantkit.kernels.decode_attention_reference import decode_attention_ref

    return decode_attention_ref(query, key, value, mask, scale), None


def _plain_causal(config) -> bool:
    if getattr(config, "model_type", None) not in LLAMA_LIKE:
        return False
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(config, "sliding_window", None) is None


def install_decode_attention(model: nn.Module) -> bool:
    """Use `gqa_decode_attention` (registered once with transformers) on Llama-like full-attention models."""
    if not _plain_causal(model.config):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTN, gqa_decode_attention)
    try:
        model.set_attn_implementation(DECODE_ATTN)
    except Exception:
        model.config._attn_implementation = DECODE_ATTN
    return model.config._attn_implementation == DECODE_ATTN


# ---------------------------------------------------------------------------------------------------------
# harness


def _compiled(model: nn.Module):
    """`torch.compile(model)` for the decode step. Every QuantLinear traces into one opaque op
    (`quantkit::wq_matmul` for weight-only formats, `quantkit::lowbit_act_linear` / `quantkit::arc_act_linear`
    with activation quantization: the Triton kernels and their autotuners run as they are), so inductor fuses
    the norms, rotary, attention and residual glue across them."""
    return torch.compile(model, dynamic=False)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Timer:
    """Device events on CUDA, the host clock (after a sync) elsewhere; milliseconds."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def mark(self):
        if self.dev.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.dev.type == "cuda":
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def _category(name: str) -> str:
    n = name.lower()
    if "_gemv_kernel" in n or "_gemv_h2_kernel" in n:
        return "quant GEMV (Triton)"
    if "_gemm_kernel" in n:
        return "quant GEMM (Triton)"
    if "_dequant_kernel" in n:
        return "quant dequant (Triton)"
    if "_decode_attn_kernel" in n or "_combine_kernel" in n:
        return "decode attention (Triton)"
    if n.startswith("triton_"):
        return "inductor-fused glue (Triton)"
    if "triton" in n:
        return "other Triton"
    if any(s in n for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk", "sm90_", "wgmma")):
        return "cuBLAS matmul (bf16 Linears, lm_head, attention bmm)"
    if any(s in n for s in ("softmax", "flash", "fmha", "attention")):
        return "attention softmax / SDPA"
    if any(s in n for s in ("argmax", "reduce", "norm")):
        return "reductions (argmax, RMSNorm)"
    if "memcpy" in n or "memset" in n:
        return "memcpy / memset"
    return "elementwise / other"


def _kernel_breakdown(prof, steps: int) -> dict:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if not t or t <= 0:
            continue
        rows.append({"kernel": e.key[:160], "calls_per_step": e.count / steps, "us_per_step": t / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    cats: dict[str, float] = {}
    for r in rows:
        c = _category(r["kernel"])
        r["category"] = c
        cats[c] = cats.get(c, 0.0) + r["us_per_step"]
    total = sum(cats.values())
    return {"kernel_us_per_step": total,
            "categories": [{"category": c, "us_per_step": v, "share": v / total if total else None}
                           for c, v in sorted(cats.items(), key=lambda kv: -kv[1])],
            "top_kernels": rows[:20]}


@torch.no_grad()
def measure(model: nn.Module, batch: int, cfg: LatencyConfig, log: Callable[[str], None] = print) -> dict:
    """Prefill + decode timings of `model` at batch size `batch` (see the module docstring)."""
    from transformers import StaticCache

    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    p_len, gen = cfg.prompt, cfg.gen
    if gen < 2:
        raise QuantkitError("--gen must be at least 2 (one token from the prefill, then decode steps)")
    total_len = p_len + gen
    vocab = model.config.vocab_size
    custom = model.config._attn_implementation == DECODE_ATTN
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    g = torch.Generator().manual_seed(cfg.seed + batch)
    prompt = torch.randint(0, vocab, (batch, p_len), generator=g).to(dev)
    cache = StaticCache(config=model.config, max_cache_len=total_len)
    ar = torch.arange(total_len, device=dev)
    pre_pos = ar[:p_len].unsqueeze(0).expand(batch, p_len)
    pre_mask = (ar[None, :] <= ar[:p_len, None])[None, None]  # [1, 1, P, L] bool, True attends
    tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)

    kv = cache_argument(model)

    def prefill():
        cache.reset()
        out = model(input_ids=prompt, position_ids=pre_pos, attention_mask=pre_mask if custom else None,
                    use_cache=True, logits_to_keep=1, **{kv: cache})
        tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        pos.fill_(p_len)

    fwd = {"f": _compiled(model) if cfg.compile else model}  # the decode step's forward (compiled or not)

    def step() -> torch.Tensor:
        mask = (ar <= pos).view(1, 1, 1, total_len) if custom else None
        out = fwd["f"](input_ids=tok, position_ids=pos.view(1, 1).expand(batch, 1), attention_mask=mask,
                       use_cache=True, logits_to_keep=1, **{kv: cache})
        logits = out.logits[:, -1]
        tok.copy_(logits.argmax(-1, keepdim=True))
        pos.add_(1)
        return logits

    res: dict = {"batch": batch, "prompt": p_len, "gen": gen, "decode_attention":
                 "gqa_decode_attention (K/V read once per KV head)" if custom else
                 f"transformers '{model.config._attn_implementation}'"}
    # eager warm-up: compilation, autotuning (prefill M = B*P and decode M = B shapes), allocator
    t_w = time.perf_counter()

    def warm():
        prefill()
        for _ in range(3):
            step()
        _sync(dev)

    try:
        warm()
    except Exception as e:
        if not cfg.compile:
            raise
        res["compile_error"] = f"{type(e).__name__}: {e}"[:500]
        log(f"  torch.compile of the decode step failed, running it uncompiled: {res['compile_error']}")
        fwd["f"] = model
        warm()
    res["warmup_s"] = time.perf_counter() - t_w
    graph, static_logits = None, None
    if cuda and cfg.graphs:
        try:
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(dev).wait_stream(s)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_logits = step()
            torch.cuda.synchronize(dev)
            res["decode_method"] = METHOD_GRAPHS
        except Exception as e:  # report and fall back to eager steps
            graph, static_logits = None, None
            torch.cuda.synchronize(dev)
            res["graph_error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"  CUDA graph capture failed, timing eager steps: {res['graph_error']}")
    if graph is None:
        res["decode_method"] = METHOD_EAGER
    if fwd["f"] is not model:
        res["decode_method"] += METHOD_COMPILE
    res["cuda_graphs"] = graph is not None

    def run_step() -> torch.Tensor:
        if graph is not None:
            graph.replay()
            return static_logits
        return step()

    if cfg.check:  # first decode step vs an uncached forward over prompt + first token
        prefill()
        first = tok.clone()
        logits = run_step().float().clone()
        full = torch.cat([prompt, first], dim=1)
        ref = model(input_ids=full, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        res["check"] = {"rel_err": (float((logits - ref).norm() / ref.norm().clamp_min(1e-30))),
                        "argmax_agree": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                        "what": "first decode step logits vs an uncached forward over prompt + first token"}
    timer = _Timer(dev)
    pre_ms, dec_ms = [], []
    for r in range(cfg.warmup + cfg.repeats):
        a = timer.mark()
        prefill()
        b = timer.mark()
        p_ms = timer.ms(a, b)
        c = timer.mark()
        for _ in range(gen - 1):
            run_step()
        d = timer.mark()
        d_ms = timer.ms(c, d)
        if r >= cfg.warmup:
            pre_ms.append(p_ms)
            dec_ms.append(d_ms)
    steps = gen - 1
    pm, dm = statistics.median(pre_ms), statistics.median(dec_ms)
    res.update(prefill_ms=pm, prefill_tok_s=batch * p_len / (pm / 1e3), decode_ms_per_step=dm / steps,
               decode_ms_per_token=dm / steps, decode_tok_s=batch * steps / (dm / 1e3),
               e2e_tok_s=batch * gen / ((pm + dm) / 1e3), prefill_ms_all=pre_ms,
               decode_ms_per_step_all=[x / steps for x in dec_ms], decode_steps=steps)
    kv = sum(t.numel() * t.element_size() for layer in cache.layers
             for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
    res["kv_cache_bytes"] = kv
    if cuda:
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
        res["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    if cuda and cfg.profile:
        res["profile"] = _profile(run_step, step, prefill, graph is not None, dev)
    return res  # the cache and the graph's pool are freed with this frame (the next call collects first)


def _profile(run_step, step, prefill, graphed: bool, dev, steps: int = 4) -> dict:
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for source, fn in ([("graph replays", run_step)] if graphed else []) + [("eager steps", step)]:
        prefill()
        torch.cuda.synchronize(dev)
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize(dev)
            br = _kernel_breakdown(prof, steps)
        except Exception as e:
            out.setdefault("errors", []).append(f"{source}: {type(e).__name__}: {e}"[:300])
            continue
        if br["kernel_us_per_step"] > 0:
            out.update(source=source, **br)
            return out
    return out


# ---------------------------------------------------------------------------------------------------------
# driver


@dataclass
class _Variant:
    name: str
    build: Callable[[], tuple[nn.Module, dict]]
    recipe: str | None = None
    info: dict = field(default_factory=dict)


def _variants(source: str | None, shape: str | None, recipes: list[str], dev: torch.device, dtype: torch.dtype,
              cfg: LatencyConfig, log) -> tuple[list[_Variant], dict]:
    from quantkit.recipe import load_recipe

    base = _short(dtype)
    if shape is not None:
        desc = {"kind": "random-weight model of a named shape", "shape": shape,
                "config": {k: getattr(shape_config(shape), k) for k in (
                    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "tie_word_embeddings")}}

        def make_fp():
            return random_model(shape, dev, dtype, cfg.seed)
    else:
        from quantkit.models import is_quantized_dir, resolve_model_path

        path = resolve_model_path(source)
        if is_quantized_dir(path):
            if recipes:
                raise QuantkitError(f"'{source}' is a quantized checkpoint: --recipe applies to unquantized "
                                    f"models and --shape only")
            import quantkit as qk

            def load_q():
                return qk.load(path, device=str(dev), dtype=dtype)

            def make_twin():
                m = load_q()
                randoms = dequantized_twin(m, dtype)
                return m, ({"notes": [f"{randoms} Linears hold random weights (activation schemes)"]}
                           if randoms else {})

            desc = {"kind": "quantkit checkpoint", "path": str(path)}
            return [_Variant(f"{base} (dequantized twin)", make_twin),
                    _Variant(path.name, lambda: (load_q(), {"notes": ["loaded from the checkpoint"]}),
                             recipe=path.name)], desc
        desc = {"kind": "unquantized model", "path": str(path)}

        def make_fp():
            import quantkit as qk

            m, _ = qk.load_model(str(path), device=str(dev), dtype=dtype)
            return m.eval()

    if not recipes:
        raise QuantkitError("give --recipe (one or more, comma-separated) to quantize the model on the fly")
    out = [_Variant(base, lambda: (make_fp(), {}))]
    for r in recipes:
        rec = load_recipe(r)

        def make_q(rec=rec):
            m = make_fp()
            info = quantize_on_the_fly(m, rec, cfg.fit_budget_s, log, cfg.outlier_share, cfg.seed)
            return m, info

        out.append(_Variant(rec.name, make_q, recipe=rec.name))
        if cfg.lm_head_bits:
            def make_qh(rec=rec, bits=cfg.lm_head_bits):
                m, info = make_q(rec)
                info = dict(info, lm_head=quantize_lm_head(m, bits))
                return m, info

            out.append(_Variant(f"{rec.name}+head{cfg.lm_head_bits}", make_qh, recipe=rec.name))
    return out, desc


def copy_bandwidth(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    from quantkit.eval.bench_kernels import copy_bandwidth as cb

    return cb(dev, 1 << 29)


def _floors(mb: dict, run: dict, bw: float | None) -> dict | None:
    """Bytes one decode step must read (weights except the input embedding, which is read one row at a time;
    the whole K/V cache, as the static-cache attention reads it) over the copy bandwidth."""
    if not bw:
        return None
    head = mb["lm_head"] if not mb["tied_lm_head"] else mb["embedding"]
    parts = {"linear": mb["linear"], "lm_head": head, "other": mb["other"], "kv_cache": run["kv_cache_bytes"]}
    total = sum(parts.values())
    return {"bytes_per_step": total, "floor_ms": total / bw * 1e3,
            "parts_ms": {k: v / bw * 1e3 for k, v in parts.items()},
            "decode_vs_floor": run["decode_ms_per_step"] / (total / bw * 1e3)}


SUMMARY_COLUMNS = [
    Column("variant", "model", "<", "<"), Column("batch", "B", "d"),
    Column("prefill_tok_s", "prefill tok/s", ",.0f"), Column("prefill_x", "x base", ".2f"),
    Column("decode_ms_per_token", "decode ms/step", ".3f"), Column("decode_tok_s", "decode tok/s", ",.1f"),
    Column("decode_x", "x base", ".2f"), Column("decode_x_limit", "x limit", ".2f"),
    Column("vs_floor", "/floor", ".2f"), Column("peak_gib", "peak GiB", ".2f"),
    Column("model_gib", "model GiB", ".2f"), Column("bits", "lin bits/w", ".2f"),
    Column("graphs", "graphs", "<", "<"),
]


def summarize(variants: list[dict]) -> list[dict]:
    """One row per (variant, batch) with ratios against the first variant (the baseline) at the same batch."""
    base = {r["batch"]: (r, variants[0]) for r in variants[0]["runs"]} if variants else {}
    rows = []
    for v in variants:
        for r in v["runs"]:
            b, bv = base.get(r["batch"], (None, None))
            fl, bfl = r.get("floor"), (b or {}).get("floor")
            rows.append({
                "variant": v["name"], "batch": r["batch"], "prefill_tok_s": r["prefill_tok_s"],
                "prefill_x": r["prefill_tok_s"] / b["prefill_tok_s"] if b else None,
                "decode_ms_per_token": r["decode_ms_per_token"], "decode_tok_s": r["decode_tok_s"],
                "decode_x": r["decode_tok_s"] / b["decode_tok_s"] if b else None,
                "decode_x_limit": bfl["floor_ms"] / fl["floor_ms"] if fl and bfl else None,
                "vs_floor": fl["decode_vs_floor"] if fl else None,
                "peak_gib": r["peak_gpu_bytes"] / 2**30 if r.get("peak_gpu_bytes") else None,
                "model_gib": v["model_bytes"]["total"] / 2**30,
                "model_x": v["model_bytes"]["total"] / bv["model_bytes"]["total"] if bv else None,
                "bits": v["model_bytes"]["linear_bits_per_weight"],
                "graphs": "yes" if r["cuda_graphs"] else "no", "e2e_tok_s": r["e2e_tok_s"]})
    return rows


def plot(result: dict, path: str | Path) -> str | None:
    """Bar charts of decode and prefill tokens/s per model and batch; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    rows = result["summary"]
    names = list(dict.fromkeys(r["variant"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(batches), 1)
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tokens/s"), (axes[1], "prefill_tok_s",
                                                                          "prefill tokens/s")):
        for j, b in enumerate(batches):
            vals = [next((r[key] for r in rows if r["variant"] == n and r["batch"] == b), 0) for n in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=f"batch {b}")
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=15)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{result['model'].get('shape') or result['model'].get('path')} on {result['env']['device']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run_latency(source: str | None = None, shape: str | None = None, recipes: list[str] | None = None,
                cfg: LatencyConfig | None = None, json_path: str | Path | None = None,
                plot_path: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Measure the baseline and each quantized variant; print the table; write JSON (after every variant, so
    a run cut short keeps what it measured) and the optional plot. Returns the result dict."""
    cfg = cfg or LatencyConfig()
    if (source is None) == (shape is None):
        raise QuantkitError("give either MODEL_OR_DIR or --shape (a random-weight model of a named shape)")
    if cfg.prompt < 1 or cfg.gen < 2 or not cfg.batches or min(cfg.batches) < 1 or cfg.repeats < 1:
        raise QuantkitError("--prompt >= 1, --gen >= 2, batch sizes >= 1 and --repeats >= 1, please")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError(f"--device {cfg.device} asked for, but torch sees no CUDA GPU; use --device cpu")
    dtype = _dtype(cfg.dtype)
    if cfg.pdl:
        import os

        os.environ["QUANTKIT_PDL"] = "1"
    variants, desc = _variants(source, shape, list(recipes or []), dev, dtype, cfg, log)
    env = environment(dev)
    bw = copy_bandwidth(dev)
    graphs_on = dev.type == "cuda" and cfg.graphs
    result = {"env": env, "model": desc, "config": asdict(cfg), "baseline": variants[0].name,
              "copy_bw_Bps": bw, "decode_method": (METHOD_GRAPHS if graphs_on else METHOD_EAGER)
              + (METHOD_COMPILE if cfg.compile else "") + (METHOD_FUSE if cfg.fuse else "")
              + (METHOD_PDL if cfg.pdl else ""),
              "prefill_method": "eager forward over the prompt into the StaticCache (logits of the last token)",
              "timing": f"median of {cfg.repeats} runs after {cfg.warmup} warm-up runs; each run = prefill "
                        f"(B x {cfg.prompt} tokens) + {cfg.gen - 1} decode steps (the prefill gives the first "
                        f"of {cfg.gen} tokens); decode tok/s = B x steps / decode time",
              "variants": [], "summary": []}
    log(f"bench latency on {env['device']} (torch {env['torch']}, triton {env.get('triton')}, transformers "
        f"{env.get('transformers')}); copy bandwidth "
        + (f"{bw / 1e12:.2f} TB/s" if bw else "n/a") + f"; {result['decode_method']}")
    for v in variants:
        log(f"[{v.name}] building ...")
        t0 = time.perf_counter()
        model, info = v.build()
        model.eval()
        build_s = time.perf_counter() - t0
        custom = install_decode_attention(model)
        if cfg.fuse:
            from quantkit.nn.fused import fuse_shared_input_linears

            info = dict(info, fused_groups=len(fuse_shared_input_linears(model)))
        mb = model_bytes(model)
        log(f"[{v.name}] ready in {build_s:.1f} s: {mb['total'] / 2**30:.2f} GiB "
            f"(decoder Linears {mb['linear'] / 2**30:.2f} GiB at {mb['linear_bits_per_weight']:.2f} bits/weight)")
        entry = {"name": v.name, "recipe": v.recipe, "build_s": build_s, "quantization": info, "model_bytes": mb,
                 "gqa_decode_attention": custom, "runs": []}
        result["variants"].append(entry)
        for b in cfg.batches:
            try:
                r = measure(model, b, cfg, log)
            except torch.cuda.OutOfMemoryError as e:
                entry["runs_failed"] = entry.get("runs_failed", []) + [{"batch": b, "error": str(e)[:300]}]
                log(f"[{v.name}] batch {b}: out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            r["floor"] = _floors(mb, r, bw)
            entry["runs"].append(r)
            chk = r.get("check", {})
            log(f"[{v.name}] B={b}: prefill {r['prefill_tok_s']:,.0f} tok/s ({r['prefill_ms']:.2f} ms), decode "
                f"{r['decode_ms_per_step']:.3f} ms/step = {r['decode_tok_s']:,.1f} tok/s, graphs "
                f"{'yes' if r['cuda_graphs'] else 'no'}, check rel_err {chk.get('rel_err', float('nan')):.2e}"
                + (f", peak {r['peak_gpu_bytes'] / 2**30:.2f} GiB" if r.get("peak_gpu_bytes") else ""))
            if r.get("profile", {}).get("categories"):
                cats = ", ".join(f"{c['category']} {c['us_per_step']:.0f}" for c in r["profile"]["categories"][:5])
                log(f"[{v.name}] B={b}: kernels per step (us, {r['profile']['source']}): {cats}")
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result["summary"] = summarize(result["variants"])
        if json_path:
            write_json(json_path, result)
    text = format_table(result["summary"], SUMMARY_COLUMNS,
                        title=f"{desc.get('shape') or desc.get('path')}, prompt {cfg.prompt}, gen {cfg.gen}, "
                              f"{env['device']}; x base = vs {variants[0].name}; x limit = the baseline's "
                              f"decode bandwidth floor over this model's; /floor = decode time over its own floor")
    log(text)
    result["table"] = text
    if plot_path:
        note = plot(result, plot_path)
        log(note or f"wrote {plot_path}")
        result["plot"] = None if note else str(plot_path)
    if json_path:
        write_json(json_path, result)
        log(f"wrote {json_path}")
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m quantkit.eval.bench_latency ARGS` = `quantkit bench latency ARGS`."""
    import sys

    from quantkit import cli

    sys.argv = ["quantkit", "bench", "latency", *(sys.argv[1:] if argv is None else argv)]
    cli.main()


if __name__ == "__main__":
    main()


__all__ = ["LatencyConfig", "dequantized_twin", "gqa_decode_attention", "measure", "model_bytes",
           "quantize_on_the_fly", "random_model", "run_latency", "shape_config"]
