"""Downstream tasks through lm-evaluation-harness (`lm-eval`, the `quantkit[tasks]` extra).

    model, tok = qk.load_model("out/smollm2-w4")
    res = evaluate_tasks(model, tok, ["hellaswag", "arc_easy"], limit=200)
    print(results_table(res))

The quantized model is handed to lm-eval as a model object (`lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tok)`), so its QuantLinear modules run as they are; a checkpoint with a quantized KV cache (COMET's KV4)
evaluates with that cache on, as in `quantkit.eval.perplexity`.

Tasks are lm-eval's own (names as `lm-eval ls tasks` lists them; their datasets come from the Hugging Face hub
unless cached) or YAMLs in an `include_path` folder. A local task (`dataset_path: json` with
`dataset_kwargs: {data_files: ...}`) reads its file through datasets' packaged JSON builder and needs no network;
lm-eval resolves a relative `data_files` path against the working directory, and here a path that does not
exist there is also looked up next to the task's YAML. Set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 in the
environment to make sure nothing is looked up on the hub.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

INSTALL_HINT = "pip install 'quantkit[tasks]'"


def require_lm_eval():
    """The `lm_eval` module, or a one-line QuantkitError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.evaluator  # simple_evaluate and what it imports
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as e:
        raise QuantkitError(f"downstream tasks need lm-evaluation-harness ({e.name or e}): {INSTALL_HINT}") from None
    return lm_eval


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    return {d: _version(d) for d in ("quantkit", "lm_eval", "torch", "transformers", "datasets")}


