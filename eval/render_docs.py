"""Render every measured number in README.md and docs/ from the result JSON in docs/results.

    python -m quantkit.eval.render_docs            # rewrite the tables in place (run from the repository root)
    python -m quantkit.eval.render_docs --check    # exit 1 and name the pages that differ from the JSON

A table lives between two marker comments in a Markdown page:

    <!-- results:NAME -->
    ...generated, do not edit...
    <!-- /results -->

NAME is one of `TABLES` below. Each table is followed by a line naming its JSON file(s), the command that
produced them and the library versions they record. Rendering is pure (JSON in, Markdown out, no torch), so
running it twice changes nothing; tests/test_docs.py checks that the committed pages equal the rendered ones.
To add a measurement: write its JSON into docs/results (with "command" and "env"), add a table function here,
and put its markers into the page.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

MARKER = re.compile(r"^(<!-- results:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)^(<!-- /results -->)$", re.S | re.M)
PAGES = ("README.md", "docs/*.md", "docs/methods/*.md")


# ---------------------------------------------------------------------------------------------- formatting
def _ppl(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"


def _x(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.1f}" if v >= 100 else f"{v:.3f}"


def _f(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _table(header: list[str], align: str, rows: list[list[str]]) -> str:
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _env(env: dict | None) -> str:
    if not env or env.get("recorded") is False:
        dev = (env or {}).get("device")
        return "library versions not recorded" + (f"; device {dev}" if dev else "")
    parts = [f"{k} {env[k]}" for k in ("torch", "triton", "transformers") if env.get(k)]
    if env.get("device"):
        parts.append(f"device {env['device']}")
    return ", ".join(parts)


class Results:
    """The JSON files of one results folder, loaded once."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "docs" / "results"
        self._cache: dict[str, dict] = {}

    def __call__(self, name: str) -> dict:
        if name not in self._cache:
            self._cache[name] = json.loads((self.dir / f"{name}.json").read_text())
        return self._cache[name]

    def source(self, *names: str) -> str:
        """The provenance line under a table: file, command, versions."""
        out = []
        for n in names:
            d = self(n)
            cmd = d.get("command", "")
            env = d.get("env") or {k: d[k] for k in ("torch", "triton", "transformers", "device") if k in d}
            out.append(f"`docs/results/{n}.json`: `{cmd}` ({_env(env)})")
        return "Source: " + "; ".join(out) + "."

    @property
    def fp_ppl(self) -> float:
        return next(r["ppl"] for r in self("backbone_ptb")["rows"] if r["recipe"] == "fp")


def _label(r: dict) -> str:
    name = r["recipe"]
    if name.startswith("experiments/recipes/"):
        name = f"`{name}`"
    lab = r.get("label")
    if r.get("variant") == "superseded":
        return f"{name} (superseded: {lab})" if lab else f"{name} (superseded)"
    if r.get("variant") == "re-measured":
        return f"{name} (re-measured: {_env(r.get('env'))})"
    return f"{name} ({lab})" if lab and not name.startswith("`") else (f"{name}: {lab}" if lab else name)


# --------------------------------------------------------------------------------------------- tables
PPL_FILES = ("backbone_ptb", "hlq_ptb", "flexq_ptb", "arcquant_ptb", "comet_ptb")


def _primary(res: Results, recipe: str) -> dict | None:
    for f in PPL_FILES:
        for r in res(f)["rows"]:
            if r["recipe"] == recipe and "variant" not in r and "label" not in r:
                return r
    return None


def _bits(spec: dict | None, default: str) -> str:
    if not spec:
        return default
    g = spec.get("group_size")
    g = "" if g is None else {"channel": " per channel", "token": " per token"}.get(g, f" g{g}")
    return f"{spec.get('format', 'int')} {spec.get('bits', '')}-bit{g}"


def t_recipes(res: Results) -> str:
    import quantkit.recipes as shipped

    fp = res.fp_ppl
    rows, older = [], []
    family = ("rtn-", "gptq-", "hlq-", "int6-", "flexq-", "nvfp4-", "arcquant-", "w4a", "comet-")

    def order(p: Path):
        return (next((i for i, f in enumerate(family) if p.stem.startswith(f)), len(family)), p.stem)

    for path in sorted(Path(shipped.__file__).parent.glob("*.yaml"), key=order):
        y = yaml.safe_load(path.read_text())
        r = _primary(res, y["name"])
        kv = y.get("kv_cache")
        acts = _bits(y.get("activations"), "16-bit")
        if kv:
            acts += f", KV cache {kv.get('format', 'int4')}"
        changed = _method_change(r, y) if r else ""
        if changed:
            older.append(f"`{y['name']}` ({changed})")
        rows.append([f"`{y['name']}`", y.get("method", {}).get("name", "rtn"), _bits(y.get("weights"), "–"), acts,
                     y.get("description", "").split(" - ")[-1] if " - " in y.get("description", "")
                     else y.get("description", ""),
                     (_ppl(r["ppl"]) + (" *" if changed else "")) if r else "not measured",
                     _x(r["ppl"] / fp) if r else "–"])
    t = _table(["recipe", "method", "weights", "activations", "what it is", "PTB ppl", "× FP"], "lllllrr", rows)
    note = ("\n\n\\* measured with earlier recipe settings: " + "; ".join(older) + ". The current settings on "
            "two texts: docs/results.md, \"GPTQ on two texts, beside the peers\"." if older else "")
    return (t + f"\n\nFP (unquantized) PTB perplexity: {_ppl(fp)}. Demo model (SmolLM2-135M-Instruct), PTB test, "
            "sequence length 2048, all full windows, calibration 32 × 2048 tokens of PTB train. "
            "Sources: " + ", ".join(f"`docs/results/{f}.json`" for f in PPL_FILES)
            + " (commands and library versions: docs/results.md)." + note)


