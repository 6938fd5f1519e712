"""Byte-identity proof for refactors: sha256 of every file of every shipped recipe's checkpoint.

Builds a tiny random-weight Llama (deterministically, from a transformers `LlamaConfig`) with a word-level
tokenizer and a fixed calibration text, quantizes it with EVERY shipped recipe through the public API
(`quantkit.quantize` + `quantkit.save`) and, for a few representative recipes, through the disk-offload
streaming path (`quantkit.quantize_streaming`), and records the sha256 of each file of each checkpoint.

    # record (run from a cwd that is not a quantkit checkout: its top-level kernels/ can shadow HF `kernels`)
    cd /tmp && python /work/main/experiments/checkpoint_hashes.py --out hashes.json

    # re-run with the quantkit on the path now and compare; exits 1 if any file differs
    cd /tmp && python /work/main/experiments/checkpoint_hashes.py --compare baseline.json

The settings that shape the checkpoints (model shape, calibration size, thread count, streaming recipes)
are stored in the JSON; `--compare` re-uses the baseline's settings, so only the code under test changes.
Everything runs on CPU with one intra-op thread (`--threads`): the calibrated recipes (GPTQ, HLQ, the
activation schemes) change bytes with the thread count, since matmul reductions are split differently, and
may change with the CPU's kernel ISA (recorded as versions.cpu_capability); compare on the same kind of
machine with the same library versions (the compare warns when they differ).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_STREAMING = ("rtn-w4g128", "gptq-w4g128", "hlq-w3g128", "w4a8-rtn", "arcquant-nvfp4-gptq",
                     "flexq-w6a6", "comet-w4a4kv4")

DEFAULT_SETTINGS = {
    "model": {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "tie_word_embeddings": True, "seed": 0},
    "vocab_words": 400,       # tokenizer words w0..w{n-1} (+ [UNK] = id 0); ids stay below vocab_size
    "text_words": 6000,       # calibration text length, words drawn with random.Random(text_seed)
    "text_seed": 0,
    "nsamples": 8,
    "seq_len": 64,
    "calib_seed": 0,
    "threads": 1,
    "streaming": list(DEFAULT_STREAMING),
}

VERSION_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "gguf",
                    "triton", "huggingface_hub", "pyyaml")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- fixtures


def build_source(folder: Path, settings: dict) -> Path:
    """A tiny random Llama + word-level tokenizer saved as an HF folder; returns the calibration .txt."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    m = dict(settings["model"])
    seed = m.pop("seed")
    cfg = LlamaConfig(**m)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(folder))

    nwords = settings["vocab_words"]
    if nwords + 1 > m["vocab_size"]:
        raise SystemExit(f"vocab_words {nwords} does not fit vocab_size {m['vocab_size']}")
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(nwords)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))

    rng = random.Random(settings["text_seed"])
    text = folder.parent / "calib.txt"
    text.write_text(" ".join(f"w{rng.randrange(nwords)}" for _ in range(settings["text_words"])) + "\n")
    return text


def file_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, sorted by name."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


