"""Timing for the latency benchmark (eval/bench_latency.py): `measure` (prefill + decode of one model at one
batch size: StaticCache, CUDA-graph replays of one decode step, optional torch.compile, first-step check),
the torch.profiler kernel breakdown per decode step, the copy bandwidth and the decode bandwidth floor.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.eval.latency_attention import DECODE_ATTN
from quantkit.kvcache import cache_argument

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
    prefill_graphs: bool = True  # on CUDA (with graphs on): also time the prefill as a CUDA-graph replay
    prefetch: str = "off"  # workspace prefetch for prefill-size products (kernels/prefetch.py): on, off, both


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
    if any(s in n for s in ("softmax", "flash", "fmha", "attention")):  # before "cutlass": fmha_cutlassF_...
        return "attention softmax / SDPA"
    if any(s in n for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk", "sm90_", "wgmma")):
        return "cuBLAS matmul (bf16 Linears, lm_head, attention bmm)"
    if any(s in n for s in ("argmax", "reduce", "norm")):
        return "reductions (argmax, RMSNorm)"
    if "memcpy" in n or "memset" in n:
        return "memcpy / memset"
    return "elementwise / other"


def _kernel_breakdown(prof, steps: int) -> dict:
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if getattr(e, "device_type", DeviceType.CUDA) == DeviceType.CPU:
            continue  # host ops (profiled with CPU activity) carry their kernels' time too: count kernels once
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
    # the static cache holds the prompt, the generated tokens and the untimed steps run after one prefill (warm-up
    # 3, graph capture 2, profiler 4) for short --gen
    total_len = p_len + max(gen, 8)
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

    first_ms = []

    def warm():
        t = time.perf_counter()
        prefill()
        _sync(dev)
        first_ms.append((time.perf_counter() - t) * 1e3)
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
    res["kernel_paths"] = kernel_paths(model, batch * p_len, batch)
    first_prefill_ms = first_ms[-1]  # the first prefill of this shape: kernel compilation and autotuning included
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

    pre_graph = None
    if cuda and cfg.graphs and cfg.prefill_graphs:
        pre_graph = _capture(prefill, dev, res, "prefill_graph_error", log)

    def run_prefill():
        if pre_graph is not None:
            pre_graph.replay()
        else:
            prefill()

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
    pre_ms, eager_ms, dec_ms, warm_pre = [], [], [], []
    for r in range(cfg.warmup + cfg.repeats):
        a = timer.mark()
        prefill()
        b = timer.mark()
        e_ms = timer.ms(a, b)
        p_ms = e_ms
        if pre_graph is not None:
            a = timer.mark()
            pre_graph.replay()
            b = timer.mark()
            p_ms = timer.ms(a, b)
        c = timer.mark()
        for _ in range(gen - 1):
            run_step()
        d = timer.mark()
        d_ms = timer.ms(c, d)
        if r >= cfg.warmup:
            pre_ms.append(p_ms)
            eager_ms.append(e_ms)
            dec_ms.append(d_ms)
        else:
            warm_pre.append(e_ms)
    steps = gen - 1
    pm, dm, em = statistics.median(pre_ms), statistics.median(dec_ms), statistics.median(eager_ms)
    res.update(prefill_ms=pm, prefill_tok_s=batch * p_len / (pm / 1e3), decode_ms_per_step=dm / steps,
               decode_ms_per_token=dm / steps, decode_tok_s=batch * steps / (dm / 1e3),
               e2e_tok_s=batch * gen / ((pm + dm) / 1e3), prefill_ms_all=pre_ms,
               prefill_graphs=pre_graph is not None,
               prefill_eager_ms=em, prefill_eager_tok_s=batch * p_len / (em / 1e3), prefill_eager_ms_all=eager_ms,
               prefill_first_ms=first_prefill_ms, prefill_warmup_ms=warm_pre,
               decode_ms_per_step_all=[x / steps for x in dec_ms], decode_steps=steps)
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
             for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
    res["kv_cache_bytes"] = kv_bytes
    if cuda:
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
        res["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    if cuda and cfg.profile:
        res["profile"] = _profile(run_step, step, prefill, graph is not None, dev)
        res["prefill_profile"] = _profile_prefill(prefill, pre_graph, dev)
    return res  # the cache and the graph's pool are freed with this frame (the next call collects first)


def kernel_paths(model: nn.Module, m_prefill: int, m_decode: int) -> dict:
    """Which weight-only kernel path (`quantkit.kernels.dispatch.choose_path`) each quantized Linear takes at the
    prefill's and a decode step's M: {"prefill": {"KxN path": count}, "decode": {...}} (empty for other models)."""
    out: dict[str, dict[str, int]] = {"prefill": {}, "decode": {}}
    mods = [m for m in model.modules() if getattr(m, "_kernel_prepared", None) is not None]
    if not mods:
        return out
    from quantkit.kernels.dispatch import choose_path

    for mod in mods:
        p = mod._kernel_prepared[1]
        for phase, m in (("prefill", m_prefill), ("decode", m_decode)):
            key = f"{p.k}x{p.n} {choose_path(p, m)}"
            out[phase][key] = out[phase].get(key, 0) + 1
    return out


def _capture(fn, dev, res: dict, err_key: str, log):
    """`fn` captured as a CUDA graph (after a side-stream warm-up run), or None (reason in res[err_key])."""
    try:
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream(dev).wait_stream(s)
        torch.cuda.synchronize(dev)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize(dev)
        return g
    except Exception as e:
        torch.cuda.synchronize(dev)
        res[err_key] = f"{type(e).__name__}: {e}"[:500]
        log(f"  CUDA graph capture failed ({err_key}): {res[err_key]}")
        return None


def _busy_and_span(kernels: list[tuple[float, float]]) -> tuple[float, float]:
    """(µs during which at least one kernel ran, µs from the first kernel's start to the last one's end)."""
    if not kernels:
        return 0.0, 0.0
    kernels = sorted(kernels)
    busy, cur_s, cur_e = 0.0, kernels[0][0], kernels[0][1]
    for s, e in kernels[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy, max(e for _, e in kernels) - kernels[0][0]


def _one_prefill_profile(fn, dev, cpu: bool) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    torch.cuda.synchronize(dev)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        wall = (time.perf_counter() - t0) * 1e6
    br = _kernel_breakdown(prof, 1)
    spans, launches = [], 0
    host: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            tr = e.time_range
            if tr.end > tr.start:
                spans.append((tr.start, tr.end))
                launches += 1
        elif cpu and e.device_type == DeviceType.CPU:
            h = host.setdefault(e.name, [0, 0.0])
            h[0] += 1
            h[1] += e.self_cpu_time_total
    busy, span = _busy_and_span(spans)
    out = {"wall_us": wall, "device_kernels": launches, "kernel_us": br["kernel_us_per_step"],
           "busy_us": busy, "span_us": span, "idle_us": span - busy,
           "idle_share": (span - busy) / span if span else None,
           "categories": [{"category": c["category"], "us": c["us_per_step"], "share": c["share"]}
                          for c in br["categories"]],
           "top_kernels": [{"kernel": r["kernel"], "calls": r["calls_per_step"], "us": r["us_per_step"],
                            "category": r["category"]} for r in br["top_kernels"]]}
    if cpu:
        ops = sorted(host.items(), key=lambda kv: -kv[1][1])
        copies = {k: v for k, v in host.items() if k in ("aten::copy_", "aten::contiguous", "aten::clone",
                                                              "aten::to", "aten::_to_copy")}
        out["host_top_ops"] = [{"op": k[:120], "calls": v[0], "self_cpu_us": v[1]} for k, v in ops[:15]]
        out["host_copies"] = {k: {"calls": v[0], "self_cpu_us": v[1]} for k, v in copies.items()}
        out["note"] = ("eager prefill under the CPU + CUDA profiler: host times include the profiler's own "
                       "overhead; idle_us = device time between the first and last kernel with no kernel running "
                       "(launch gaps: the host not keeping up)")
    return out


def _profile_prefill(prefill, pre_graph, dev) -> dict:
    """Per-op profile of one prefill: the eager forward (kernels by kind, top kernels, device idle time between
    kernels, host ops and copies) and, when captured, one CUDA-graph replay of it (kernels and idle time)."""
    out = {}
    try:
        prefill()
        out["eager"] = _one_prefill_profile(prefill, dev, cpu=True)
        if pre_graph is not None:
            out["graph_replay"] = _one_prefill_profile(pre_graph.replay, dev, cpu=False)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


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


def copy_bandwidth(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    from quantkit.eval.bench_kernels import copy_bandwidth as cb

    return cb(dev, 1 << 29)


def decode_floors(mb: dict, run: dict, bw: float | None) -> dict | None:
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