def _method_change(row: dict, recipe: dict) -> str:
    """How a recipe's method and weights sections now differ from the ones a row recorded ("" if they do not,
    or the row recorded neither): "act_order false → true, sink_weight 1 → 1024"."""
    import dataclasses

    from quantkit.formats import FORMATS
    from quantkit.methods import ALGORITHMS

    now = recipe.get("method", {"name": "rtn"})
    settings = getattr(ALGORITHMS.get(now.get("name")), "Settings", None)  # what an omitted key means
    out = _section_change(row.get("method"), now,
                          {f.name: f.default for f in dataclasses.fields(settings)} if settings else {})
    w_now = recipe.get("weights") or {}
    fmt = FORMATS.get(w_now.get("format", "int"))
    keys = {k.name: k.default for k in getattr(fmt, "recipe_keys", ())}
    out += _section_change(row.get("weights"), w_now, {"symmetric": False, **keys})
    return ", ".join(out)


def _section_change(was: dict | None, now: dict, defaults: dict) -> list[str]:
    if was is None or was == now:
        return []
    keys = [k for k in dict.fromkeys([*was, *now]) if was.get(k, defaults.get(k)) != now.get(k, defaults.get(k))]

    def v(x):
        if isinstance(x, bool):
            return str(x).lower()
        return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)
    return [f"{k} {v(was.get(k, defaults.get(k)))} → {v(now.get(k, defaults.get(k)))}" for k in keys]


def _flow(d: dict | None) -> str:
    if not d:
        return "–"
    return "`" + yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10**6).strip() + "`"


def t_recipe_list(res: Results) -> str:
    """Every shipped recipe's sections, read from its YAML (no measurements)."""
    import quantkit.recipes as shipped

    rows = []
    for path in sorted(Path(shipped.__file__).parent.glob("*.yaml")):
        y = yaml.safe_load(path.read_text())
        rows.append([f"`{y['name']}`", y.get("description", ""), _flow(y.get("method")), _flow(y.get("weights")),
                     _flow(y.get("activations")), _flow(y.get("kv_cache")),
                     "<br>".join(_flow(o) for o in y.get("overrides") or []) or "–"])
    return _table(["recipe", "description", "method", "weights", "activations", "kv_cache", "overrides"],
                  "lllllll", rows) + "\n\nRead from `recipes/*.yaml`."


def t_backbone(res: Results) -> str:
    fp = res.fp_ppl
    rows = []
    for r in res("backbone_ptb")["rows"]:
        name = "FP (unquantized, fp32)" if r["recipe"] == "fp" else _label(r)
        rows.append([name, _ppl(r["ppl"]), _x(r["ppl"] / fp), _f(r["bits_per_weight"], ".3f"),
                     "–" if r["recipe"] == "fp" else f"{r['quant_seconds']:.0f} s"])
    t = _table(["recipe", "PTB ppl", "× FP", "bits/weight", "quantize time"], "lrrrr", rows)
    return t + "\n\n" + res.source("backbone_ptb")


HLQ_TWIN = {"hlq-w2g64": "gptq-w2g64", "hlq-rtn-w2g64": "rtn-w2g64", "hlq-w3g128": "gptq-w3g128",
            "hlq-rtn-w3g128": "rtn-w3g128"}


def t_hlq(res: Results) -> str:
    fp = res.fp_ppl
    d = res("hlq_ptb")
    rows = []
    for r in d["rows"] + [dict(x, variant="superseded") for x in d.get("superseded", [])]:
        twin = _primary(res, HLQ_TWIN.get(r["recipe"], ""))
        rows.append([_label(r), _ppl(r["ppl"]), _x(r["ppl"] / fp), _f(r["bits_per_weight"], ".3f"),
                     f"{_x(r['ppl'] / twin['ppl'])} × {twin['recipe']}" if twin else "–"])
    t = _table(["recipe", "PTB ppl", "× FP", "bits/weight", "vs uniform INT, same bits and group"], "lrrrr", rows)
    return t + "\n\n" + res.source("hlq_ptb")


def t_flexq(res: Results) -> str:
    d = res("flexq_ptb")
    fp = d["fp_ppl"]
    plain = {r["recipe"]: r["ppl"] for r in d.get("superseded", {}).get("rows", [])}
    rows = [["FP", "–", _ppl(fp), _x(1.0), "–"]]
    for r in d["rows"]:
        rows.append([f"`{r['recipe']}`", f"{r['a8_linears']}/{r['quantized_linears']}", _ppl(r["ppl"]),
                     _x(r["ppl"] / fp), _ppl(plain.get(r["recipe"]))])
    t = _table(["recipe", "Linears with 8-bit inputs", "PTB ppl", "× FP", "PTB ppl, plain-order GPTQ"], "lrrrr", rows)
    return t + "\n\n" + res.source("flexq_ptb")


