"""End-to-end latency (`quantkit bench latency`): prefill tokens/s, decode ms/token and tokens/s, peak GPU memory
and model bytes of quantized models next to the unquantized (bf16) model, measured in one run by one harness.

Imported as `quantkit.eval.bench_latency`; `run_latency(...)` is the entry point, the CLI parses the options.
Modules: this one (options, variants, table, plot, JSON), `latency_models` (random-weight shapes, on-the-fly
quantization through the pipeline's layer step, lm_head, dequantized twin, bytes), `latency_attention` (the
GQA decode attention), `latency_timing` (`measure`, profiling, bandwidth floors).

Models:
- `--shape llama3-8b` (or any preset of `quantkit.eval.make_random_checkpoint`): a random-weight Llama of that
  shape built directly on the device in the baseline dtype (N(0, 0.02) Linears and embeddings, seeded), then,
  per recipe, built again and quantized on the fly, layer by layer through the pipeline's step
  (`quantkit.pipeline.quantize_layer`, no data: the recipe's weight format, fitted by RTN: the kernels and
  bytes depend on the format only; activation-quantized Linears get a made-up layout). No weights travel.
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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.eval.latency_attention import gqa_decode_attention, install_decode_attention
from quantkit.eval.latency_models import (
    dequantized_twin,
    model_bytes,
    quantize_lm_head,
    quantize_on_the_fly,
    random_model,
    shape_config,
)
from quantkit.eval.latency_timing import (
    METHOD_COMPILE,
    METHOD_EAGER,
    METHOD_FUSE,
    METHOD_GRAPHS,
    METHOD_PDL,
    LatencyConfig,
    copy_bandwidth,
    decode_floors,
    measure,
)
from quantkit.eval.report import Column, environment, format_table, write_json

PREFILL_EAGER = "eager forward over the prompt into the StaticCache (logits of the last token)"
PREFILL_GRAPHS = ("the prefill (cache reset, forward over the prompt into the StaticCache, argmax of the last "
                  "token) captured once as a CUDA graph and replayed, in every model alike; the eager forward "
                  "is timed in the same runs (prefill_eager_*: host launch overhead included)")


def _dtype(name: str) -> torch.dtype:
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]
    except KeyError:
        raise QuantkitError(f"unknown --dtype '{name}': use bfloat16, float16 or float32") from None


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


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


SUMMARY_COLUMNS = [
    Column("variant", "model", "<", "<"), Column("batch", "B", "d"),
    Column("prefill_tok_s", "prefill tok/s", ",.0f"), Column("prefill_x", "x base", ".2f"),
    Column("prefill_eager_tok_s", "eager prefill", ",.0f"), Column("prefill_eager_x", "x base", ".2f"),
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
                "prefill_eager_tok_s": r.get("prefill_eager_tok_s"),
                "prefill_eager_x": (r["prefill_eager_tok_s"] / b["prefill_eager_tok_s"]
                                    if b and r.get("prefill_eager_tok_s") and b.get("prefill_eager_tok_s")
                                    else None),
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


def _prefetch_modes(model, cfg: LatencyConfig, dev: torch.device) -> list[str]:
    """Workspace prefetch states to measure `model` in (installing the first); ["none"] without a plan (CPU,
    no weight-only QuantLinears)."""
    if dev.type != "cuda":
        return ["none"]
    if cfg.prefetch == "off":
        return ["off"]
    from quantkit.kernels import prefetch

    if prefetch.install(model) is None:
        return ["none"]
    return ["on", "off"] if cfg.prefetch == "both" else ["on"]


def _measure_batches(model, entry: dict, name: str, cfg: LatencyConfig, bw, log) -> None:
    mb = entry["model_bytes"]
    if entry["workspace_prefetch"] == "off":
        from quantkit.kernels import prefetch

        prefetch.uninstall(model)
    for b in cfg.batches:
        try:
            r = measure(model, b, cfg, log)
        except torch.cuda.OutOfMemoryError as e:
            entry["runs_failed"] = entry.get("runs_failed", []) + [{"batch": b, "error": str(e)[:300]}]
            log(f"[{name}] batch {b}: out of memory, skipped")
            torch.cuda.empty_cache()
            continue
        r["floor"] = decode_floors(mb, r, bw)
        entry["runs"].append(r)
        chk = r.get("check", {})
        log(f"[{name}] B={b}: prefill {r['prefill_tok_s']:,.0f} tok/s ({r['prefill_ms']:.2f} ms"
            + (f"; eager {r['prefill_eager_ms']:.2f} ms" if r.get("prefill_graphs") else "") + "), decode "
            f"{r['decode_ms_per_step']:.3f} ms/step = {r['decode_tok_s']:,.1f} tok/s, graphs "
            f"{'yes' if r['cuda_graphs'] else 'no'}, check rel_err {chk.get('rel_err', float('nan')):.2e}"
            + (f", peak {r['peak_gpu_bytes'] / 2**30:.2f} GiB" if r.get("peak_gpu_bytes") else ""))
        pp = r.get("prefill_profile", {})
        for src in ("eager", "graph_replay"):
            if pp.get(src, {}).get("categories"):
                q = pp[src]
                cats = ", ".join(f"{c['category']} {c['us']:.0f}" for c in q["categories"][:6])
                log(f"[{name}] B={b}: prefill {src}: {q['device_kernels']} kernels, {q['kernel_us']:.0f} us "
                    f"of kernels, idle {q['idle_us']:.0f} us of {q['span_us']:.0f}; {cats}")
        if r.get("profile", {}).get("categories"):
            cats = ", ".join(f"{c['category']} {c['us_per_step']:.0f}" for c in r["profile"]["categories"][:5])
            log(f"[{name}] B={b}: kernels per step (us, {r['profile']['source']}): {cats}")


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
              "prefill_method": (PREFILL_GRAPHS if graphs_on and cfg.prefill_graphs else PREFILL_EAGER),
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
        for mode in _prefetch_modes(model, cfg, dev):
            name = v.name + (" (no prefetch)" if mode == "off" and cfg.prefetch == "both" else "")
            entry = {"name": name, "recipe": v.recipe, "build_s": build_s, "quantization": info, "model_bytes": mb,
                     "gqa_decode_attention": custom, "workspace_prefetch": mode, "runs": []}
            result["variants"].append(entry)
            _measure_batches(model, entry, name, cfg, bw, log)
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
           "quantize_lm_head", "quantize_on_the_fly", "random_model", "run_latency", "shape_config"]