def _split_names(tasks: str | list[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise QuantkitError("no tasks given: pass --tasks name[,name...]")
    return list(dict.fromkeys(names))


def _index_names(tm) -> list[str]:
    return list(tm.all_tasks)


def _unknown(tm, names: list[str]) -> list[str]:
    known = set(_index_names(tm))
    out = []
    for n in names:
        if n in known or (n.endswith((".yaml", ".yml")) and Path(n).is_file()):
            continue
        if any(c in n for c in "*?[") and fnmatch.filter(known, n):
            continue
        out.append(n)
    return out


def _expand(tm, names: list[str]) -> list[str]:
    """Glob patterns (`arc_*`) expanded the way lm-eval's own command line does."""
    known = set(_index_names(tm))
    out: list[str] = []
    for n in names:
        if n in known or not any(c in n for c in "*?["):
            out.append(n)
        else:
            out += sorted(fnmatch.filter(known, n))
    return list(dict.fromkeys(out))


def task_manager(tasks: str | list[str], include_path: str | os.PathLike | None = None):
    """(lm_eval TaskManager, task names) for `tasks`, or a one-line QuantkitError naming the unknown ones.

    With an include path that defines every requested task, lm-eval's built-in task folder (~15,000 YAMLs,
    seconds to index) is not scanned."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names = _split_names(tasks)
    if include_path is not None:
        include_path = Path(include_path)
        if not include_path.is_dir():
            raise QuantkitError(f"--include-path {include_path}: not a folder of task YAMLs")
        tm = TaskManager(include_path=str(include_path), include_defaults=False)
        # plain task names only: a glob may match built-in tasks too, a group or tag may name built-in members
        kinds = [getattr(getattr(tm.task_index.get(n), "kind", None), "name", None) for n in names]
        if all(k in ("TASK", "PY_TASK") for k in kinds):
            return tm, names
    tm = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = _unknown(tm, names)
    if unknown:
        where = f" (nor in {include_path})" if include_path is not None else ""
        raise QuantkitError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                            f"not in lm-eval {_version('lm_eval')}'s tasks{where}; list them with `lm-eval ls "
                            f"tasks`, or pass --include-path with a folder of task YAMLs")
    return tm, _expand(tm, names)


def _local_data_files(files: Any, folder: Path) -> tuple[Any, bool]:
    """`data_files` with each relative path that is missing from the working directory but present next to
    the YAML made absolute; (new value, whether anything changed)."""
    if isinstance(files, str):
        p = Path(files)
        if not p.is_absolute() and "://" not in files and not p.exists() and (folder / p).exists():
            return str((folder / p).resolve()), True
        return files, False
    if isinstance(files, (list, tuple)):
        pairs = [_local_data_files(f, folder) for f in files]
        return [f for f, _ in pairs], any(c for _, c in pairs)
    if isinstance(files, dict):
        pairs = {k: _local_data_files(v, folder) for k, v in files.items()}
        return {k: f for k, (f, _) in pairs.items()}, any(c for _, c in pairs.values())
    return files, False


def _task_specs(tm, names: list[str]) -> list[str | dict]:
    """Task names, with each YAML task whose local `data_files` lie next to its YAML (not in the working
    directory) replaced by its full config with those paths made absolute."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # another lm-eval layout: leave path resolution to lm-eval
        return list(names)
    index = getattr(tm, "task_index", {})
    specs: list[str | dict] = []
    for name in names:
        entry = index.get(name)
        yaml_path = getattr(entry, "yaml_path", None)
        if yaml_path is None and name.endswith((".yaml", ".yml")) and Path(name).is_file():
            yaml_path = Path(name)
        if yaml_path is None:
            specs.append(name)
            continue
        try:
            cfg = load_yaml(yaml_path, resolve_func=False)
        except Exception:
            specs.append(name)
            continue
        kwargs = cfg.get("dataset_kwargs")
        if not (isinstance(cfg.get("task"), str) and "class" not in cfg and "group" not in cfg
                and isinstance(kwargs, dict) and "data_files" in kwargs):
            specs.append(name)
            continue
        files, changed = _local_data_files(kwargs["data_files"], Path(yaml_path).resolve().parent)
        if not changed:
            specs.append(name)
            continue
        cfg = load_yaml(yaml_path, resolve_func=True)
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
        specs.append(cfg)
    return specs


def parse_batch_size(batch_size: int | str) -> int | str:
    if isinstance(batch_size, int):
        if batch_size < 1:
            raise QuantkitError(f"--batch-size {batch_size}: give a positive integer or 'auto'")
        return batch_size
    s = str(batch_size).strip()
    if s.isdigit() and int(s) > 0:
        return int(s)
    if s == "auto" or (s.startswith("auto:") and s[5:].isdigit()):
        return s
    raise QuantkitError(f"--batch-size {batch_size}: give a positive integer, 'auto' or 'auto:N'")


def evaluate_tasks(model, tokenizer=None, tasks: str | list[str] = (), include_path: str | os.PathLike | None = None,
                   limit: int | float | None = None, batch_size: int | str = 1, num_fewshot: int | None = None,
                   log_samples: bool = False, seed: int = 0, manager=None) -> dict:
    """Run lm-eval tasks on `model` (any HF causal LM, quantized or not) and return lm-eval's results dict
    (`results`, `configs`, `versions`, `n-shot`, ..., `samples` with `log_samples`) plus `library_versions`.

    `limit`: at most this many documents per task (a float below 1: that share of them); `manager`: a
    (TaskManager, names) pair from `task_manager` (the CLI resolves the tasks before loading the model)."""
    require_lm_eval()
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from quantkit.nn import set_weight_cache
    from quantkit.pipeline import kv_cache_context

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "quantkit_tokenizer", None)
    if tokenizer is None:
        raise QuantkitError("downstream tasks need a tokenizer: pass tokenizer=...")
    if limit is not None and limit <= 0:
        raise QuantkitError(f"--limit {limit}: give a positive number of documents (or a share below 1)")
    if num_fewshot is not None and num_fewshot < 0:
        raise QuantkitError(f"--num-fewshot {num_fewshot}: give 0 or more")
    batch_size = parse_batch_size(batch_size)
    tm, names = manager if manager is not None else task_manager(tasks, include_path)
    specs = _task_specs(tm, names)

    model.eval()
    device = next(model.parameters()).device
    kw = {}
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        # lm-eval prefixes an empty context with BOS (else EOS); a tokenizer with neither gets its UNK / PAD / 0
        kw["prefix_token_id"] = next((t for t in (tokenizer.unk_token_id, tokenizer.pad_token_id) if t is not None), 0)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)
    set_weight_cache(model, device.type == "cpu")  # dequantize each QuantLinear once, as perplexity does
    try:
        with torch.no_grad(), kv_cache_context(model):  # a quantized KV cache (COMET's KV4) takes part
            res = lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=tm, num_fewshot=num_fewshot, limit=limit,
                batch_size=batch_size, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        set_weight_cache(model, False)
    if res is None:  # not rank 0 of a distributed run
        raise QuantkitError("lm-eval returned no results (a distributed launch? run a single process)")
    res["library_versions"] = library_versions()
    res["kv_cache"] = getattr(model, "quantkit_kv_cache", None)
    return res


def results_table(res: dict) -> str:
    """lm-eval's Markdown table(s) of `res`: the tasks, then the groups when there are any."""
    from lm_eval.utils import make_table

    out = make_table(res)
    if res.get("groups"):
        out += "\n" + make_table(res, "groups")
    return out


def to_json(res: dict, **extra) -> str:
    """`res` (plus `extra` keys) as JSON, with lm-eval's handling of numpy scalars, sets and functions."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.dumps({**res, **extra}, indent=2, default=handle_non_serializable, ensure_ascii=False)