def t_int6_proxy(res: Results) -> str:
    w = res("flexq_ptb")["int6_weight_experiments"]
    rows = []
    for key in ("proxy_clip_search", "proxy_gptq_knobs"):
        for name, v in w[key]["geomean"].items():
            rows.append([name, _f(v, ".3f") if isinstance(v, (int, float)) else str(v)])
    t = _table(["INT6 weight variant", "output error vs shipped GPTQ (geometric mean)"], "lr", rows)
    cmds = "; ".join(f"`{w[k]['command']}`" for k in ("proxy_clip_search", "proxy_gptq_knobs"))
    return t + f"\n\nSource: `docs/results/flexq_ptb.json` (`int6_weight_experiments`): {cmds}."


def t_arcquant(res: Results) -> str:
    d = res("arcquant_ptb")
    fp = d["fp_ppl"]
    base = next(r["ppl"] for r in d["rows"] if r["recipe"] == "nvfp4-rtn")
    rows = [["FP", _ppl(fp), _x(1.0), "–", "–"]]
    for r in d["rows"]:
        rows.append([_label(r), _ppl(r["ppl"]), _x(r["ppl"] / fp), _f(r["bits_per_weight"], ".2f"),
                     _pct((base - r["ppl"]) / (base - fp))])
    t = _table(["recipe", "PTB ppl", "× FP", "bits/weight", "share of the nvfp4-rtn → FP gap closed"], "lrrrr", rows)
    return t + "\n\n" + res.source("arcquant_ptb")


def t_arcquant_gemma3(res: Results) -> str:
    d = res("arcquant_gemma3")
    e = d["earlier_rows"]
    fp, base = e["fp"], e["nvfp4-rtn"]
    vals = [("FP", fp), ("nvfp4-w4a16", e["nvfp4-w4a16"]), ("nvfp4-rtn", base)]
    vals += [(r["recipe"], r["ppl"]) for r in d["rows"]]
    rows = [[n, _ppl(v), _x(v / fp), _pct((base - v) / (base - fp)) if n != "FP" else "–"] for n, v in vals]
    t = _table(["recipe", "PTB ppl (first 20 windows)", "× FP", "share of the nvfp4-rtn → FP gap closed"], "lrrr", rows)
    return t + "\n\n" + res.source("arcquant_gemma3")


def t_comet(res: Results) -> str:
    d = res("comet_ptb")
    fp = d["fp_ppl"]
    ref = next(r["ppl"] for r in d["rows"] if r["recipe"] == "w4a8-gptq")
    rows = []
    extra = []
    for e in d.get("int8_share_experiments", []):
        for r in [e["row"]] if "row" in e else e.get("rows", []):
            name = r["recipe"].split(" ")[0]
            name = name if name.startswith("experiments/") else f"experiments/recipes/{name}.yaml"
            extra.append(dict(r, recipe=name))
    older = {}
    for r in d["rows"] + extra:
        share = (r.get("int8_block_share") or {}).get("all") if isinstance(r.get("int8_block_share"), dict) else None
        changed = _method_change(r, _recipe_yaml(r["recipe"])) if r.get("method") else ""
        if changed:
            older[changed] = None
        rows.append([_label(r) + (" \\*" if changed else ""), _ppl(r["ppl"]), _x(r["ppl"] / fp), _x(r["ppl"] / ref),
                     _pct(share)])
    t = _table(["recipe", "PTB ppl", "× FP", "× w4a8-gptq", "INT8 activation blocks"], "lrrrr", rows)
    note = ("\n\n\\* GPTQ settings older than the recipe's current ones (" + "; ".join(older) + "); the current "
            "settings are measured on two texts in the next table." if older else "")
    return t + note + "\n\n" + res.source("comet_ptb")


def _recipe_yaml(name: str) -> dict:
    """A shipped recipe's or an experiments/recipes file's YAML, as written."""
    import quantkit.recipes as shipped

    root = Path(__file__).resolve().parents[1]  # experiments/recipes/... are named from the repository root
    path = root / name if name.endswith(".yaml") else Path(shipped.__file__).parent / f"{name}.yaml"
    return yaml.safe_load(path.read_text())


def t_comet_pair(res: Results) -> str:
    """COMET against its own weights with INT8 activations, from the quality job (both texts)."""
    q = res("quality")
    texts = [t["dataset"] for t in q["texts"]]
    fp = {ds: _quality_rows(q)["fp"][0]["ppl"][ds] for ds in texts}
    ref = {r.get("label"): r["ppl"] for r in q["rows"] if r["recipe"] == "w4a8-gptq" and r.get("seed") in (0, None)}
    rows = []
    for r in q["rows"]:
        if r["recipe"] in ("w4a8-gptq", "comet-w4ax", "comet-w4a4kv4") and r.get("label") in ref:
            base = ref[r.get("label")]
            rows.append([_label(r)] + [c for ds in texts for c in (_ppl(r["ppl"][ds]), _x(r["ppl"][ds] / fp[ds]),
                                                                   _x(r["ppl"][ds] / base[ds]))])
    head = ["recipe"] + [f"{ds} {h}" for ds in texts for h in ("ppl", "× FP", "× w4a8-gptq")]
    return _table(head, "l" + "rrr" * len(texts), rows) + "\n\n" + _quality_source(res, "quality")


