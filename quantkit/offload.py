"""Disk offload: quantize a model larger than RAM and VRAM, layer by layer from its safetensors shards.

`quantize_streaming` never holds the model. It builds the skeleton on the meta device, then

1. streams the embeddings in (lazy `safe_open`, only those tensors), runs them on the calibration windows
   to capture decoder layer 0's inputs, frees them;
2. per decoder layer: reads only that layer's tensors from the input shards, moves them to the compute
   device, quantizes the layer with the same per-layer step the in-memory pipeline uses
   (`pipeline.quantize_layer`), computes its outputs (the next layer's inputs), writes the layer's shard,
   frees it. Calibration activations live in `ActivationStore`s: on the device up to
   `max_activation_memory`, spilled to memory-mapped chunk files under the offload folder past it;
3. copies the final norm / lm_head tensors the same way (tied embeddings are stored once);
4. writes index, config.json (with quantization_config) and tokenizer, and renames `<out>.partial` to
   `<out>`.

Output layout: one shard per unit, planned up front so names never change: `model-00001` holds the
embeddings, `model-00002 .. model-<L+1>` decoder layers 0..L-1, the last one the final norm (and lm_head
when untied). The format is the one `quantkit.checkpoint.load` reads (docs/format.md).

Resume. Everything goes to `<out>.partial/`. After layer i is quantized, in this order: its shard is written
(temp + rename), its outputs (= layer i+1's inputs, all samples) are written to `acts-<i>.bin` (temp +
rename), then `offload-manifest.json` is replaced atomically with layer i marked done (its scheme entries
included) and pointing at `acts-<i>.bin`, then the previous activation file is deleted. A rerun of the same
command reads the manifest, deletes anything it does not reference (a shard or activation file written after
the last manifest update), reloads the recorded activations and continues with the next layer, so every
layer is computed from exactly the bytes an uninterrupted run would use: the result is bit-identical. The
manifest records the settings that decide the result (source shards, recipe, calibration tokens, dtype,
device type); a rerun with different ones is refused. Debugging hook for the kill tests:
`QUANTKIT_DEBUG_KILL=<point>:<layer>[@<rank>]` (point = after-shard | after-acts | after-manifest) SIGKILLs
the process (rank 0, or the rank named) at that point; `raise-<point>:...` raises a QuantkitError there.

Several processes (torchrun, `quantkit quantize --gpus N`): every rank streams each layer from the input shards
and runs its contiguous share of the calibration windows through it (`pipeline.quantize_layer` reduces the
statistics and spreads the solves); rank 0 alone writes shards, the manifest and the final folder. The saved
activations file holds every window, each rank writing its share at its offset (then rank 0 renames it), so
it has the same bytes as a one-process run and a rerun may resume with any number of processes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from quantkit.calibration_store import (
    ActivationBudget,
    ActivationStore,
    format_size,
    parse_size,
    read_samples,
    remove_tree,
    write_samples,
)
from quantkit.checkpoint import (
    FORMAT_VERSION,
    INDEX_NAME,
    build_quantization_config,
    check_out_dir,
    checkpoint_config,
    make_index,
    packed_names,
    replace_path,
    write_error,
    write_shard,
)
from quantkit.distributed import Dist, current
from quantkit.errors import QuantkitError
from quantkit.methods import algorithm_for
from quantkit.models import adapter_for, decoder_layers
from quantkit.nn import ACT_QUANTIZERS
from quantkit.pipeline import (
    QuantizeReport,
    capture_layer_inputs,
    check_finite_tensors,
    kv_cache_entry,
    layer_outputs,
    layer_prefix,
    needs_calibration,
    quantize_layer,
    quantized_modules,
    to_device,
)
from quantkit.recipe import Recipe, load_recipe

MANIFEST_NAME = "offload-manifest.json"
MANIFEST_VERSION = 1
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class SourceCheckpoint:
    """The input model's safetensors shards, read lazily: headers up front, tensors on request."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise QuantkitError(f"'{index}' is not a valid safetensors index; the model folder is damaged") \
                    from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise QuantkitError(f"'{folder}' holds no .safetensors shards; --offload streams safetensors only")
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise QuantkitError(f"shard '{missing[0]}' listed in '{INDEX_NAME}' is missing from '{folder}' "
                                f"({len(missing)} of {len(files)} shards missing); restore it and rerun")
        self.meta: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
        for f in files:
            with self._open(f) as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    self.meta[k] = (f, tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype(), torch.float32))
        if weight_map is not None:
            for k, f in weight_map.items():
                if k not in self.meta or self.meta[k][0] != f:
                    raise QuantkitError(f"tensor '{k}' is listed in '{INDEX_NAME}' under '{f}' but that shard "
                                        f"does not hold it; the model folder is damaged")
        self.files = files

    def _open(self, fname: str):
        path = self.folder / fname
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QuantkitError(f"input shard '{path}' is unreadable ({first}); restore it and rerun the same "
                                f"command (finished layers are kept)") from None

    def fingerprint(self) -> list[list]:
        return [[f, (self.folder / f).stat().st_size] for f in self.files]

    def nbytes(self, name: str) -> int:
        _, shape, dtype = self.meta[name]
        return _nbytes(shape, dtype)

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `names`, as stored (dtype preserved), read one shard at a time."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.meta:
                raise QuantkitError(f"tensor '{n}' is in none of the shards of '{self.folder}' (a shard is "
                                    f"missing from the index?); the model folder is incomplete")
            by_file.setdefault(self.meta[n][0], []).append(n)
        out = {}
        for f, ns in by_file.items():
            try:
                with self._open(f) as sf:
                    for n in ns:
                        out[n] = sf.get_tensor(n)
            except QuantkitError:
                raise
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise QuantkitError(f"input shard '{self.folder / f}' is unreadable ({first}); restore it and "
                                    f"rerun the same command (finished layers are kept)") from None
        return {n: out[n] for n in names}


