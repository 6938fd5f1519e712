"""Scale-out benchmark: one streamed (--offload) quantization on 1 and on N processes of one host, in one call.

Makes a random-weight Llama-shaped checkpoint (`make_random_checkpoint`), draws calibration windows of random
token ids (a fixed seed: no tokenizer or dataset needed, so it runs on a machine without network), quantizes
with the recipe on each process count through `torch.distributed.run` (torchrun; NCCL when every rank has its
own GPU, else gloo), and records per rank the wall time, peak VRAM (`torch.cuda.max_memory_allocated`) and
peak host RSS (`getrusage` ru_maxrss); checks that every run wrote the byte-identical checkpoint; prints a
table and writes JSON. Also prints the `--dry-run` estimate per process for a 70B shape on 4 and 8 GPUs.

    # the GPU measurement (8B shape, 128 x 2048 calibration tokens) on 1 and 4 GPUs
    python -m quantkit.eval.bench_scaleout --preset llama3-8b --device cuda --nproc 1 4 \\
        --json out/scaleout_8b.json
    # functional check on one GPU: 2 ranks share it over gloo (a small but real shape)
    python -m quantkit.eval.bench_scaleout --preset llama3-8b --layers 2 --nsamples 16 --seq-len 512 \\
        --device cuda --nproc 1 2 --json out/scaleout_share.json
    # CPU, tiny shape (what the CI test runs)
    python -m quantkit.eval.bench_scaleout --preset tiny --layers 2 --nsamples 4 --seq-len 32 --device cpu \\
        --nproc 1 2 --recipe gptq-w4g128

Targets it reports against: wall on N GPUs <= 0.33x the 1-GPU wall (N = 4), peak VRAM per GPU <= the largest
layer + its share of the activations on the device + 2 GiB, host RSS <= 4 GiB per rank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB = 1024**3
# Llama-3-70B's shape (what the estimate is printed for)
SHAPE_70B = dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256, tie=False)


def _shape(a) -> dict:
    from quantkit.eval.make_random_checkpoint import PRESETS

    shape = dict(PRESETS[a.preset])
    for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        if getattr(a, k) is not None:
            shape[k] = getattr(a, k)
    return shape


def _make_checkpoint(folder: Path, shape: dict, preset: str, device: str) -> None:
    """The random checkpoint (kept and reused while its shape is the same)."""
    stamp = folder / "bench_shape.json"
    if stamp.exists() and json.loads(stamp.read_text()) == shape:
        return
    empty = folder.with_name(folder.name + ".no-tokenizer")
    empty.mkdir(parents=True, exist_ok=True)  # calibration ids are given: no tokenizer files needed
    args = [str(folder), "--preset", preset, "--tokenizer", str(empty),
            "--device", "cuda" if device.startswith("cuda") else "cpu"]
    for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        args += [f"--{k.replace('_', '-')}", str(shape[k])]
    subprocess.run([sys.executable, "-m", "quantkit.eval.make_random_checkpoint", *args], check=True)
    stamp.write_text(json.dumps(shape))


def _files_sha256(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 24), b""):
                    h.update(block)
            out[p.name] = h.hexdigest()
    return out


class _ShapeOnlySource:
    """Shard headers of a checkpoint that is never written (what `offload.estimate` reads)."""

    def __init__(self, shape: dict):
        from quantkit.eval.make_random_checkpoint import tensor_plan

        self.meta = {n: ("model.safetensors", s, torch.bfloat16)
                     for n, s in tensor_plan(argparse.Namespace(**shape))}

    def nbytes(self, name: str) -> int:
        return 2 * int(torch.Size(self.meta[name][1]).numel())


def estimate_for_shape(shape: dict, recipe: str, nsamples: int, seq_len: int, nproc: int,
                       max_activation_memory: str = "4GB") -> dict:
    """The `quantkit quantize --offload --dry-run --gpus nproc` estimate (per process) for a shape."""
    from transformers import LlamaConfig

    from quantkit.calibration_store import parse_size
    from quantkit.offload import estimate
    from quantkit.recipe import load_recipe

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      tie_word_embeddings=shape["tie"])
    cfg.architectures = ["LlamaForCausalLM"]
    return estimate(_ShapeOnlySource(shape), cfg, load_recipe(recipe), "model.layers", shape["layers"], nsamples,
                    seq_len, torch.device("cuda"), torch.bfloat16, parse_size(max_activation_memory),
                    cache_weights=False, nproc=nproc)


def _run(a, n: int, model: Path, calib: Path, work: Path) -> dict:
    """One quantization on n processes; per-rank figures from the workers, wall time from here."""
    out, stats = work / f"q-{n}", work / f"stats-{n}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(stats, ignore_errors=True)
    stats.mkdir(parents=True)
    cores = os.cpu_count() or 1
    threads = a.threads or (max(1, cores // n) if a.device.startswith("cuda") else 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if a.backend:
        env["QUANTKIT_DIST_BACKEND"] = a.backend
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "quantkit.eval.bench_scaleout", "--worker", "--model", str(model), "--calib", str(calib),
           "--recipe", a.recipe, "--device", a.device, "--max-activation-memory", a.max_activation_memory,
           "--out", str(out), "--stats", str(stats)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, timeout=a.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: the run on {n} process(es) failed with exit status {r.returncode}")
    ranks = [json.loads((stats / f"rank{i}.json").read_text()) for i in range(n)]
    return {"nproc": n, "wall_s": round(wall, 2), "quantize_s": round(max(x["quantize_s"] for x in ranks), 2),
            "threads_per_rank": threads, "backend": ranks[0]["backend"], "ranks": ranks,
            "files": _files_sha256(out), "out": str(out)}


def _worker(a) -> None:
    """One rank (started by torch.distributed.run)."""
    import quantkit as qk
    from quantkit import distributed

    dist, device = distributed.init_from_env(a.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    calib = torch.load(a.calib)
    dist.barrier()
    t0 = time.perf_counter()
    qk.quantize_streaming(a.model, a.recipe, a.out, calibration=calib, device=device, overwrite=True,
                          max_activation_memory=a.max_activation_memory, progress=dist.is_writer,
                          log=(lambda s: print(s, file=sys.stderr, flush=True)) if dist.is_writer else (lambda s: None))
    secs = time.perf_counter() - t0
    res = {"rank": dist.rank, "world": dist.world, "backend": dist.backend or "none", "device": device,
           "quantize_s": round(secs, 2),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        res.update(peak_vram_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_vram_reserved_bytes=torch.cuda.max_memory_reserved(), gpu=torch.cuda.get_device_name())
    tmp = Path(a.stats) / f".rank{dist.rank}.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, Path(a.stats) / f"rank{dist.rank}.json")
    distributed.shutdown()


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fmt_gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--calib", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="llama3-8b", help="make_random_checkpoint preset (llama3-8b, tiny, ...)")
    for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"override the preset's {k}")
    ap.add_argument("--recipe", default="hlq-w3g128")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 4], help="process counts to run (1 first)")
    ap.add_argument("--backend", default=None, help="force the torch.distributed backend (gloo / nccl)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP threads per rank (default: 1 on CPU, the host's cores / N on GPUs)")
    ap.add_argument("--max-activation-memory", default="4GB")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/quantkit-scaleout"))
    ap.add_argument("--keep", action="store_true", help="keep the quantized checkpoints in --workdir")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    ap.add_argument("--estimate-nproc", type=int, nargs="*", default=[4, 8],
                    help="process counts to print the 70B-shape estimate for")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a)
        return None

    shape = _shape(a)
    work = a.workdir.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"src-{a.preset}"
    _make_checkpoint(model, shape, a.preset, a.device)
    calib = work / "calib.pt"
    ids = torch.randint(0, shape["vocab"], (a.nsamples, a.seq_len), generator=torch.Generator().manual_seed(0))
    torch.save(ids, calib)

    import quantkit as qk

    runs = []
    for n in a.nproc:
        est = qk.quantize_streaming(model, a.recipe, work / "unused", calibration=ids, device=a.device,
                                    max_activation_memory=a.max_activation_memory, dry_run=True, nproc=n,
                                    log=lambda s: None)
        r = _run(a, n, model, calib, work)
        r["estimate"] = est
        # the VRAM bound: the largest layer (in the compute dtype) + this rank's activations on the device + 2 GiB
        r["vram_bound_bytes"] = est["layer_source_bytes"] + est["activation_on_device_bytes"] + 2 * GIB
        runs.append(r)
        print(f"  {n} process(es): {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    ref = runs[0]
    for r in runs:
        r["identical_to_first"] = r["files"] == ref["files"]
        r["speedup"] = round(ref["wall_s"] / r["wall_s"], 3)
        r["wall_ratio"] = round(r["wall_s"] / ref["wall_s"], 3)
        if not a.keep:
            shutil.rmtree(r["out"], ignore_errors=True)

    est70 = {n: estimate_for_shape(SHAPE_70B, a.recipe, a.nsamples, a.seq_len, n, a.max_activation_memory)
             for n in a.estimate_nproc}
    gpu = next((x.get("gpu") for r in runs for x in r["ranks"] if x.get("gpu")), None)
    import platform

    from quantkit.eval.tasks import library_versions

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    env = {**library_versions(), "triton": _version("triton"), "python": platform.python_version(),
           "commit": commit, "cpu_count": os.cpu_count()}
    res = {"command": "python -m quantkit.eval.bench_scaleout " + " ".join(argv if argv is not None else sys.argv[1:]),
           "env": env, "shape": shape, "preset": a.preset, "recipe": a.recipe, "nsamples": a.nsamples, "seq_len": a.seq_len,
           "device": a.device, "gpu": gpu, "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available()
           else 0, "torch": torch.__version__, "runs": runs,
           "estimate_70b": {str(n): e for n, e in est70.items()},
           "targets": {"wall_ratio_max": 0.33, "rss_per_rank_max_bytes": 4 * GIB,
                       "vram_per_rank": "largest layer + its share of device activations + 2 GiB"}}

    print(f"\nscale-out: {a.recipe}, {a.nsamples} x {a.seq_len} calibration tokens, --offload, "
          f"shape {shape['layers']} layers x hidden {shape['hidden']}, on {a.device}" + (f" ({gpu})" if gpu else ""))
    print(f"{'procs':>5} {'backend':>7} {'wall s':>8} {'ratio':>6} {'identical':>9} {'max VRAM GiB':>12} "
          f"{'VRAM bound':>10} {'max RSS GiB':>11} {'est VRAM':>8} {'est RAM':>7}")
    for r in runs:
        vram = max((x.get("peak_vram_allocated_bytes") for x in r["ranks"]), default=None) \
            if a.device.startswith("cuda") else None
        rss = max(x["peak_rss_bytes"] for x in r["ranks"])
        print(f"{r['nproc']:>5} {r['backend']:>7} {r['wall_s']:>8.1f} {r['wall_ratio']:>6.3f} "
              f"{r['identical_to_first']!s:>9} {_fmt_gib(vram):>12} {_fmt_gib(r['vram_bound_bytes']):>10} "
              f"{_fmt_gib(rss):>11} {_fmt_gib(r['estimate']['peak_vram_bytes']):>8} "
              f"{_fmt_gib(r['estimate']['peak_ram_bytes']):>7}")
    print(f"\n--dry-run estimate per process, 70B shape ({SHAPE_70B['layers']} layers, hidden {SHAPE_70B['hidden']}), "
          f"{a.recipe}, {a.nsamples} x {a.seq_len}, cuda bf16:")
    for n, e in est70.items():
        print(f"  {n} GPUs: peak VRAM ~{_fmt_gib(e['peak_vram_bytes'])} GiB, peak RAM ~{_fmt_gib(e['peak_ram_bytes'])} "
              f"GiB per process; activations {_fmt_gib(e['activation_bytes'])} GiB per process; disk "
              f"~{_fmt_gib(e['disk_bytes'])} GiB")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
