"""Reporting shared by the benchmarks (`quantkit bench kernels`, `quantkit bench latency`): a fixed-width text
table from a list of dicts, and JSON written atomically (parent folders made, temp file + rename).

    cols = [Column("M", "M", "5d"), Column("us", "us", "9.2f"), Column("vs_bf16", "/bf16", "6.3f")]
    print(format_table(rows, cols))
    write_json("out/bench.json", {"rows": rows})
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    """One table column: `key` into each row, `header`, a format spec for the value ("9.2f", "<11", "d"),
    and the alignment used for the header and for missing values ("-")."""

    key: str
    header: str
    spec: str = ""
    align: str = ">"


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: Iterable[dict], columns: list[Column], title: str | None = None) -> str:
    """Rows as a text table: a header line, a rule, one line per row; widths fit the widest cell."""
    rows = list(rows)
    cells = [[_cell(r.get(c.key), c.spec) for c in columns] for r in rows]
    widths = [max([len(c.header)] + [len(row[i].strip()) for row in cells]) for i, c in enumerate(columns)]

    def line(values):
        return " ".join(f"{v.strip():{c.align}{w}}" for v, c, w in zip(values, columns, widths, strict=True))

    head = line([c.header for c in columns])
    out = ([title] if title else []) + [head, "-" * len(head)] + [line(row) for row in cells]
    return "\n".join(out)


def _default(o: Any):
    if hasattr(o, "item") and callable(o.item):  # 0-d tensors / numpy scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """Write `obj` as JSON to `path` (folders made; temp file + rename, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=_default))
    os.replace(tmp, path)
    return path


def environment(device: Any = None) -> dict[str, Any]:
    """torch / triton / transformers versions and the device measured on: the CUDA device (name, SMs, L2) where
    present, unless `device` says the run is on the CPU."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        p = torch.cuda.get_device_properties(dev if dev is not None and dev.index is not None
                                             else torch.cuda.current_device())
        env.update(device=p.name, sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None),
                   gpu_memory_bytes=p.total_memory)
    else:
        env["device"] = "cpu"
    return env
