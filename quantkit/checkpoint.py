"""Packed checkpoints: save and load (format described in docs/format.md).

A checkpoint is an HF-style folder: `config.json` (the model config + `quantization_config`), sharded
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, tokenizer files. Quantized Linears
store their packed tensors under `<module>.<name>`; every other tensor is stored as it was. Loading builds
the model skeleton on the meta device, swaps in QuantLinear modules from `quantization_config.modules`,
and assigns the stored tensors — no calibration code, no pickle.

Writes go to `<out>.partial/`, each shard through a temp file + rename, and the folder is renamed into
place only when complete, so an interrupted save never leaves a half-valid checkpoint at `<out>`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quantkit.adapters import adapter_for
from quantkit.errors import QuantkitError
from quantkit.nn import QuantLinear
from quantkit.recipe import WeightSpec, acts_from_dict, weights_from_dict

FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# config.json key that makes transformers *without* quantkit fail loudly instead of returning random Linears (it
# skips an unknown quant_method with a warning): transformers reads `transformers_weights` as the name of the weights
# file and refuses, quoting it, one that is not a .safetensors file. With quantkit imported, its transformers
# quantizer drops the key before that check (quantkit.integrations.transformers); `load` ignores it. Optional: a
# checkpoint without it (written before) loads the same.
TRANSFORMERS_GUARD_KEY = "transformers_weights"
TRANSFORMERS_GUARD = ("this is a quantkit checkpoint: run `import quantkit` before from_pretrained (pip install "
                      "quantkit), or load it with quantkit.load(path)")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` without `overwrite`, and an `out` that cannot be written (checked with a
    probe file next to it, so a read-only location fails before the long part, not after)."""
    if out.exists() and not out.is_dir() and not overwrite:
        raise QuantkitError(f"output '{out}' is an existing file; pass --overwrite (overwrite=True) to replace it "
                            f"or choose another --out")
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuantkitError(f"output '{out}' exists and is not empty; pass --overwrite (overwrite=True) "
                            f"or choose another --out")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """Create and delete a probe file where `<out>.partial` will be created (the nearest existing folder
    above `out`): a read-only or full location, or a file in the way, fails here."""
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise QuantkitError(f"cannot write --out '{out}': '{anc}' is not a writable folder "
                            f"({e.strerror or e}); choose another --out or fix its permissions") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_path(path: Path) -> None:
    """Delete a file, link or folder tree at `path` if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def replace_path(src: Path, out: Path) -> None:
    """Rename the finished folder `src` to `out`, replacing what is at `out` (a folder or a file) through
    `<out>.old`, which is deleted afterwards."""
    if out.exists() or out.is_symlink():
        old = out.with_name(out.name + ".old")
        remove_path(old)
        os.replace(out, old)
        os.replace(src, out)
        remove_path(old)
    else:
        os.replace(src, out)


def write_error(e: OSError, what: Path, then: str) -> QuantkitError:
    """One line for a failed write: disk full, or the OS's reason."""
    if e.errno == errno.ENOSPC:
        return QuantkitError(f"disk full while writing '{what}'; free space and {then}")
    return QuantkitError(f"could not write '{what}' ({e.strerror or e}); fix that and {then}")