def _debug_kill(point: str, layer: int) -> None:
    spec = os.environ.get("QUANTKIT_DEBUG_KILL")
    if spec and "@" not in spec:
        spec += "@0"  # several processes: rank 0 unless the point names another
    if spec and spec == f"raise-{point}:{layer}@{current().rank}":  # a failing rank, for the tests
        raise QuantkitError(f"debug failure at {point} of layer {layer} on rank {current().rank}")
    if spec and spec == f"{point}:{layer}@{current().rank}":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _write_or_fail(what: Path, fn, tmp: Path | None = None) -> None:
    """Run the writer `fn`; an OSError becomes one line (and the writer's temp file `tmp` is deleted)."""
    try:
        fn()
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise write_error(e, what, "rerun the same command: it resumes after the last finished layer") from None


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # a resumed run must write the same bytes; write_shard keeps the shard metadata deterministic
    _write_or_fail(path, lambda: write_shard(tensors, path))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")

    def go():
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    _write_or_fail(path, go, tmp)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _default_dtype(device: torch.device, src: SourceCheckpoint) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32  # as the in-memory path: bf16 matmuls are slow on most CPUs
    floats = [d for _, (_, _, d) in src.meta.items() if d.is_floating_point]
    return floats[0] if floats else torch.bfloat16