@contextlib.contextmanager
def quiet():
    """Swallow the library's own prints/warnings during one quantization (progress goes to our log)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf_out, buf_err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            yield


def _seed_everything(seed: int = 0) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


# ----------------------------------------------------------------- runs


@contextlib.contextmanager
def cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_all(settings: dict, recipes: list[str], streaming: list[str], workdir: Path) -> dict:
    """{"recipes": {name: {file: sha256}}, "streaming": {...}}; a failing recipe gets {"error": msg}.

    Runs inside `workdir` with relative paths: the checkpoint's config.json records the source folder
    (`_name_or_path`), which must not depend on where the temporary folder happens to be.
    """
    with cwd(workdir):
        return _run_all(settings, recipes, streaming)


def _run_all(settings: dict, recipes: list[str], streaming: list[str]) -> dict:
    import quantkit as qk

    src = Path("src")
    src.mkdir()
    with quiet():
        text = build_source(src, settings)
    calib = {"dataset": str(text), "nsamples": settings["nsamples"], "seq_len": settings["seq_len"],
             "seed": settings["calib_seed"]}
    results: dict[str, dict] = {"recipes": {}, "streaming": {}}
    jobs = [("recipes", r) for r in recipes] + [("streaming", r) for r in streaming]
    t_all = time.perf_counter()
    for i, (kind, name) in enumerate(jobs, 1):
        out = Path(kind, name)
        out.parent.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        _seed_everything(0)  # no recipe should need it; makes any hidden global-RNG use repeatable
        try:
            with quiet():
                if kind == "recipes":
                    model = qk.quantize(src.as_posix(), name, device="cpu", progress=False, **calib)
                    qk.save(model, out)
                    del model
                else:
                    qk.quantize_streaming(src.as_posix(), name, out, device="cpu", progress=False,
                                          log=lambda s: None, **calib)
            results[kind][name] = file_hashes(out)
            status = f"{len(results[kind][name])} files"
        except Exception as e:  # recorded, and reported as a difference by --compare
            results[kind][name] = {"error": f"{type(e).__name__}: {e}"}
            status = f"ERROR {type(e).__name__}: {e}"
        log(f"[{i:2d}/{len(jobs)}] {kind:9s} {name:22s} {time.perf_counter() - t0:6.1f} s  {status}")
    log(f"all {len(jobs)} runs in {time.perf_counter() - t_all:.1f} s")
    return results


def versions() -> dict[str, str]:
    import torch

    import quantkit

    v = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in VERSION_PACKAGES:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = None
    # float results of matmul-based recipes depend on the kernels the CPU gets (AVX2 / AVX512 ...)
    v["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    v["cpu"] = _cpu_model()
    v["quantkit_path"] = str(Path(quantkit.__file__).resolve().parent)
    return v


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def git_state() -> dict[str, str | bool | None]:
    """HEAD of the checkout that `quantkit` was imported from, and whether its tree had local changes."""
    import quantkit

    repo = Path(quantkit.__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "repo": str(repo)}


# ----------------------------------------------------------------- compare


def _diff(base: dict | None, cur: dict | None) -> tuple[str, bool]:
    """(verdict text, ok) for one recipe's {file: sha256} maps."""
    if base is None:
        return "new (no baseline)", True
    if cur is None:
        return "MISSING (not run now)", False
    if "error" in cur:
        return f"ERROR now: {cur['error']}", False
    if "error" in base:
        return f"baseline had ERROR: {base['error']}", False
    if base == cur:
        return f"identical ({len(cur)} files)", True
    changed = sorted(f for f in base.keys() & cur.keys() if base[f] != cur[f])
    parts = []
    if changed:
        parts.append("changed: " + ", ".join(changed))
    if only_base := sorted(base.keys() - cur.keys()):
        parts.append("missing: " + ", ".join(only_base))
    if only_cur := sorted(cur.keys() - base.keys()):
        parts.append("extra: " + ", ".join(only_cur))
    return "DIFFERENT (" + "; ".join(parts) + ")", False