def t_kv4_bytes(res: Results) -> str:
    rows = [[str(b["group"]), f"{b['kv4_bytes_per_token']:,.0f}", f"{b['bf16_bytes_per_token']:,.0f}",
             _f(b["ratio"], ".3f")] for b in res("kv4_smollm2")["bytes"]]
    t = _table(["group", "KV4 bytes/token", "bf16 bytes/token", "ratio"], "rrrr", rows)
    return t + "\n\n" + res.source("kv4_smollm2")


def t_kv4_ppl(res: Results) -> str:
    rows, seen = [], set()
    for f in ("kv4_smollm2", "kv4_rotate_smollm2"):
        for p in res(f)["ppl"]:
            key = (p["kv"], p["group"])
            if key in seen:
                continue
            seen.add(key)
            fp = next(q["ppl"] for q in res(f)["ppl"] if q["kv"] == "fp")
            kv = {"fp": "FP", "kv4": "KV4", "kv4+rot": "KV4, rotated"}.get(p["kv"], p["kv"])
            rows.append([kv, "–" if p["group"] is None else str(p["group"]), _f(p["ppl"], ".3f"), _x(p["ppl"] / fp)])
    t = _table(["KV cache", "group", "PTB ppl (first 4 windows)", "× FP"], "lrrr", rows)
    return t + "\n\n" + res.source("kv4_smollm2", "kv4_rotate_smollm2")


def t_kv4_generate(res: Results) -> str:
    rows = []
    for f in ("kv4_smollm2", "kv4_rotate_generate_smollm2"):
        for g in res(f)["generation"]:
            rows.append(["yes" if g.get("rotate") else "no", g["dtype"], f"{g['agree']} / {g['tokens']}",
                         _f(g["code_agreement_pct"], ".1f") + "%", _f(g["fp_cache_bitwise_pct"], ".1f") + "%"])
    t = _table(["rotated", "dtype", "greedy tokens agreeing", "stored codes equal",
                "unquantized cache bitwise equal to one full forward"], "llrrr", rows)
    return t + "\n\n" + res.source("kv4_smollm2", "kv4_rotate_generate_smollm2")


def t_kernels_wq(res: Results) -> str:
    d = res("kernels_h200")
    fmts = ["int4_g128", "int3_g128", "int2_g128", "hlq4_g128", "hlq3_g128", "hlq2_g128"]
    rows = []
    for m in sorted({s["M"] for s in d["summary"]}):
        ss = {s["format"]: s for s in d["summary"] if s["M"] == m and s["K"] == 4096 and s["N"] == 14336}
        if not ss:
            continue
        any_ = next(iter(ss.values()))
        cells = [str(m), _f(any_["bf16_us"], ".1f"), _f(any_.get("tinygemm_us"), ",.1f")]
        for f in fmts:
            s = ss.get(f)
            cells.append(f"{s['dispatch_us']:.1f} ({s['dispatch_us'] / s['bf16_us']:.2f})" if s else "–")
        rows.append(cells)
    hdr = ["M", "cuBLAS bf16", "tinygemm int4"] + [f.split("_")[0] for f in fmts]
    t = _table(hdr, "r" * len(hdr), rows)
    return (t + "\n\nµs per call, K = 4096, N = 14336, group 128; in parentheses × cuBLAS bf16. "
            + res.source("kernels_h200"))


def t_kernels_act(res: Results) -> str:
    d, a = res("int8_gemm_h200"), res("arcquant_h200")

    def us(m, c):
        return next((r["us"] for r in d["rows"] if r["M"] == m and r["contender"] == c and r["N"] == 14336), None)

    arc = {s["M"]: s for s in a["summary"] if s["N"] == 14336}
    rows = []
    for m in sorted({r["M"] for r in d["rows"]} | set(arc)):
        b = us(m, "bf16")
        cells = [str(m), _f(b, ".2f")]
        for c in ("w6a8_linear", "comet_linear"):
            v = us(m, c)
            cells.append(f"{v:.2f} ({v / b:.2f})" if v is not None and b else "–")
        s = arc.get(m)
        cells += [_f(s["bf16_us"], ".2f") if s else "–",
                  f"{s['arc_us']:.2f} ({s['arc_vs_bf16']:.2f})" if s else "–"]
        rows.append(cells)
    t = _table(["M", "cuBLAS bf16", "FlexQ W6A8 linear", "COMET W4A4/A8 linear (20% INT8 blocks)",
                "cuBLAS bf16 (ARC run)", "ARCQuant linear (s = 256)"], "rrrrrr", rows)
    return (t + "\n\nµs per call including activation quantization, K = 4096, N = 14336; in parentheses × cuBLAS "
            "bf16 of the same run. " + res.source("int8_gemm_h200", "arcquant_h200"))


