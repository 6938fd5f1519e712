"""The `quantkit` command line (click). Errors in user input print one line and exit with status 2."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from quantkit.errors import QuantkitError


def _device_option(f):
    return click.option("--device", default="cpu", show_default=True,
                        help="Where each layer is quantized / the model runs: cpu, cuda, cuda:1, ...")(f)


def _check_device(device: str, need_gpu: bool = True) -> None:
    import torch

    if need_gpu and device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise QuantkitError(f"unknown --device '{device}': use cpu or cuda[:N]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantkit")
def cli() -> None:
    """quantkit: quantize Hugging Face causal LMs, export packed checkpoints, evaluate them."""


@cli.command()
@click.argument("model")
@click.option("--recipe", "-r", required=True, help="A shipped recipe name (see `quantkit recipes`) or a YAML path.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder.")
@click.option("--dataset", default="ptb", show_default=True, help="Calibration data: ptb, wikitext2, c4 or a file.")
@click.option("--nsamples", default=128, show_default=True, help="Calibration windows.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, help="Seed for picking calibration windows.")
@_device_option
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--offload", is_flag=True,
              help="Stream the model from its safetensors shards one layer at a time (models larger than RAM "
                   "and VRAM); output shards are written as layers finish; rerun the same command to resume.")
@click.option("--offload-dir", type=click.Path(path_type=Path), default=None,
              help="Where calibration activations spill past --max-activation-memory (default: <out>.partial).")
@click.option("--max-activation-memory", default="4GB", show_default=True,
              help="Calibration activations kept on the device (e.g. 512MB, 4GB); the rest spill to disk.")
@click.option("--dry-run", is_flag=True, help="With --offload: print the peak RAM / VRAM / disk estimate only.")
@click.option("--gpus", type=click.IntRange(1), default=None,
              help="Spread the work over this many GPUs of this host (torch.distributed, NCCL); implies "
                   "--device cuda. The checkpoint is byte-identical to the one-GPU run.")
@click.option("--nproc", type=click.IntRange(1), default=None,
              help="Spread the work over this many processes on --device (gloo on CPU); as --gpus.")
def quantize(model, recipe, out, dataset, nsamples, seq_len, seed, device, overwrite, offload, offload_dir,
             max_activation_memory, dry_run, gpus, nproc):
    """Quantize MODEL ('demo', an HF folder or a .gguf file) with a recipe and write a packed checkpoint.

    Several processes: `--gpus N` / `--nproc N` start them (through torch.distributed's launcher), or run
    `torchrun --nproc-per-node N -m quantkit.cli quantize ...` directly."""
    import quantkit as qk
    from quantkit.checkpoint import check_out_dir
    from quantkit.data import load_text
    from quantkit.pipeline import needs_calibration

    if gpus is not None and nproc is not None and gpus != nproc:
        raise QuantkitError(f"--gpus {gpus} and --nproc {nproc} disagree: give one of them")
    if gpus is not None and not device.startswith("cuda"):
        device = "cuda"
    n = gpus or nproc or 1
    _check_device(device, need_gpu=not dry_run)  # an estimate for GPUs may be made without one
    rec = qk.load_recipe(recipe)
    if dry_run and not offload:
        raise QuantkitError("--dry-run estimates a streamed run: add --offload")
    if not dry_run:
        check_out_dir(out, overwrite)  # not empty, not writable: fail before the long part, not after
    from quantkit import distributed

    if n > 1 and dry_run:  # the estimate per process: nothing to launch
        qk.quantize_streaming(model, rec, out, dataset=dataset, nsamples=nsamples, seq_len=seq_len, device=device,
                              seed=seed, offload_dir=offload_dir, max_activation_memory=max_activation_memory,
                              overwrite=overwrite, dry_run=True, nproc=n)
        return
    if n > 1 and not distributed.in_torchrun():
        import torch

        if device.startswith("cuda") and gpus is not None and torch.cuda.device_count() < n:
            raise QuantkitError(f"--gpus {n} asked for, but torch sees {torch.cuda.device_count()} GPU(s); use at "
                                f"most that many")
        argv = ["quantize", str(model), "--recipe", str(recipe), "--out", str(out), "--dataset", str(dataset),
                "--nsamples", str(nsamples), "--seq-len", str(seq_len), "--seed", str(seed), "--device", device,
                "--max-activation-memory", str(max_activation_memory)]
        argv += ["--overwrite"] * overwrite + ["--offload"] * offload
        if offload_dir is not None:
            argv += ["--offload-dir", str(offload_dir)]
        if device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
            # the host cores shared among the GPU workers (their host threads do not change the result)
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        t0 = time.perf_counter()
        code = distributed.launch(n, argv)
        if code:
            sys.exit(code)
        click.echo(f"quantized with '{rec.name}' on {n} processes in {time.perf_counter() - t0:.1f} s -> {out}")
        return
    if distributed.in_torchrun():
        _quantize_worker(model, rec, out, dataset, nsamples, seq_len, seed, device, overwrite, offload, offload_dir,
                         max_activation_memory, dry_run)
        return
    if offload:
        if needs_calibration(rec) and not dry_run:
            load_text(dataset, "train")
        t0 = time.perf_counter()
        res = qk.quantize_streaming(model, rec, out, dataset=dataset, nsamples=nsamples, seq_len=seq_len,
                                    device=device, seed=seed, offload_dir=offload_dir,
                                    max_activation_memory=max_activation_memory, overwrite=overwrite,
                                    dry_run=dry_run)
        if not dry_run:
            click.echo(f"quantized with '{rec.name}' (offload) in {time.perf_counter() - t0:.1f} s -> {res}")
        return
    if needs_calibration(rec):
        load_text(dataset, "train")
    t0 = time.perf_counter()
    m = qk.quantize(model, rec, dataset=dataset, nsamples=nsamples, seq_len=seq_len, device=device, seed=seed)
    secs = time.perf_counter() - t0
    qk.save(m, out, overwrite=overwrite)
    click.echo(f"quantized {len(m.quantkit_report.modules)} modules with '{rec.name}' in {secs:.1f} s "
               f"-> {out}")


def _quantize_worker(model, rec, out, dataset, nsamples, seq_len, seed, device, overwrite, offload, offload_dir,
                     max_activation_memory, dry_run) -> None:
    """One rank of a run over several processes (started by torchrun or `--gpus/--nproc`): every rank runs the
    pipeline on its share of the calibration windows; rank 0 writes. A failure stops this rank with one line
    (for the launcher, in its error folder) and a nonzero status; the launcher then stops the others."""
    import os

    import quantkit as qk
    from quantkit import distributed
    from quantkit.data import load_text
    from quantkit.pipeline import needs_calibration

    dist = distributed.Dist()
    try:
        dist, device = distributed.init_from_env(device)
        if needs_calibration(rec) and not dry_run:
            load_text(dataset, "train")
        t0 = time.perf_counter()
        if offload:
            res = qk.quantize_streaming(model, rec, out, dataset=dataset, nsamples=nsamples, seq_len=seq_len,
                                        device=device, seed=seed, offload_dir=offload_dir,
                                        max_activation_memory=max_activation_memory, overwrite=overwrite,
                                        dry_run=dry_run, progress=dist.is_writer,
                                        log=None if dist.is_writer else (lambda s: None))
        else:
            m = qk.quantize(model, rec, dataset=dataset, nsamples=nsamples, seq_len=seq_len, device=device,
                            seed=seed, progress=dist.is_writer)
            res = out
            if dist.is_writer:
                qk.save(m, out, overwrite=overwrite)
        dist.barrier()
        if dist.is_writer and not dry_run and not os.environ.get(distributed.ERROR_DIR_ENV):  # else: the launcher
            click.echo(f"quantized with '{rec.name}' (rank 0 of {dist.world}) in {time.perf_counter() - t0:.1f} s "
                       f"-> {res}")
        distributed.shutdown()
    except QuantkitError as e:
        code = distributed.report_error(dist, str(e))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no teardown: the peers may be stuck in a collective; the launcher stops them
    except Exception as e:  # a broken collective after a peer died, or a bug: reported below
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        code = distributed.report_error(dist, None, f"{type(e).__name__}: {first}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@cli.group(name="eval")
def eval_group() -> None:
    """Evaluation jobs."""


@eval_group.command(name="ppl")
@click.argument("model")
@click.option("--dataset", default="ptb", show_default=True,
              help="Evaluation text: ptb (offline, shipped with the install), wikitext2 or c4 (through "
                   "`datasets`, when reachable), or a local .txt / .jsonl / .parquet file.")
@click.option("--split", default="test", show_default=True, help="Split of --dataset: train, valid or test.")
@click.option("--seq-len", default=2048, show_default=True,
              help="Tokens per window: the text is cut into non-overlapping windows of this length.")
@click.option("--max-windows", type=int, default=None, help="Evaluate at most this many windows.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results here.")
@_device_option
def eval_ppl(model, dataset, split, seq_len, max_windows, json_path, device):
    """Perplexity of MODEL_OR_DIR (a quantkit checkpoint, an HF folder, a .gguf, or 'demo')."""
    import math

    import quantkit as qk
    from quantkit.data import load_text

    _check_device(device)
    load_text(dataset, split)  # a dataset that is not available fails before the model loads
    m, tok = qk.load_model(model, device=device)
    res = qk.eval.perplexity(m, tok, dataset=dataset, seq_len=seq_len, max_windows=max_windows, split=split)
    res["model"] = str(model)
    if not math.isfinite(res["ppl"]):
        raise QuantkitError(f"perplexity of '{model}' is not finite (ppl {res['ppl']}): the model outputs NaN/Inf "
                            f"logits, so its weights are damaged; check the source model for NaN/Inf tensors and "
                            f"quantize it again")
    click.echo(f"ppl {res['ppl']:.4f}  ({dataset}/{split}, seq_len {seq_len}, {res['windows']} windows, "
               f"{res['dtype']}, {res['seconds']:.0f} s)")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=2))


@eval_group.command(name="tasks")
@click.argument("model")
@click.option("--tasks", "-t", required=True,
              help="lm-eval task, group or tag names, comma-separated (globs such as 'arc_*' work); see "
                   "`lm-eval ls tasks`.")
@click.option("--include-path", type=click.Path(path_type=Path), default=None,
              help="A folder of extra task YAMLs (its names take precedence over lm-eval's own). A relative "
                   "`data_files` path of a local dataset resolves against the working directory, else the YAML's "
                   "folder.")
@click.option("--limit", type=click.FloatRange(0, min_open=True), default=None,
              help="At most this many documents per task (below 1: that share of them); for quick checks.")
@click.option("--batch-size", default="1", show_default=True, help="Requests per forward: N, 'auto' or 'auto:N'.")
@click.option("--num-fewshot", type=click.IntRange(0), default=None,
              help="Few-shot examples per prompt (default: each task's own setting, else 0).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write results, library versions and this command here.")
@_device_option
def eval_tasks(model, tasks, include_path, limit, batch_size, num_fewshot, json_path, device):
    """Downstream tasks on MODEL_OR_DIR through lm-evaluation-harness (`pip install 'quantkit[tasks]'`).

    Task datasets come from the Hugging Face hub unless cached or local; set HF_HUB_OFFLINE=1 and
    HF_DATASETS_OFFLINE=1 to rule out network lookups.
    """
    import os
    import shlex

    import quantkit as qk
    from quantkit.eval.tasks import evaluate_tasks, parse_batch_size, results_table, task_manager, to_json

    _check_device(device)
    batch_size = parse_batch_size(batch_size)
    if limit is not None and limit >= 1:
        limit = int(limit)
    manager = task_manager(tasks, include_path)  # missing lm-eval or an unknown task fails before the model loads
    m, tok = qk.load_model(model, device=device)
    t0 = time.perf_counter()
    res = evaluate_tasks(m, tok, include_path=include_path, limit=limit, batch_size=batch_size,
                         num_fewshot=num_fewshot, manager=manager)
    click.echo(results_table(res))
    click.echo(f"({time.perf_counter() - t0:.0f} s, lm-eval {res['library_versions']['lm_eval']})")
    if json_path:
        argv = ["quantkit", "eval", "tasks", str(model), "--tasks", tasks]
        for opt, val in (("--include-path", include_path), ("--limit", limit), ("--batch-size", batch_size),
                         ("--num-fewshot", num_fewshot), ("--device", device)):
            if val is not None:
                argv += [opt, str(val)]
        text = to_json(res, model=str(model), command=shlex.join(argv), argv=sys.argv)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(json_path.name + ".partial")
        tmp.write_text(text)
        os.replace(tmp, json_path)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(path, as_json):
    """Per-module scheme, bits/weight (scales included) and size on disk vs bf16, of a checkpoint DIR."""
    from quantkit.checkpoint_info import inspect_checkpoint

    info = inspect_checkpoint(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    rows = info["modules"]
    w = max(len(r["name"]) for r in rows) if rows else 10
    click.echo(f"{'module':<{w}}  {'scheme':<28} {'shape':>12} {'bits/w':>7}")
    for r in rows:
        click.echo(f"{r['name']:<{w}}  {r['scheme']:<28} {r['shape']:>12} {r['bits_per_weight']:>7.3f}")
    t = info["totals"]
    click.echo(f"\nquantized Linears: {t['quantized_modules']}, {t['quantized_params']:,} weights at "
               f"{t['bits_per_weight']:.3f} bits/weight (scales and zeros included)")
    click.echo(f"size on disk: {t['disk_bytes'] / 2**20:.1f} MiB vs {t['bf16_bytes'] / 2**20:.1f} MiB in bf16 "
               f"({t['disk_bytes'] / t['bf16_bytes']:.3f}x)")


@cli.group()
def bench() -> None:
    """Benchmarks: kernels (CUDA GPU) and end-to-end latency (GPU, or the CPU with --device cpu)."""


@bench.command(name="kernels", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench_kernels(ctx):
    """Quantized GEMM kernels vs cuBLAS bf16 / fp8 / tinygemm at Llama-3-8B shapes (needs a CUDA GPU).

    Options: --quick, --out FILE, --no-others, ... (`quantkit bench kernels --help` lists them all).
    """
    args = list(ctx.args)
    wants_help = any(a in ("-h", "--help") for a in args)
    if not wants_help:
        import torch

        if not torch.cuda.is_available():
            raise QuantkitError("`quantkit bench kernels` needs a CUDA GPU; torch sees none")
    from quantkit.eval.bench_kernels import main as bench_main

    try:
        bench_main(args)
    except SystemExit as e:  # argparse: --help (status 0) or a usage error (status 2, message printed)
        if e.code:
            sys.exit(e.code)


@bench.command(name="latency")
@click.argument("model", required=False)
@click.option("--shape", default=None,
              help="Instead of MODEL_OR_DIR: a random-weight Llama of this shape built on the device "
                   "(llama3-8b, cpu-3g, cpu-4g, tiny).")
@click.option("--recipe", "-r", default=None,
              help="Recipe(s) to quantize with on the fly (comma-separated names or YAML paths); not with a "
                   "quantized checkpoint.")
@click.option("--batch", default="1,16", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--prompt", default=512, show_default=True, help="Prompt tokens (prefill).")
@click.option("--gen", default=128, show_default=True, help="Generated tokens (1 from the prefill + decode steps).")
@click.option("--repeats", default=5, show_default=True, help="Timed runs per batch (medians reported).")
@click.option("--warmup", default=2, show_default=True, help="Untimed runs before them.")
@click.option("--device", default=None, help="cuda (default when a GPU is seen) or cpu.")
@click.option("--dtype", default=None, help="Baseline/compute dtype (default bfloat16 on cuda, float32 on cpu).")
@click.option("--no-graphs", is_flag=True, help="Time eager decode steps (no CUDA graphs).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the decode step around the quantized Linears (fuses norms / rotary / "
                   "attention glue), then capture it as above.")
@click.option("--no-profile", is_flag=True, help="Skip the torch.profiler breakdown of decode steps.")
@click.option("--pdl", is_flag=True,
              help="Launch the decode GEMVs with programmatic dependent launch (Hopper+; = QUANTKIT_PDL=1): "
                   "faster with a quantized lm_head, slower with a bf16 one on an H200 (docs/performance.md).")
@click.option("--no-fuse", is_flag=True,
              help="Keep q/k/v and gate/up as separate Linears (by default each group runs as one Linear over "
                   "the concatenated outputs, in every model measured, the baseline included).")
@click.option("--prefetch", type=click.Choice(["on", "off", "both"]), default="off", show_default=True,
              help="Prefill-size weight-only products: dequantize the next Linear's weight on a side stream "
                   "while the current one runs (quantkit.kernels.prefetch); 'both' measures each quantized "
                   "model with and without it.")
@click.option("--fit-budget", type=float, default=None,
              help="Seconds of on-the-fly fitting; later layers then reuse the last fitted layer's codes "
                   "(timing-equivalent; for slow fits such as HLQ ALS at 8B scale).")
@click.option("--lm-head-bits", type=click.Choice(["2", "3", "4"]), default=None,
              help="Also quantize an untied lm_head of the on-the-fly variants (uniform int, group 128, RTN); "
                   "each recipe is then measured with and without it.")
@click.option("--outlier-share", type=click.FloatRange(0.0, 1.0), default=None,
              help="Activation recipes quantized on the fly (no calibration data): share of input channels "
                   "laid out as outliers (ARC residual channels, COMET INT8 channels). Default: ARC 1/16, "
                   "COMET the recipe's max_int8_share.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Write a PNG bar chart here (needs matplotlib).")
def bench_latency(model, shape, recipe, batch, prompt, gen, repeats, warmup, device, dtype, no_graphs, compile_,
                  no_profile, pdl, no_fuse, prefetch, fit_budget, lm_head_bits, outlier_share, seed, json_path, plot_path):
    """Prefill / decode latency of MODEL_OR_DIR (or --shape) vs its bf16 model: static KV cache, CUDA graphs."""
    import torch

    from quantkit.eval.bench_latency import LatencyConfig, run_latency

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    try:
        batches = tuple(int(b) for b in batch.split(",") if b.strip())
    except ValueError:
        raise QuantkitError(f"--batch '{batch}': give comma-separated integers, e.g. 1,16") from None
    cfg = LatencyConfig(batches=batches, prompt=prompt, gen=gen, repeats=repeats, warmup=warmup,
                        graphs=not no_graphs, compile=compile_, profile=not no_profile,
                        fuse=not no_fuse, pdl=pdl, prefetch=prefetch, device=device,
                        dtype=dtype or ("float32" if device == "cpu" else "bfloat16"), seed=seed,
                        fit_budget_s=fit_budget, lm_head_bits=int(lm_head_bits) if lm_head_bits else None,
                        outlier_share=outlier_share)
    recipes = [r.strip() for r in recipe.split(",") if r.strip()] if recipe else []
    run_latency(model, shape, recipes, cfg, json_path=json_path, plot_path=plot_path, log=click.echo)


@cli.command()
def recipes():
    """List the shipped recipes."""
    from quantkit.recipe import shipped_recipes

    items = shipped_recipes()
    w = max(len(n) for n in items)
    for name, desc in items.items():
        click.echo(f"{name:<{w}}  {desc}")


@cli.command()
@click.option("--recipe", "-r", default="gptq-w4g128", show_default=True)
@click.option("--nsamples", default=8, show_default=True, help="Calibration windows (of --seq-len tokens).")
@click.option("--seq-len", default=2048, show_default=True)
@click.option("--max-windows", default=6, show_default=True, help="PTB test windows evaluated (of 47).")
@click.option("--seed", default=0, show_default=True, help="Seed that draws the calibration windows.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Checkpoint folder (default: under the quantkit cache).")
@_device_option
def demo(recipe, nsamples, seq_len, max_windows, seed, out, device):
    """Built-in model -> quantize -> save -> reload -> perplexity and size, before and after.

    Deterministic for a given environment (library versions, device, thread count): the calibration windows
    come from --seed and torch runs its deterministic algorithms."""
    import os

    import torch

    import quantkit as qk
    from quantkit.checkpoint_info import inspect_checkpoint
    from quantkit.eval import perplexity
    from quantkit.models import cache_dir

    _check_device(device)
    out = out or cache_dir() / "demo-out" / recipe
    rec = qk.load_recipe(recipe)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's reproducible workspace
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    click.get_current_context().call_on_close(lambda: torch.use_deterministic_algorithms(before[0],
                                                                                          warn_only=before[1]))
    click.echo(f"demo: SmolLM2-135M-Instruct, recipe {rec.name}, {nsamples} x {seq_len} calibration tokens from "
               f"PTB train (seed {seed}); perplexity on the first {max_windows} PTB test windows of {seq_len} tokens "
               f"(capped for speed: `quantkit eval ppl` runs all 47); CPU threads: {torch.get_num_threads()}")
    stages: list[tuple[str, float]] = []

    def stage(name: str):
        t = time.perf_counter()
        click.echo(f"- {name} ...")
        return lambda: stages.append((name, time.perf_counter() - t))

    done = stage("load the model")
    fp, tok = qk.load_model("demo", device=device)
    done()
    done = stage("perplexity, unquantized")
    fp_res = perplexity(fp, tok, seq_len=seq_len, max_windows=max_windows)
    del fp
    done()
    done = stage(f"quantize with {rec.name}")
    m = qk.quantize("demo", rec, nsamples=nsamples, seq_len=seq_len, device=device, seed=seed)
    done()
    done = stage("save the checkpoint")
    qk.save(m, out, overwrite=True)
    del m
    done()
    done = stage("reload it")
    q = qk.load(out, device=device)
    done()
    done = stage("perplexity, quantized")
    q_res = perplexity(q, seq_len=seq_len, max_windows=max_windows)
    done()
    info = inspect_checkpoint(out)["totals"]
    fp_mib = info["quantized_bf16_bytes"] / 2**20  # the same Linears, unquantized, in bf16
    click.echo("")
    click.echo(f"{'model':<24} {'ppl (PTB test)':>15} {'linear weights':>18} {'bits/weight':>12}")
    click.echo(f"{'unquantized (as bf16)':<24} {fp_res['ppl']:>15.3f} {fp_mib:>14.1f} MiB {16:>12.3f}")
    click.echo(f"{rec.name:<24} {q_res['ppl']:>15.3f} {info['quantized_disk_bytes'] / 2**20:>14.1f} MiB "
               f"{info['bits_per_weight']:>12.3f}")
    click.echo("")
    w = max(len(n) for n, _ in stages)
    for name, secs in stages:
        click.echo(f"{name:<{w}}  {secs:7.1f} s")
    click.echo(f"{'total':<{w}}  {sum(s for _, s in stages):7.1f} s")
    click.echo(f"\ncheckpoint in {out} ({info['disk_bytes'] / 2**20:.1f} MiB on disk, embeddings included)")


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--to", "target", default=None,
              help="Target format: compressed-tensors (vLLM, transformers; `pip install 'quantkit[export]'`).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--dequantize", is_flag=True, help="Write a plain 16-bit HF folder of the dequantized weights instead.")
@click.option("--dtype", default="bfloat16", show_default=True, help="With --dequantize: bfloat16 or float16.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
def export(ckpt, target, out, dequantize, dtype, overwrite):
    """Export the quantkit checkpoint CKPT for a serving engine (docs/serving.md)."""
    from quantkit.export import export as run_export

    path = run_export(ckpt, out, to=target, dequantize=dequantize, dtype=dtype, overwrite=overwrite)
    what = f"dequantized {dtype} folder" if dequantize else f"{target} folder"
    click.echo(f"wrote {what} {path}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except QuantkitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