def _calibration_hash(calib: torch.Tensor | None) -> str | None:
    if calib is None:
        return None
    return hashlib.sha256(calib.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# estimate


def estimate(src: SourceCheckpoint, config, recipe: Recipe, prefix: str, n_layers: int, nsamples: int,
             seq_len: int, device: torch.device, dtype: torch.dtype, max_act: int,
             cache_weights: bool = True, host_factorization: bool = False, nproc: int = 1) -> dict:
    """Peak RAM / VRAM / disk of a streamed run, from the shard headers and the recipe (bytes); with `nproc`
    processes, per process (each holds one layer and its share of the calibration windows)."""
    ec = torch.empty((), dtype=dtype).element_size()
    adapter = adapter_for(config)
    text = adapter.text_config(config)
    hidden = int(text.hidden_size)
    inter = int(getattr(text, "intermediate_size", 4 * hidden))
    heads = adapter.attention_layout(config).num_heads
    layer_src = layer_compute = 0
    algo = algorithm_for(recipe.method)
    algo_work = host_factor = 0
    # statistics of one sub-block, summed exactly (`pipeline._block_statistics`): the int64 main band, plus
    # one window's float32 result unless the accumulator hands it over by row panels (`window_rows`)
    probe = algo.statistics(1, torch.device("meta")) if algo.needs_data else None
    stats_per_elem = 0 if probe is None else 8 if hasattr(probe, "window_rows") else 12
    out_bytes = 0
    for li in range(n_layers):
        lp = f"{prefix}.{li}."
        names = [n for n in src.meta if n.startswith(lp)]
        lsrc = sum(src.nbytes(n) for n in names)
        layer_src = max(layer_src, lsrc)
        layer_compute = max(layer_compute, sum(_nbytes(src.meta[n][1], dtype) for n in names))
        for n in names:
            _, shape, _ = src.meta[n]
            mod = n[: -len(".weight")] if n.endswith(".weight") else None
            spec = recipe.scheme_for(mod) if mod and len(shape) == 2 else None
            if spec is None:
                out_bytes += src.nbytes(n)
                continue
            nout, k = shape
            out_bytes += sum(_nbytes(s, d) for s, d in packed_names(spec, k, nout).values())
            dev_work, host_work = algo.work_bytes(nout, k, device, host_factorization)
            if stats_per_elem:
                dev_work = max(dev_work, k * k * stats_per_elem + 1024 * k * 12)
            algo_work = max(algo_work, dev_work)
            host_factor = max(host_factor, host_work)
    other = [n for n in src.meta if not n.startswith(f"{prefix}.")]
    tied = adapter.tied(config)
    out_bytes += sum(src.nbytes(n) for n in other if not (tied and n == adapter.lm_head_weight))
    embed = max([_nbytes(src.meta[n][1], dtype) for n in other if n.startswith(adapter.embed_path + ".")] or [0])
    data = needs_calibration(recipe)
    sample = seq_len * hidden * ec
    per_rank = -(-nsamples // max(nproc, 1))  # the largest share of the windows
    acts = 2 * per_rank * sample if data else 0  # a layer's inputs and outputs (this process's windows)
    acts_dev = min(acts, max_act)
    spill = acts - acts_dev
    fwd = (seq_len * inter * ec * 3 + heads * seq_len * seq_len * 4 + 4 * sample) if data else 0
    # layer (+ its dequantized QuantLinear weights when cached) + the algorithm's temporaries + one forward
    layer_peak = (2 if cache_weights else 1) * layer_compute + algo_work + fwd
    dev_peak = max(embed + fwd, layer_peak) + acts_dev
    base_ram = 600 * 1024**2  # python + torch + transformers + tokenizer, measured ~0.5 GB
    staging = layer_src + out_bytes // max(n_layers, 1) + host_factor  # + the algorithm's host-side work
    if device.type == "cpu":
        ram, vram = base_ram + dev_peak + staging, 0
    else:
        # + the CUDA runtime's host memory (measured ~1 GiB RSS on an H100 with torch 2.11); VRAM + context
        ram, vram = base_ram + 1024**3 + staging + sample, dev_peak + 300 * 1024**2
    disk = out_bytes + (nsamples * sample if data else 0) + spill * max(nproc, 1)  # one host: every spill
    return {"source_bytes": sum(src.nbytes(n) for n in src.meta), "layer_source_bytes": layer_src,
            "activation_bytes": acts, "activation_on_device_bytes": acts_dev, "activation_spill_bytes": spill,
            "peak_ram_bytes": ram, "peak_vram_bytes": vram, "disk_bytes": disk, "output_bytes": out_bytes,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "nproc": nproc}


def format_estimate(e: dict) -> str:
    f = format_size
    per = f", per process of {e['nproc']}" if e.get("nproc", 1) > 1 else ""
    lines = [f"offload estimate ({e['device']}, compute {e['dtype']}{per}): source {f(e['source_bytes'])}, "
             f"largest layer {f(e['layer_source_bytes'])}",
             f"  peak RAM  ~{f(e['peak_ram_bytes'])}" + (" (calibration activations included)"
                                                        if e["device"] == "cpu" else ""),
             f"  peak VRAM ~{f(e['peak_vram_bytes'])}" if e["device"] != "cpu" else "  peak VRAM 0 (CPU run)",
             f"  calibration activations {f(e['activation_bytes'])}: {f(e['activation_on_device_bytes'])} on the "
             f"device, {f(e['activation_spill_bytes'])} spilled to disk",
             f"  disk ~{f(e['disk_bytes'])} (checkpoint ~{f(e['output_bytes'])} + resume/spill activations)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# the driver


def _materialize(module: torch.nn.Module, module_prefix: str, src: SourceCheckpoint, device: torch.device,
                 dtype: torch.dtype | None) -> None:
    """Load `module`'s own tensors (names under `module_prefix`) from the shards onto `device` in `dtype`
    (None: as stored)."""
    names = list(module.state_dict().keys())
    full = [f"{module_prefix}.{n}" for n in names]
    tensors = src.get(full)
    sd = {}
    for n, f in zip(names, full, strict=True):
        t = tensors.pop(f)
        sd[n] = t.to(device, dtype) if t.is_floating_point() and dtype is not None else t.to(device)
    module.load_state_dict(sd, strict=True, assign=True)


def _settings(path: Path, src: SourceCheckpoint, rec: Recipe, calib, nsamples: int, seq_len: int, seed: int,
              dataset: str, device: torch.device, dtype: torch.dtype) -> dict:
    data = calib is not None
    return {"source": str(path.resolve()), "source_shards": src.fingerprint(), "recipe": rec.to_dict(),
            "dataset": dataset if data else None, "nsamples": nsamples if data else None,
            "seq_len": seq_len if data else None, "seed": seed if data else None,
            "calibration_sha256": _calibration_hash(calib), "device": device.type,
            "dtype": str(dtype).replace("torch.", ""), "format_version": FORMAT_VERSION}


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in keys[:4]:
        a, b = old.get(k), new.get(k)
        if isinstance(a, (dict, list)) or isinstance(b, (dict, list)) or k.endswith("sha256"):
            parts.append(f"{k} differs")
        else:
            parts.append(f"{k} {a} -> {b}")
    return "; ".join(parts)


def _check_stored_names(src: SourceCheckpoint, skel: torch.nn.Module, prefix: str, path: Path) -> None:
    """Refuse a source whose shards name the decoder layers otherwise than the model does (a layout that
    transformers renames while loading, e.g. Gemma 3 image-text checkpoints' 'language_model.model.*'):
    streaming reads tensors by the model's names, as stored."""
    if any(n.startswith(f"{prefix}.") for n in src.meta):
        return
    want = next((n for n in skel.state_dict() if n.startswith(f"{prefix}.")), f"{prefix}.0")
    tail = want[len(prefix):]  # ".0.self_attn.q_proj.weight"
    have = next((n for n in src.meta if n.endswith(tail)), None)
    example = f" (it stores '{have}' for the model's '{want}')" if have else ""
    raise QuantkitError(f"'{path}' stores the decoder layers under other names than {type(skel).__name__} uses"
                        f"{example}; transformers renames them when loading, --offload reads the shards as stored: "
                        f"quantize this model without --offload")


def _drop_partial_without_work(fn):
    """On a failure (disk full, bad input, Ctrl-C), delete `<out>.partial` if it records no finished unit:
    nothing there to resume, so nothing is left behind. Finished units are kept for the rerun."""

    @functools.wraps(fn)
    def wrapper(model, recipe, out, **kwargs):
        try:
            return fn(model, recipe, out, **kwargs)
        except BaseException:
            if not current().is_writer:
                raise  # rank 0 owns `<out>.partial`
            partial = Path(out).expanduser()
            partial = partial.with_name(partial.name + ".partial")
            mpath = partial / MANIFEST_NAME
            if partial.is_dir():
                try:
                    units = json.loads(mpath.read_text())["units"]
                except (OSError, ValueError, KeyError, TypeError):
                    units = None  # no manifest (a finished folder) or a damaged one: the error says what to do
                if units == {}:
                    remove_tree(partial)
            raise

    return wrapper


@_drop_partial_without_work
@torch.no_grad()
def quantize_streaming(
    model: str | os.PathLike,
    recipe: str | os.PathLike | Recipe | dict,
    out: str | os.PathLike,
    *,
    dataset: str = "ptb",
    nsamples: int = 128,
    seq_len: int = 2048,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    offload_dir: str | os.PathLike | None = None,
    max_activation_memory: str | int = "4GB",
    overwrite: bool = False,
    dry_run: bool = False,
    calibration: torch.Tensor | None = None,
    tokenizer=None,
    cache_weights: bool | None = None,
    host_factorization: bool = False,
    progress: bool = True,
    log=None,
    nproc: int | None = None,
) -> Path | dict:
    """Quantize the HF safetensors folder `model` with `recipe` into the checkpoint folder `out`, streaming
    one decoder layer at a time (see the module docstring). Resumes an interrupted run of the same settings.

    `calibration` (LongTensor [nsamples, seq_len]) replaces dataset/nsamples/seq_len/seed when given.
    dtype: compute dtype (default float32 on CPU, the stored dtype on GPUs); unquantized tensors are written
    as stored. cache_weights: keep each quantized Linear's dequantized weight while its layer is processed
    (default: on CPU, where re-dequantizing for every forward costs more time than the float copy costs
    memory; GPU forwards use the kernels and never read it). host_factorization: on a GPU, factorize wide
    GPTQ Hessians (K x K >= 256 MB) on the host: ~2 K x K less VRAM, ~3 K x K more host RAM. Returns `out`,
    or with `dry_run` the estimate dict (nothing is written). nproc: the processes the estimate is for (default:
    those of the running group, `distributed.current()`).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    dist = current()
    rec = load_recipe(recipe)
    device = torch.device(device)
    max_act = parse_size(max_activation_memory)
    out = Path(out).expanduser()
    path, config, src, skel, dtype = _open_source(model, device, dtype)
    layers = decoder_layers(skel)
    prefix = layer_prefix(skel, layers)
    _check_stored_names(src, skel, prefix, path)
    n_layers = len(layers)
    kv_cache_entry(config, rec.kv_cache)  # a KV-cache scheme this model cannot take fails before the work
    data = needs_calibration(rec)
    if calibration is not None:
        nsamples, seq_len = calibration.shape
    if cache_weights is None:
        cache_weights = device.type == "cpu"
    est = estimate(src, config, rec, prefix, n_layers, nsamples, seq_len, device, dtype, max_act, cache_weights,
                   host_factorization, nproc=nproc or dist.world)
    if dist.is_writer:
        log(format_estimate(est))
    if dry_run:
        return est

    partial = out.with_name(out.name + ".partial")
    check_out_dir(out, overwrite)
    calib = None
    if data:
        calib = _calibration(path, config, calibration, tokenizer, dataset, nsamples, seq_len, seed, log)
    settings = _settings(path, src, rec, calib, nsamples, seq_len, seed, dataset, device, dtype)
    windows = dist.shard(calib.shape[0]) if calib is not None else (0, 0)
    manifest = _open_manifest(partial, settings, n_layers) if dist.is_writer else None
    run = _StreamedRun(src=src, skel=skel, layers=layers, prefix=prefix, rec=rec, device=device, dtype=dtype,
                       partial=partial, manifest=manifest, n_shards=n_layers + 2, data=data,
                       cache_weights=cache_weights, host_factorization=host_factorization, dist=dist,
                       windows=windows, n_windows=calib.shape[0] if calib is not None else 0)
    prologue = _write_outer_units(run, config)
    run.manifest = manifest = dist.broadcast_object(manifest)  # rank 0 has cleaned up `<out>.partial`
    t0 = time.perf_counter()
    start = _first_layer_to_do(run)
    spill_root = Path(offload_dir).expanduser() / f"{out.name}.activations" if offload_dir else \
        partial / "activations"
    if dist.active:
        spill_root = spill_root / f"rank{dist.rank}"
    remove_tree(spill_root)  # chunks left by a killed run are never reused
    budget = ActivationBudget(max_act)
    xs = ActivationStore(device, budget, spill_root, "in")
    layer_kwargs: list[dict] = []
    if start < n_layers and data:
        layer_kwargs = _capture_inputs(run, prologue, calib, start, xs)
    if manifest.pop("resumed", False) and dist.is_writer:
        log(f"resuming '{partial}': {start} of {n_layers} layers were done")

    bar = tqdm(range(start, n_layers), desc=f"quantize [{rec.name}] (offload)", unit="layer",
               disable=not progress or not dist.is_writer, initial=start, total=n_layers)
    try:
        for li in bar:
            t_layer = time.perf_counter()
            kwargs = to_device(layer_kwargs[li], device) if layer_kwargs else {}
            ys = None
            if data and li < n_layers - 1:
                ys = ActivationStore(device, budget, spill_root, f"out{li % 2}")
            _quantize_streamed_layer(run, li, xs, ys, kwargs, bar)
            if dist.is_writer:
                _log_layer(bar if progress else None, log, li, n_layers, time.perf_counter() - t_layer, device)
            xs.close()
            if ys is not None:
                xs = ys
    finally:
        xs.close()
        remove_tree(spill_root)
    if not dist.is_writer:
        dist.barrier()  # rank 0 writes the index and config.json and renames the folder
        return out
    out = _finalize(partial, out, manifest, config, path, tokenizer, n_layers, overwrite, log,
                     time.perf_counter() - t0, budget)
    dist.barrier()
    return out


@dataclass
class _StreamedRun:
    """What every step of one streamed run shares."""

    src: SourceCheckpoint
    skel: torch.nn.Module  # the model on the meta device; one layer at a time is materialized
    layers: torch.nn.ModuleList
    prefix: str  # the decoder layers' module name ("model.layers")
    rec: Recipe
    device: torch.device
    dtype: torch.dtype
    partial: Path  # the folder being written (`<out>.partial`)
    manifest: dict  # resume state, rewritten after every finished unit
    n_shards: int  # embeddings + one per layer + head
    data: bool  # the recipe needs calibration data
    cache_weights: bool
    host_factorization: bool
    dist: Dist = field(default_factory=Dist)
    windows: tuple[int, int] = (0, 0)  # this rank's calibration windows [lo, hi)
    n_windows: int = 0  # all ranks' windows


def _open_source(model, device: torch.device, dtype: torch.dtype | None):
    """The source folder, its config, its shards and the model's skeleton on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantkit.models import resolve_model_path

    path = resolve_model_path(model)
    if path.is_file():
        raise QuantkitError(f"--offload streams an HF safetensors folder; '{path}' is a single file (convert it "
                            f"to an HF folder first)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise QuantkitError(f"cannot read the model config in '{path}': {e}") from None
    src = SourceCheckpoint(path)
    dtype = dtype or _default_dtype(device, src)
    with init_empty_weights(include_buffers=False):
        skel = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skel.eval()
    return path, config, src, skel, dtype


def _calibration(path: Path, config, calibration, tokenizer, dataset: str, nsamples: int, seq_len: int,
                 seed: int, log) -> torch.Tensor:
    """The calibration windows: given, tokenized with the given tokenizer, or tokenized in a child process
    (the tokenizer's memory is then returned to the system)."""
    if calibration is not None:
        calib = calibration.to(torch.long)
    else:
        from quantkit.data import calibration_windows

        if tokenizer is not None:
            calib = calibration_windows(tokenizer, dataset, nsamples, seq_len, seed)
        else:
            calib = _calibration_in_child(path, dataset, nsamples, seq_len, seed)
    log(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens; peak RSS so far {_peak_rss_gib():.2f} GiB "
        f"(tokenized in a child process)")
    if int(calib.max()) >= int(config.vocab_size):
        raise QuantkitError(f"calibration token id {int(calib.max())} is outside the model's vocabulary "
                            f"({config.vocab_size}); the tokenizer does not belong to this model")
    return calib


def _write_outer_units(run: _StreamedRun, config) -> list:
    """Write the embeddings shard (what runs before layer 0) and the head shard (the rest outside the layers),
    as stored, unless a resumed run has them. Returns the adapter's prologue modules [(name, module)]."""
    adapter = adapter_for(run.skel)
    sd_names = list(run.skel.state_dict().keys())
    non_layer = [n for n in sd_names if not n.startswith(f"{run.prefix}.")]
    if adapter.tied(config):
        non_layer = [n for n in non_layer if n != adapter.lm_head_weight]
    prologue = adapter.before_layers(run.skel)
    embed_names = [n for n in non_layer if n.startswith(tuple(f"{p}." for p, _ in prologue))]
    head_names = [n for n in non_layer if n not in embed_names]
    if not run.dist.is_writer:
        return prologue
    for unit, names, idx in (("embed", embed_names, 1), ("head", head_names, run.n_shards)):
        if unit in run.manifest["units"]:
            continue
        fname = _shard_name(idx, run.n_shards)
        tensors = run.src.get(names)  # copied as stored; the biggest is the embedding matrix
        check_finite_tensors(tensors)
        _save_shard(tensors, run.partial / fname)
        run.manifest["units"][unit] = {"file": fname, "tensors": {n: int(t.numel() * t.element_size())
                                                                  for n, t in tensors.items()}}
        del tensors
        _write_json(run.partial / MANIFEST_NAME, run.manifest)
    return prologue


def _first_layer_to_do(run: _StreamedRun) -> int:
    n_layers = len(run.layers)
    done = [f"layer.{i}" in run.manifest["units"] for i in range(n_layers)]
    start = done.index(False) if not all(done) else n_layers
    if any(done[start:]):
        raise QuantkitError(f"'{run.partial / MANIFEST_NAME}' marks layers done out of order; the resume state "
                            f"is damaged: delete '{run.partial}' to start over")
    return start


def _capture_inputs(run: _StreamedRun, prologue: list, calib: torch.Tensor, start: int,
                    xs: ActivationStore) -> list[dict]:
    """Run the prologue (embeddings, rotary) on the calibration windows: layer 0's inputs go to `xs` (on a
    resumed run, the saved inputs of layer `start` do), and every layer's keyword arguments are returned."""
    device, dtype = run.device, run.dtype
    hooks = []
    for name, mod in prologue:
        if type(mod) is torch.nn.Embedding:
            # kept as stored (bf16: half of fp32) and cast after the lookup: a lookup copies rows, so the
            # result is bit-identical to looking up in a table cast to `dtype` first (not so for an
            # embedding that computes, e.g. Gemma's scaled one: that one is cast first)
            _materialize(mod, name, run.src, device, None)
            hooks.append(mod.register_forward_hook(lambda m, args, y: y.to(dtype)))
        else:
            _materialize(mod, name, run.src, device, dtype)
    lo, hi = run.windows
    windows = calib[lo:hi] if start == 0 else calib[lo : lo + 1]  # on resume only the kwargs are needed
    sink = xs.append if start == 0 else (lambda x: None)
    _, layer_kwargs = capture_layer_inputs(run.skel, windows, device, device, sink=sink)
    for h in hooks:
        h.remove()
    for _, mod in prologue:
        mod.to("meta")
    if start > 0:
        acts = run.manifest["acts"]
        if acts is None or acts["after_layer"] != start - 1:
            raise QuantkitError(f"'{run.partial / MANIFEST_NAME}' has no saved activations for layer {start}; "
                                f"the resume state is damaged: delete '{run.partial}' to start over")
        if not run.dist.active:
            for x in read_samples(run.partial / acts["file"], acts["n"], tuple(acts["shape"]),
                                  getattr(torch, acts["dtype"])):
                xs.append(x)
        else:
            for x in _read_window_slice(run.partial / acts["file"], acts["n"], tuple(acts["shape"]),
                                        getattr(torch, acts["dtype"]), lo, hi):
                xs.append(x)
    return layer_kwargs


def _quantize_streamed_layer(run: _StreamedRun, li: int, xs: ActivationStore, ys: ActivationStore | None,
                             kwargs: dict, bar) -> None:
    """Materialize layer `li`, quantize it (pipeline.quantize_layer), hand its outputs to `ys`, write its
    shard and its outputs (the resume point), record it in the manifest, and free it."""
    partial, manifest, device = run.partial, run.manifest, run.device
    lprefix = f"{run.prefix}.{li}"
    layer = run.layers[li]
    _materialize(layer, lprefix, run.src, device, run.dtype)
    check_finite_tensors({f"{lprefix}.{n}": p for n, p in layer.named_parameters()},
                         quantized_modules(layer, lprefix, run.rec))
    report = QuantizeReport(recipe=run.rec.name)
    quantize_layer(layer, lprefix, run.rec, xs, kwargs, device, report, bar, cache_weights=run.cache_weights,
                   host_factorization=run.host_factorization, dist=run.dist,
                   input_groups=adapter_for(run.skel.config).sub_blocks)
    if ys is not None:
        layer_outputs(layer, xs, kwargs, device, ys.append)
    if not run.dist.is_writer:
        _follow_streamed_layer(run, li, ys)
        run.layers[li] = torch.nn.Module()
        del layer
        _trim_host_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    # the shard: packed tensors of quantized Linears, everything else as stored in the input
    sd = layer.state_dict()
    keep = {f"{lprefix}.{k}": v for k, v in sd.items()}
    stored = run.src.get([k for k in keep if k in run.src.meta])
    tensors = {k: stored[k] if k in stored else v.detach().to("cpu").contiguous() for k, v in keep.items()}
    del sd, keep, stored
    fname = _shard_name(li + 2, run.n_shards)
    _save_shard(tensors, partial / fname)
    _debug_kill("after-shard", li)
    old_acts = manifest["acts"]
    if ys is not None:
        afile = f"acts-{li:05d}.bin"
        if run.dist.active:
            _write_window_slice(run, ys, partial / afile, li)
        else:
            _write_or_fail(partial / afile, lambda: write_samples(ys, partial / afile), partial / f"{afile}.tmp")
        x0 = ys[0]
        manifest["acts"] = {"after_layer": li, "file": afile, "n": run.n_windows, "shape": list(x0.shape),
                            "dtype": str(x0.dtype).replace("torch.", "")}
        _debug_kill("after-acts", li)
    manifest["units"][f"layer.{li}"] = {
        "file": fname, "tensors": {n: int(t.numel() * t.element_size()) for n, t in tensors.items()},
        "modules": dict(report.modules)}
    _write_json(partial / MANIFEST_NAME, manifest)
    _debug_kill("after-manifest", li)
    run.dist.barrier()  # the others wait until this layer is recorded
    if old_acts is not None and old_acts["file"] != (manifest["acts"] or {}).get("file"):
        (partial / old_acts["file"]).unlink(missing_ok=True)
    del tensors
    # drop the whole module, not only its tensors: kernel dispatch caches repacked weights as plain
    # attributes that `.to("meta")` would not free (seen as +90 MB of VRAM per 8B layer)
    run.layers[li] = torch.nn.Module()
    del layer
    _trim_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _follow_streamed_layer(run: _StreamedRun, li: int, ys) -> None:
    """A rank other than 0 after layer `li`: write its share of the saved activations, wait for the record."""
    if ys is not None:
        _write_window_slice(run, ys, run.partial / f"acts-{li:05d}.bin", li)
    run.dist.barrier()


def _write_window_slice(run: _StreamedRun, ys, path: Path, li: int) -> None:
    """Several processes: the saved activations of all windows in one file, each rank writing its windows at
    their offset into `<file>.tmp` (created by rank 0); rank 0 renames it once every rank has synced."""
    dist, (lo, _) = run.dist, run.windows
    tmp = path.with_name(path.name + ".tmp")
    x0 = ys[0]
    nbytes = x0.numel() * x0.element_size()
    if dist.is_writer:
        def create():
            with open(tmp, "wb") as f:
                f.truncate(run.n_windows * nbytes)
        _write_or_fail(path, create, tmp)
    dist.barrier()

    def write():
        with open(tmp, "r+b") as f:
            f.seek(lo * nbytes)
            for i in range(len(ys)):
                ys[i].to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tofile(f)
            f.flush()
            os.fsync(f.fileno())
    _write_or_fail(path, write)
    if not dist.is_writer:
        _debug_kill("after-acts", li)  # (rank 0's point is after the rename)
    dist.barrier()
    if dist.is_writer:
        _write_or_fail(path, lambda: os.replace(tmp, path), tmp)


def _read_window_slice(path: Path, n: int, shape: tuple[int, ...], dtype: torch.dtype, lo: int, hi: int):
    """Samples lo..hi-1 of a file `write_samples` (or `_write_window_slice`) wrote, one at a time."""
    import numpy as np

    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    size = path.stat().st_size
    if size != n * nbytes:
        raise QuantkitError(f"saved activations '{path}' hold {size} bytes, expected {n * nbytes}; the resume "
                            f"state is damaged: delete the .partial folder to start over")
    for i in range(lo, hi):
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=i * nbytes, shape=(nbytes,))
        t = torch.from_numpy(np.array(mm))
        del mm
        yield t.view(dtype).reshape(shape)


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _log_layer(bar, log, li: int, n: int, seconds: float, device: torch.device) -> None:
    msg = f"layer {li + 1}/{n} done in {seconds:.1f} s"
    if device.type == "cuda":
        msg += f", peak VRAM {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    msg += f", peak RSS {_peak_rss_gib():.2f} GiB"
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        log(msg)


def _calibration_windows_from(path: str, dataset: str, nsamples: int, seq_len: int, seed: int):
    from quantkit.data import calibration_windows

    tok = _load_tokenizer(Path(path))
    if tok is None:
        raise QuantkitError(f"calibration needs a tokenizer and '{path}' has none; add tokenizer files or pass "
                            f"calibration=")
    return calibration_windows(tok, dataset, nsamples, seq_len, seed)


def _calibration_in_child(path: Path, dataset: str, nsamples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Tokenize in a short-lived child process: a fast tokenizer and a tokenized train split take ~0.4 GiB
    that the allocator would otherwise keep in this process for the whole layer loop. Same windows."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_calibration_windows_from, (str(path), dataset, nsamples, seq_len, seed))


def _trim_host_memory() -> None:
    """Hand freed heap memory back to the OS after each layer (glibc keeps it otherwise, and a streamed run
    allocates and frees a layer's worth of tensors hundreds of times: RSS crept up ~10 MB per layer)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None


def _open_manifest(partial: Path, settings: dict, n_layers: int) -> dict:
    """Read the resume manifest (refusing other settings) or start a fresh `.partial` folder."""
    mpath = partial / MANIFEST_NAME
    if mpath.exists():
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            raise QuantkitError(f"'{mpath}' is corrupt; delete '{partial}' to start over") from None
        if manifest.get("version") != MANIFEST_VERSION or manifest.get("n_layers") != n_layers:
            raise QuantkitError(f"'{mpath}' was written by another quantkit version or for another model; "
                                f"delete '{partial}' to start over")
        if manifest["settings"] != settings:
            raise QuantkitError(f"'{partial}' holds an interrupted run with other settings "
                                f"({_diff(manifest['settings'], settings)}); rerun with the original settings to "
                                f"resume it, or delete that folder to start over")
        keep = {MANIFEST_NAME} | {u["file"] for u in manifest["units"].values()}
        if manifest.get("acts"):
            keep.add(manifest["acts"]["file"])
        for p in partial.iterdir():  # written after the last manifest update: redone from scratch
            if p.name not in keep:
                remove_tree(p) if p.is_dir() else p.unlink(missing_ok=True)
        manifest["resumed"] = True
        return manifest
    remove_tree(partial)
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise QuantkitError(f"cannot create '{partial}' ({e.strerror or e}); choose another --out or fix its "
                            f"permissions") from None
    manifest = {"version": MANIFEST_VERSION, "n_layers": n_layers, "settings": settings, "units": {},
                "acts": None}
    try:
        _write_json(mpath, manifest)
    except QuantkitError:
        remove_tree(partial)  # nothing to resume yet
        raise
    return manifest


def _finalize(partial: Path, out: Path, manifest: dict, config, src_path: Path, tokenizer, n_layers: int,
              overwrite: bool, log, seconds: float, budget: ActivationBudget) -> Path:
    units = manifest["units"]
    order = ["embed"] + [f"layer.{i}" for i in range(n_layers)] + ["head"]
    weight_map, total, modules = {}, 0, {}
    for u in order:
        for name, nb in units[u]["tensors"].items():
            weight_map[name] = units[u]["file"]
            total += nb
        modules.update(units[u].get("modules", {}))
    # each activation scheme's model-wide step (FlexQ's A8 search needs every layer's score)
    with_act = {n: e for n, e in modules.items() if e.get("act")}
    for fmt in dict.fromkeys(e["act"]["format"] for e in with_act.values()):
        ACT_QUANTIZERS[fmt].finalize_entries({n: e for n, e in with_act.items() if e["act"]["format"] == fmt})
    _write_json(partial / INDEX_NAME, make_index(weight_map, total))
    recipe = manifest["settings"]["recipe"]
    kv = kv_cache_entry(config, load_recipe(recipe).kv_cache)
    cfg = checkpoint_config(config.to_dict(), build_quantization_config(modules, kv, recipe))
    _write_json(partial / "config.json", cfg)

    def copy_extras():
        import shutil

        gen = src_path / "generation_config.json"
        if gen.exists():
            shutil.copyfile(gen, partial / gen.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(partial))
        else:
            for name in _TOKENIZER_FILES:
                if (src_path / name).exists():
                    shutil.copyfile(src_path / name, partial / name)

    _write_or_fail(partial, copy_extras)
    if manifest.get("acts"):
        (partial / manifest["acts"]["file"]).unlink(missing_ok=True)
    (partial / MANIFEST_NAME).unlink()
    remove_tree(partial / "activations")
    try:
        replace_path(partial, out)
    except OSError as e:
        raise write_error(e, out, f"rerun the same command (the finished checkpoint is in '{partial}')") from None
    log(f"offload: {len(modules)} modules quantized in {seconds:.1f} s; activations on the device peaked at "
        f"{format_size(budget.peak)} -> {out}")
    return out