def _latency(res: Results, name: str) -> str:
    d = res(name)
    rows = [[r["variant"], _f(r["decode_ms_per_token"], ".3f"), _f(r["decode_tok_s"], ".1f"), _f(r["decode_x"], ".2f"),
             _f(r["decode_x_limit"], ".2f"), f"{r['prefill_tok_s']:,.0f}", _f(r["peak_gib"], ".2f"),
             _f(r["model_gib"], ".2f")] for r in d["summary"]]
    t = _table(["model", "decode ms/token", "decode tok/s", "× bf16", "bandwidth limit (× bf16)", "prefill tok/s",
                "peak GiB", "model GiB"], "lrrrrrrr", rows)
    c = d["config"]
    return (t + f"\n\nLlama-3-8B shape, random weights, batch {c['batches'][0]}, prompt {c['prompt']}, "
            f"{c['gen']} new tokens, {c['dtype']}, CUDA graphs{', torch.compile' if c.get('compile') else ''}; "
            "`+head4`: lm_head quantized to int4. " + res.source(name))


def t_latency_wq(res: Results) -> str:
    return _latency(res, "latency_fused_h200")


def t_latency_act(res: Results) -> str:
    return _latency(res, "latency_act_compiled_h200")


PREFILL_FILES = ("latency_prefill_p512_h100", "latency_prefill_p2048_h100")
PREFILL_VARIANTS = ("bf16", "rtn-w4g128", "hlq-rtn-w2g64")  # the weight-only models of those runs


def t_latency_prefill(res: Results) -> str:
    """Prefill (CUDA-graph replay and eager) and decode of the same runs, one block of rows per prompt length."""
    rows = []
    for name in PREFILL_FILES:
        d = res(name)
        for r in d["summary"]:
            if r["variant"] not in PREFILL_VARIANTS:
                continue
            rows.append([r["variant"], str(d["config"]["prompt"]), f"{r['prefill_tok_s']:,.0f}", _f(r["prefill_x"]),
                         f"{r['prefill_eager_tok_s']:,.0f}" if r.get("prefill_eager_tok_s") else "–",
                         _f(r.get("prefill_eager_x")), _f(r["decode_ms_per_token"], ".3f"), _f(r["decode_x"])])
    t = _table(["model", "prompt", "prefill tok/s", "× bf16", "eager prefill tok/s", "× bf16", "decode ms/token",
                "× bf16"], "lrrrrrrr", rows)
    c = res(PREFILL_FILES[0])["config"]
    return (t + f"\n\nLlama-3-8B shape, random weights, batch {c['batches'][0]}, {c['gen']} new tokens, "
            f"{c['dtype']}; prefill tok/s: the prefill replayed as a CUDA graph (GPU time); eager: the same forward "
            "launched from Python (host overhead included); decode: CUDA graphs"
            f"{', torch.compile' if c.get('compile') else ''}. " + res.source(*PREFILL_FILES))


def t_prefill_profile(res: Results) -> str:
    """Where one prefill's GPU time goes: one CUDA-graph replay under torch.profiler, per model and prompt (an
    eager prefill's span and idle time where no graph was captured)."""
    cats = [("cuBLAS matmul", "cuBLAS"), ("quant dequant", "dequantize"), ("quant GEMM", "fused GEMM"),
            ("attention", "attention"), ("elementwise", "elementwise"), ("reductions", "norms / argmax")]
    rows = []
    for name in PREFILL_FILES:
        d = res(name)
        for v in d["variants"]:
            if v["name"] not in PREFILL_VARIANTS:
                continue
            for r in v["runs"]:
                pp = r.get("prefill_profile", {})
                q = pp.get("graph_replay")
                if q:
                    us = [sum(c["us"] for c in q["categories"] if c["category"].startswith(key)) for key, _ in cats]
                    other = q["kernel_us"] - sum(us)
                    cells = [f"{u / 1e3:.2f}" for u in us] + [f"{other / 1e3:.2f}"]
                    how = "graph"
                elif pp.get("eager"):
                    q, cells, how = pp["eager"], ["–"] * (len(cats) + 1), "eager"
                else:
                    continue
                rows.append([v["name"], str(r["prompt"]), how, str(q["device_kernels"]), f"{q['span_us'] / 1e3:.2f}"]
                            + cells + [f"{q['idle_us'] / 1e3:.2f}"])
    t = _table(["model", "prompt", "run", "kernels", "GPU span ms"] + [label for _, label in cats] + ["other", "idle"],
               "lllrr" + "r" * (len(cats) + 2), rows)
    return (t + "\n\nms per prefill under torch.profiler; graph: one CUDA-graph replay (kernel times by kind), eager: "
            "the forward launched from Python where no graph could be captured (span and idle only); idle: time "
            "between the first and last kernel with no kernel running. " + res.source(*PREFILL_FILES))