def write_folder(out: Path, overwrite: bool, fill, then: str) -> Path:
    """Check `out`, let `fill(tmp)` write the whole folder into `<out>.partial`, then rename it to `out`.
    Anything that fails on the way removes the partial folder; an OSError becomes one line ending in `then`."""
    check_out_dir(out, overwrite)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        replace_path(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, out, then) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _state_for_saving(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out, seen = {}, {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:  # tied weights (lm_head = embeddings) are stored once
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    if cur or not shards:
        shards.append(cur)
    return shards


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors shard atomically (temp file + rename).

    One metadata key only: safetensors keeps metadata in a hash map whose order changes from run to run, so
    two keys would make identical tensors give different bytes (the format version lives in the index).
    """
    part = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(part), metadata={"format": "pt"})
        os.chmod(part, 0o666 & ~_umask())  # the writer creates 0600 files; honour the umask as open() does
        os.replace(part, path)
    except SafetensorError as e:
        part.unlink(missing_ok=True)
        m = re.search(r"os error (\d+)", str(e))  # an I/O failure (disk full, ...): an OSError to the callers
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def make_index(weight_map: dict[str, str], total_bytes: int) -> dict:
    return {"metadata": {"total_size": total_bytes, "quantkit_format_version": FORMAT_VERSION},
            "weight_map": weight_map}


def quantization_config(model) -> dict:
    report = getattr(model, "quantkit_report", None)
    modules = dict(report.modules) if report is not None else {}
    if not modules:  # a model loaded from a checkpoint: rebuild the table from its modules
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                modules[name] = m.scheme_entry()
    if not modules:
        raise QuantkitError("the model has no quantized modules; run quantize() first")
    return build_quantization_config(modules, getattr(model, "quantkit_kv_cache", None),
                                     getattr(model, "quantkit_recipe", None))


def build_quantization_config(modules: dict, kv_cache: dict | None = None, recipe: dict | None = None) -> dict:
    """config.json's `quantization_config` (docs/format.md): the one place both writers (`save` and the
    streaming pipeline) build it."""
    qc = {"quant_method": "quantkit", "format_version": FORMAT_VERSION, "modules": modules}
    if kv_cache:
        qc["kv_cache"] = kv_cache
    if recipe is not None:
        qc["recipe"] = recipe
    return qc


def checkpoint_config(model_config: dict, qc: dict) -> dict:
    """The checkpoint's config.json: the model's config, its `quantization_config`, and the entry that makes
    plain transformers refuse the checkpoint instead of loading random weights."""
    return {**model_config, "quantization_config": qc, TRANSFORMERS_GUARD_KEY: TRANSFORMERS_GUARD}


def save(model, out: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` (with QuantLinear modules) as a packed checkpoint folder. Returns the folder."""
    out = Path(out).expanduser()
    check_out_dir(out, overwrite)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "quantkit_tokenizer", None)
    qc = quantization_config(model)
    check_packed_modules(model)

    def fill(tmp: Path) -> None:
        tensors = _state_for_saving(model)
        shards = _shards(tensors, max_shard_bytes)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_shard(shard, tmp / fname)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        (tmp / INDEX_NAME).write_text(json.dumps(make_index(weight_map, total), indent=2))
        cfg = checkpoint_config(model.config.to_dict(), qc)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_folder(out, overwrite, fill, "run it again (nothing was left at that path)")