def compare(baseline: dict, current: dict) -> bool:
    ok_all = True
    width = max([len(n) for kind in ("recipes", "streaming") for n in (*baseline[kind], *current[kind])] + [6])
    for kind, title in (("recipes", "quantize + save"), ("streaming", "quantize_streaming (--offload)")):
        names = sorted(baseline[kind].keys() | current[kind].keys())
        print(f"\n{title}: {len(names)} recipes")
        print(f"  {'recipe':{width}s}  result")
        for name in names:
            verdict, ok = _diff(baseline[kind].get(name), current[kind].get(name))
            ok_all &= ok
            print(f"  {name:{width}s}  {verdict}")
    bv, cv = baseline.get("versions", {}), current["versions"]
    drift = {k: (bv.get(k), cv.get(k)) for k in (*VERSION_PACKAGES, "python", "cpu_capability", "cpu")
             if bv.get(k) != cv.get(k)}
    print(f"\nbaseline commit {baseline.get('commit')}  (dirty: {baseline.get('dirty')})")
    print(f"current  commit {current.get('commit')}  (dirty: {current.get('dirty')})  {cv['quantkit_path']}")
    if drift:
        print("WARNING: library versions or CPU differ from the baseline's, so differences may not be the "
              "code's: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in drift.items()))
    bs, cs = baseline.get("settings", {}), current["settings"]
    if changed := [k for k in bs.keys() | cs.keys() if k != "streaming" and bs.get(k) != cs.get(k)]:
        print("WARNING: settings differ from the baseline's (e.g. --threads changes the float reductions of "
              "calibrated recipes): " + ", ".join(f"{k} {bs.get(k)} -> {cs.get(k)}" for k in sorted(changed)))
    print("\nRESULT:", "all checkpoints byte-identical" if ok_all else "DIFFERENCES found")
    return ok_all


# ----------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out", type=Path, help="write the hashes (JSON) here")
    ap.add_argument("--compare", type=Path, metavar="BASELINE",
                    help="re-run with the baseline's settings and compare; exit 1 on any difference")
    ap.add_argument("--recipes", nargs="+", metavar="NAME",
                    help="only these recipes (default: every shipped recipe, from quantkit.recipe.shipped_recipes)")
    ap.add_argument("--streaming", nargs="*", metavar="NAME",
                    help=f"recipes to also run through quantize_streaming (default: {' '.join(DEFAULT_STREAMING)})")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default 1: reproducible reductions)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="build and keep the checkpoints in DIR (must not exist)")
    args = ap.parse_args(argv)

    baseline = json.loads(args.compare.read_text()) if args.compare else None
    settings = json.loads(json.dumps(baseline["settings"] if baseline else DEFAULT_SETTINGS))
    if args.streaming is not None:
        settings["streaming"] = args.streaming
    if args.threads is not None:
        settings["threads"] = args.threads

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, even where a GPU exists
    import torch

    torch.set_num_threads(settings["threads"])
    os.environ["QUANTKIT_FACTOR_THREADS"] = str(settings["threads"])  # GPTQ's CPU factorizations too
    with contextlib.suppress(RuntimeError):  # only allowed before any inter-op work started
        torch.set_num_interop_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from quantkit.recipe import shipped_recipes

    shipped = list(shipped_recipes())
    recipes = args.recipes or shipped
    if unknown := [r for r in [*recipes, *settings["streaming"]] if r not in shipped]:
        ap.error(f"not shipped recipes: {', '.join(unknown)}")
    v, g = versions(), git_state()
    log(f"quantkit from {v['quantkit_path']} (commit {g['commit']}, dirty {g['dirty']}); torch {v['torch']}, "
        f"transformers {v['transformers']}; {len(recipes)} recipes + {len(settings['streaming'])} streaming; "
        f"{settings['threads']} thread(s)")

    if args.keep:
        args.keep.mkdir(parents=True)
        hashes = run_all(settings, recipes, settings["streaming"], args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="qk-hashes-") as tmp:
            hashes = run_all(settings, recipes, settings["streaming"], Path(tmp))
    result = {**hashes, "versions": v, "commit": g["commit"], "dirty": g["dirty"], "settings": settings}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
        log(f"wrote {args.out}")
    if baseline is not None:
        if args.recipes:  # a partial re-run compares only what it ran
            baseline = {**baseline, "recipes": {k: v for k, v in baseline["recipes"].items() if k in recipes}}
        if args.streaming is not None:
            baseline = {**baseline, "streaming": {k: v for k, v in baseline["streaming"].items()
                                                  if k in settings["streaming"]}}
        return 0 if compare(baseline, result) else 1
    errors = [f"{k}/{n}" for k in ("recipes", "streaming") for n, h in result[k].items() if "error" in h]
    if errors:
        log(f"{len(errors)} run(s) failed: {', '.join(errors)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