def t_prefill_gemm(res: Results) -> str:
    """Weight-only GEMMs at prefill sizes: cuBLAS bf16, the fused GEMM's best config, the workspace path (both
    layouts), and the path `dispatch.choose_path` takes, per fused Llama-3-8B shape, format and M."""
    from quantkit.kernels import dispatch

    d = res("prefill_gemm_h100")
    bf = {(r["K"], r["N"], r["M"]): r["us"] for r in d["rows"] if r["contender"] == "bf16"}
    by: dict[tuple, dict[str, float]] = {}
    for r in d["rows"]:
        if r["M"] == 0 or r["contender"] == "bf16" or r["us"] != r["us"]:
            continue
        path = "gemm" if r["contender"].startswith("gemm") else r["contender"]
        cell = by.setdefault((r["K"], r["N"], r["format"], r["M"]), {})
        cell[path] = min(cell.get(path, float("inf")), r["us"])
    rows = []
    for (k, n, f, m), c in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1], kv[0][3])):
        fmt, bits = ("hlq", int(f[3])) if f.startswith("hlq") else ("int", int(f[3]))
        p = dispatch.Prepared(dispatch._FMT_CODE[fmt], bits, 0, k, n, *([None] * 5))
        chosen = dispatch.choose_path(p, m)
        us = c["gemm"] if chosen == "gemm" else c["dequant_nk" if dispatch.DEQUANT_NK else "dequant_kn"]
        b = bf[(k, n, m)]
        rows.append([f, f"{k}×{n}", str(m), f"{b:.1f}", _f(c.get("gemm"), ".1f"), _f(c.get("dequant_kn"), ".1f"),
                     _f(c.get("dequant_nk"), ".1f"), chosen, f"{us / b:.2f}"])
    t = _table(["format", "K×N", "M", "cuBLAS bf16 µs", "fused GEMM µs (best config)", "workspace [K, N] µs",
                "workspace [N, K] µs", "dispatch", "dispatch × bf16"], "llrrrrrlr", rows)
    return (t + "\n\nµs per GEMM, CUDA-graph replays over weight copies > 2.5× L2; fused GEMM: the fastest of "
            "the block-size / warp / stage / operand-order configs tried at that M. " + res.source("prefill_gemm_h100"))


def t_offload(res: Results) -> str:
    g, c = res("offload_gpu_h100"), res("offload_cpu")
    gib = 2**30
    rows = [[f"GPU ({g['gpu']})", g["recipe"], f"{g['nsamples']} × {g['seq_len']}",
             f"Llama-3-8B shape, {g['source_bytes'] / gib:.2f} GiB bf16", _f(g["peak_vram_allocated_bytes"] / gib),
             _f(g["peak_rss_bytes"] / gib), "–"]]
    for r in c["rows"]:
        rows.append(["CPU", r["recipe"], "4 × 512", c["checkpoint"].split(": ")[-1], "–", _f(r["peak_rss_gib"]),
                     r["wall"]])
    t = _table(["device", "recipe", "calibration tokens", "checkpoint", "peak VRAM GiB", "peak RSS GiB", "wall (m:s)"],
               "lllllrr", rows)
    return t + "\n\n" + res.source("offload_gpu_h100", "offload_cpu")


def t_kernels_act_prefill(res: Results) -> str:
    """Activation-quantized GEMMs at prefill sizes on every Llama-3-8B Linear shape: the per-group forms against
    the per-token one (int32 accumulation over all of K, scales once in the epilogue)."""
    d = res("int8_gemm_h100")
    by: dict[tuple, dict[str, float]] = {}
    for r in d["rows"]:
        by.setdefault((r["K"], r["N"], r["M"]), {})[r["contender"]] = r["us"]
    rows = []
    for (k, n, m), c in sorted(by.items()):
        b = c["bf16"]

        def cell(name, c=c, b=b):
            v = c.get(name)
            return f"{v:.1f} ({v / b:.2f})" if v is not None else "–"
        rows.append([f"{k}×{n}", str(m), f"{b:.1f}", cell("w6a8_linear"), cell("w6a8_token"), cell("w6a8_token_gemm"),
                     cell("comet_linear"), _f(c.get("act_quant_a8"), ".1f"), _f(c.get("act_quant_comet"), ".1f")])
    t = _table(["K×N", "M", "cuBLAS bf16", "W6A8 per group, linear", "W6A8 per token, linear",
                "W6A8 per token, GEMM only", "COMET W4A4/A8 linear", "INT8 quantize (per token)",
                "COMET quantize (gather + blocks)"], "lrrrrrrrr", rows)
    return (t + "\n\nµs per call, CUDA-graph replays over weight copies > 2.5× L2; linear: activation "
            "quantization and GEMM; in parentheses × cuBLAS bf16 of the same run. " + res.source("int8_gemm_h100"))


def _latency_rows(d: dict, variants=None) -> list[list[str]]:
    return [[r["variant"], str(d["config"]["prompt"]), f"{r['prefill_tok_s']:,.0f}", _f(r["prefill_x"]),
             f"{r['prefill_eager_tok_s']:,.0f}" if r.get("prefill_eager_tok_s") else "–", _f(r.get("prefill_eager_x")),
             _f(r["decode_ms_per_token"], ".3f"), _f(r["decode_x"]), _f(r["peak_gib"])]
            for r in d["summary"] if variants is None or r["variant"] in variants]