def read_config(path: Path) -> tuple[dict, dict]:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise QuantkitError(f"'{path}' has no config.json; it is not a quantkit checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise QuantkitError(f"'{cfg_path}' is not valid JSON ({e.msg}); the checkpoint is corrupt") from None
    qc = cfg.pop("quantization_config", None) or {}
    if cfg.get(TRANSFORMERS_GUARD_KEY) == TRANSFORMERS_GUARD:
        del cfg[TRANSFORMERS_GUARD_KEY]
    if qc.get("quant_method") != "quantkit":
        raise QuantkitError(f"'{path}' is not a quantkit checkpoint (no quantization_config with "
                            f"quant_method 'quantkit')")
    check_format_version(qc, f"'{path}'")
    return cfg, qc


def check_format_version(qc: dict, what: str) -> None:
    """Refuse a `quantization_config` of a format_version this quantkit does not read."""
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise QuantkitError(f"{what} has checkpoint format_version {version}; this quantkit reads version "
                            f"{FORMAT_VERSION}: upgrade quantkit or re-export the checkpoint")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError):
            raise QuantkitError(f"'{index}' is corrupt; re-export the checkpoint") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise QuantkitError(f"'{path}' holds no .safetensors shards")
    tensors = {}
    for fname in files:
        f = path / fname
        if not f.exists():
            raise QuantkitError(f"checkpoint shard '{f}' is missing; the checkpoint is incomplete")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
        except Exception as e:
            raise QuantkitError(f"checkpoint shard '{f}' is truncated or corrupt ({str(e).splitlines()[0]}); "
                                f"re-export the checkpoint") from None
    return tensors


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a quantkit checkpoint: an HF causal LM whose quantized Linears are QuantLinear modules."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise QuantkitError(f"checkpoint folder '{path}' does not exist")
    cfg, qc = read_config(path)
    config = AutoConfig.for_model(**cfg)
    tensors = _read_tensors(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype or _stored_dtype(tensors, adapter_for(config, check=False).embed_path))
    quant = install_quant_linears(model, qc.get("modules", {}))  # empty; filled below, as transformers fills them
    check_quant_tensors(quant, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()})
    skeleton = model.state_dict()
    expected = set(skeleton)
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        owner = next((n for n in qc.get("modules", {}) if unexpected[0].startswith(n + ".")), None)
        what = f" (module '{owner}' is listed as {_scheme_words(qc['modules'][owner])}, which stores no such " \
               f"tensor)" if owner else ""
        n = f"{len(unexpected)} tensors" if len(unexpected) > 1 else "a tensor"
        raise QuantkitError(f"checkpoint holds {n} its quantization_config does not expect ('{unexpected[0]}'"
                            f"{what}); config.json does not match the shards (edited?): restore it or re-export "
                            f"the checkpoint")
    missing = [k for k in expected if k not in tensors and not _is_quant_key(model, k)]
    adapter = adapter_for(model, check=False)
    tied = adapter.tied(config)
    missing = [k for k in missing if not (tied and k == adapter.lm_head_weight)]  # stored once, as the embeddings
    if missing:
        raise QuantkitError(f"checkpoint is missing {len(missing)} tensors (e.g. '{missing[0]}'); "
                            f"it is incomplete or corrupt")
    for k, t in tensors.items():  # stored floats take the dtype of what they fill (`dtype`), as in transformers
        if t.is_floating_point() and t.dtype != skeleton[k].dtype:
            tensors[k] = t.to(skeleton[k].dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.eval()
    model = model.to(device)
    try:
        model.quantkit_tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception:
        model.quantkit_tokenizer = None
    model.quantkit_recipe = qc.get("recipe")
    model.quantkit_kv_cache = qc.get("kv_cache")
    return model


def build_quant_linear(model, name: str, entry: dict) -> QuantLinear:
    """The QuantLinear that `quantization_config.modules[name]` describes, checked against the module of `model`
    it replaces: its packed tensors empty on the meta device in their declared shapes and dtypes, its activation
    quantizer's buffers as `from_entry` makes them, its bias (if any) empty in the dtype of the replaced weight.
    The one place both loaders build modules: `load` fills them from the shards it reads, the transformers
    integration (quantkit.integrations.transformers) lets transformers' loader fill them."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise QuantkitError(f"checkpoint lists module '{name}', which the model config does not have") from None
    spec = _spec_from_entry(entry, name)
    k, n = int(entry["in_features"]), int(entry["out_features"])
    if (getattr(old, "in_features", k), getattr(old, "out_features", n)) != (k, n):
        raise QuantkitError(f"module '{name}': checkpoint says {k}->{n}, the model config says "
                            f"{old.in_features}->{old.out_features}")
    act = _act_from_entry(entry, name, k)
    wk = act.weight_in_features if act is not None else k
    if int(entry.get("weight_in_features", wk)) != wk:
        raise QuantkitError(f"module '{name}': weight_in_features {entry['weight_in_features']} does not "
                            f"match its activation scheme ({wk}); the checkpoint config is corrupt")
    packed = {p: torch.empty(shape, dtype=pdtype, device="meta")
              for p, (shape, pdtype) in packed_names(spec, wk, n).items()}
    weight = getattr(old, "weight", None)
    bias = torch.empty(n, dtype=weight.dtype if weight is not None else torch.get_default_dtype(),
                       device="meta") if entry.get("bias") else None
    return QuantLinear(k, n, spec, packed, bias, act=act)


def install_quant_linears(model, modules: dict[str, dict]) -> dict[str, QuantLinear]:
    """Replace every module `quantization_config.modules` lists with its (empty) `build_quant_linear`."""
    built = {}
    for name, entry in modules.items():
        built[name] = build_quant_linear(model, name, entry)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, built[name])
    return built


def check_quant_tensors(quant: dict[str, QuantLinear],
                        stored: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Every tensor the (empty) QuantLinears `quant` need is among the `stored` ones (name -> shape, dtype) with
    the shape and dtype its scheme declares; a QuantkitError naming the first one that is not."""
    for name, ql in quant.items():
        owned = [(f"act.{b}", buf) for b, buf in ql.act.named_buffers()] if ql.act is not None else []
        for suffix, ref in owned + list(ql.packed().items()):
            key = f"{name}.{suffix}"
            if key not in stored:
                raise QuantkitError(f"checkpoint is missing tensor '{key}'; it is incomplete or corrupt")
            shape, dt = stored[key]
            if tuple(shape) != tuple(ref.shape) or dt != ref.dtype:
                raise QuantkitError(f"tensor '{key}' has shape {tuple(shape)} {dt}, expected "
                                    f"{tuple(ref.shape)} {ref.dtype}; the checkpoint does not match its "
                                    f"quantization_config")
        if ql.bias is not None and f"{name}.bias" not in stored:
            raise QuantkitError(f"checkpoint is missing tensor '{name}.bias'")


def _scheme_words(entry: dict) -> str:
    keys = ("format", "bits", "group_size", "symmetric")
    return ", ".join(f"{k} {entry[k]}" for k in keys if k in entry) or "its scheme"


def _is_quant_key(model, key: str) -> bool:
    """A tensor a QuantLinear owns (its packed buffers, or its activation quantizer's: `<m>.act.<name>`)."""
    parts = key.split(".")
    for cut in (len(parts) - 1, len(parts) - 2):
        try:
            if cut > 0 and isinstance(model.get_submodule(".".join(parts[:cut])), QuantLinear):
                return True
        except AttributeError:
            continue
    return False


def _stored_dtype(tensors: dict[str, torch.Tensor], embed: str | None = None) -> torch.dtype:
    """The dtype of the stored token embeddings (`embed`: their module, as the model adapter names it)."""
    floats = [t.dtype for k, t in tensors.items()
              if t.is_floating_point() and (k.startswith(f"{embed}.") if embed else "embed" in k)]
    return floats[0] if floats else torch.float32


def _act_from_entry(entry: dict, name: str, k: int):
    a = entry.get("act")
    if a is None:
        return None
    from quantkit.nn.act_quant import ACT_QUANTIZERS
    from quantkit.recipe import load_act_formats

    load_act_formats()
    where = f"quantization_config.modules['{name}'].act"
    fmt = a.get("format")
    if fmt not in ACT_QUANTIZERS:
        raise QuantkitError(f"checkpoint config is invalid: {where}.format '{fmt}' is not an activation format "
                            f"this quantkit knows ({', '.join(sorted(ACT_QUANTIZERS))})")
    cls = ACT_QUANTIZERS[fmt]
    spec_keys = {"format", "bits", "group_size", *cls_options(fmt)}
    try:
        spec = acts_from_dict({kk: v for kk, v in a.items() if kk in spec_keys}, where=where)
    except QuantkitError as e:
        raise QuantkitError(f"checkpoint config is invalid: {e}") from None
    return cls.from_entry(spec, k, {kk: v for kk, v in a.items() if kk not in spec_keys})


def cls_options(fmt: str) -> tuple[str, ...]:
    from quantkit.recipe import ACT_FORMAT_LIMITS

    return ACT_FORMAT_LIMITS[fmt][3]


def _spec_from_entry(entry: dict, name: str) -> WeightSpec:
    keys = {k: v for k, v in entry.items()
            if k not in ("method", "in_features", "out_features", "bias", "act", "weight_in_features")}
    try:
        return weights_from_dict(keys, where=f"quantization_config.modules['{name}']")
    except QuantkitError as e:
        raise QuantkitError(f"checkpoint config is invalid: {e}") from None


def packed_names(spec: WeightSpec, k: int, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the packed tensors a module of this spec stores (k = its weight's input
    features): its format's declaration, `WeightFormat.packed_tensors` (quantkit/formats/base.py)."""
    from quantkit.formats import packed_tensors

    return {name: (tuple(t.shape), t.dtype) for name, t in packed_tensors(spec, n, k).items()}


def check_packed_modules(model) -> None:
    """Every QuantLinear of `model` holds exactly the packed tensors its format declares for its shape (names
    in order, shapes, dtypes), so that a saved checkpoint is one `load` accepts; a QuantkitError otherwise."""
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        want = packed_names(m.spec, m.weight_in_features, m.out_features)
        have = {p: (tuple(t.shape), t.dtype) for p, t in m.packed().items()}
        if list(have.items()) != list(want.items()):
            def words(d: dict) -> str:
                return ", ".join(f"{p} {tuple(s)} {str(dt).replace('torch.', '')}" for p, (s, dt) in d.items())

            raise QuantkitError(f"module '{name}' holds packed tensors ({words(have)}), but format "
                                f"'{m.spec.format}' declares ({words(want)}) for a {m.weight_in_features} -> "
                                f"{m.out_features} weight; a checkpoint of it would not load (a bug in the format "
                                f"or in code that changed the module)")