LATENCY_HEAD = (["model", "prompt", "prefill tok/s", "× bf16", "eager prefill tok/s", "× bf16", "decode ms/token",
                 "× bf16", "peak GiB"], "lrrrrrrrr")


def t_latency_prefetch(res: Results) -> str:
    t = _table(LATENCY_HEAD[0], LATENCY_HEAD[1], _latency_rows(res("latency_prefetch_p512_h100")))
    return (t + "\n\nLlama-3-8B shape, random weights, batch 1, 128 new tokens, bfloat16, CUDA graphs, "
            "torch.compile; the quantized rows without a suffix run with the workspace prefetch on. "
            + res.source("latency_prefetch_p512_h100"))


def t_latency_act_prefill(res: Results) -> str:
    t = _table(LATENCY_HEAD[0], LATENCY_HEAD[1], _latency_rows(res("latency_act_prefill_p2048_h100")))
    return (t + "\n\nLlama-3-8B shape, random weights, batch 1, 128 new tokens, bfloat16, CUDA graphs, "
            "torch.compile. " + res.source("latency_act_prefill_p2048_h100"))


TABLES: dict[str, Callable[[Results], str]] = {
    "recipes": t_recipes, "recipe-list": t_recipe_list, "backbone": t_backbone, "hlq": t_hlq, "flexq": t_flexq, "int6-proxy": t_int6_proxy,
    "arcquant": t_arcquant, "arcquant-gemma3": t_arcquant_gemma3, "comet": t_comet, "kv4-bytes": t_kv4_bytes,
    "kv4-ppl": t_kv4_ppl, "kv4-generate": t_kv4_generate, "kernels-wq": t_kernels_wq, "kernels-act": t_kernels_act,
    "latency-wq": t_latency_wq, "latency-act": t_latency_act, "latency-prefill": t_latency_prefill,
    "prefill-profile": t_prefill_profile, "prefill-gemm": t_prefill_gemm, "offload": t_offload,
    "kernels-act-prefill": t_kernels_act_prefill, "latency-prefetch": t_latency_prefetch,
    "latency-act-prefill": t_latency_act_prefill,
}


# ------------------------------------------------------------------------------- quality job, peers
def _seed_stats(rows: list[dict], ds: str) -> tuple[float, float | None]:
    v = [r["ppl"][ds] for r in rows]
    mean = sum(v) / len(v)
    return mean, ((sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else None)


def _pm(mean: float, sd: float | None, fmt) -> str:
    return fmt(mean) if sd is None else f"{fmt(mean)} ± {fmt(sd)}"


def _quality_source(res: Results, name: str) -> str:
    d = res(name)
    env = d["env"]
    libs = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "numpy", "gensim") if env.get(k))
    cmds = d.get("commands") or [d["command"]]  # a merged file lists every command; "command" joins them
    return (f"Source: `docs/results/{name}.json`: " + "; then ".join(f"`{c}`" for c in cmds)
            + f" ({libs}, {env.get('threads')} thread{'' if env.get('threads') == 1 else 's'}, "
            f"device {env.get('device')}).")


def _quality_rows(d: dict) -> dict[str, list[dict]]:
    """Rows by table line (the recipe, or the recipe and its label: a row measured with other settings than
    the recipe ships with names them in its label), the seeds of one line together."""
    by: dict[str, list[dict]] = {}
    for r in d["rows"]:
        by.setdefault(_label(r), []).append(r)
    return by


def t_quality(res: Results, name: str = "quality") -> str:
    """Every recipe of the quality job on both texts; mean ± standard deviation over calibration seeds."""
    d = res(name)
    texts = [t["dataset"] for t in d["texts"]]
    by = _quality_rows(d)
    fp = {ds: _quality_rows(res("quality"))["fp"][0]["ppl"][ds] for ds in texts}
    rows = []
    for recipe, rs in by.items():
        cells = ["FP (unquantized, fp32)" if recipe == "fp" else recipe]
        for ds in texts:
            m, sd = _seed_stats(rs, ds)
            cells += [_pm(m, sd, _ppl), _pm(m / fp[ds], None if sd is None else sd / fp[ds], _x)]
        secs = [r["quant_seconds"] for r in rs if "quant_seconds" in r]
        cells += [_f(rs[0]["bits_per_weight"], ".3f"), f"{sum(secs) / len(secs):.0f} s" if secs else "–",
                  str(len(rs)) if recipe != "fp" else "–"]
        rows.append(cells)
    head = ["recipe"]
    for t in d["texts"]:
        head += [f"{t['dataset']} ppl ({t['windows']} windows)", "× FP"]
    t = _table(head + ["bits/weight", "quantize time", "seeds"], "l" + "rr" * len(texts) + "rrr", rows)
    return t + "\n\n" + _quality_source(res, name)


def t_gptq_variants(res: Results) -> str:
    """GPTQ settings measured in memory (no save/reload) in the quality job's environment; FP from its file."""
    return t_quality(res, "gptq_variants") + " FP: `docs/results/quality.json`."


PEER_TWINS = ("gptq-w4g128", "gptq-w3g128", "hlq-w3g128")


def _peer_library(row: dict) -> str:
    """A peer row's library and version, as the peer's environment reported it."""
    v = row["peer"].get("versions", {})
    return f"llm-compressor {v.get('llmcompressor')}" if row["peer"]["library"] == "llmc" else f"hqq {v.get('hqq')}"


def t_peers(res: Results) -> str:
    """quantkit's default GPTQ recipes beside the peers, by the same evaluator on the same windows."""
    q, p = res("quality"), res("peers")
    texts = [t["dataset"] for t in q["texts"]]
    by = _quality_rows(q)
    fp = {ds: by["fp"][0]["ppl"][ds] for ds in texts}
    if (res.dir / "gptq_variants.json").exists():  # settings measured in memory, same environment
        by.update({f"{line}, in memory": rs for line, rs in _quality_rows(res("gptq_variants")).items()})
    rows = []
    for line, rs in by.items():
        if rs[0]["recipe"] in PEER_TWINS:
            rs = [r for r in rs if r.get("seed") == 0] or rs
            rows.append((rs[0]["bits_per_weight"], f"quantkit {line}", rs[0]["ppl"]))
    for r in p["rows"]:
        rows.append((r["bits_per_weight"], f"{_peer_library(r)}: `{r['config']}`", r["ppl"]))
    rows.sort(key=lambda x: -x[0])
    head = ["method", "bits/weight"] + [f"{ds} ppl" if i % 2 == 0 else "× FP" for ds in texts for i in range(2)]
    body = [[name, _f(bits, ".3f")] + [c for ds in texts for c in (_ppl(ppl[ds]), _x(ppl[ds] / fp[ds]))]
            for bits, name, ppl in rows]
    t = _table(head, "lr" + "rr" * len(texts), body)
    return (t + "\n\n" + _quality_source(res, "quality") + "\n" +
            f"Peers: `docs/results/peers.json`: `{p['command']}`.")


def t_peers_brief(res: Results) -> str:
    """The README's short form: the shipped W4/W3 GPTQ recipes as they are now (quality-job rows without a
    label; mean ± sd over seeds) beside every peer row."""
    q, p = res("quality"), res("peers")
    texts = [t["dataset"] for t in q["texts"]]
    fp = {ds: _quality_rows(q)["fp"][0]["ppl"][ds] for ds in texts}
    rows = []
    for line, rs in _quality_rows(q).items():
        if rs[0]["recipe"] in ("gptq-w4g128", "gptq-w3g128") and not rs[0].get("label"):
            cells = []
            for ds in texts:
                m, sd = _seed_stats(rs, ds)
                cells += [_pm(m, sd, _ppl), _x(m / fp[ds])]
            rows.append((rs[0]["bits_per_weight"], f"quantkit `{line}`" + (f" ({len(rs)} seeds)" if len(rs) > 1 else ""),
                         cells))
    for r in p["rows"]:
        rows.append((r["bits_per_weight"], f"{_peer_library(r)} `{r['config']}`",
                     [c for ds in texts for c in (_ppl(r["ppl"][ds]), _x(r["ppl"][ds] / fp[ds]))]))
    rows.sort(key=lambda x: -x[0])
    head = ["method", "bits/weight"] + [h for ds in texts for h in (f"{ds} ppl", "× FP")]
    t = _table(head, "lr" + "rr" * len(texts), [[name, _f(bits, ".3f"), *cells] for bits, name, cells in rows])
    return (t + f"\n\nDemo model, PTB test (first {q['texts'][0]['windows']} windows) and enwiki (first "
            f"{q['texts'][1]['windows']}), calibration {q['nsamples']} × {q['seq_len']} tokens of PTB train, the "
            "same evaluator for every row; bits per weight as each library stores them (quantkit pads K = 576 to "
            "whole groups of 128). Details and sources: docs/results.md.")


TABLES.update({"quality": t_quality, "gptq-variants": t_gptq_variants, "peers": t_peers, "comet-pair": t_comet_pair,
               "peers-brief": t_peers_brief})


# -------------------------------------------------------------------------------------------- driver
def render_text(text: str, res: Results, where: str = "") -> str:
    """`text` with every marked table re-rendered."""

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"{where}: unknown results table {name!r} (known: {', '.join(TABLES)})")
        return f"{m.group(1)}{TABLES[name](res)}\n{m.group(4)}"

    return MARKER.sub(sub, text)


def pages(root: Path) -> list[Path]:
    return sorted({p for pat in PAGES for p in root.glob(pat)})


def render(root: str | Path = ".", check: bool = False) -> list[Path]:
    """Render every page under `root`; returns the pages that changed (with `check`, that would change)."""
    root = Path(root)
    res = Results(root)
    changed = []
    for p in pages(root):
        old = p.read_text()
        new = render_text(old, res, str(p))
        if new != old:
            changed.append(p)
            if not check:
                p.write_text(new)
    return changed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="repository root (default: the current folder)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    args = ap.parse_args(argv)
    changed = render(args.root, check=args.check)
    for p in changed:
        print(f"{'out of date' if args.check else 'rendered'}: {p}")
    if args.check and changed:
        sys.exit(1)


if __name__ == "__main__":
    main()
