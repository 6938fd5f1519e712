"""What a checkpoint holds: per-module scheme, bits per weight (parameters included), sizes."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from quantkit.checkpoint import INDEX_NAME, read_config
from quantkit.errors import QuantkitError


def _scheme_str(e: dict) -> str:
    g = e.get("group_size") or "ch"
    fmt = str(e.get("format"))
    s = f"{fmt if fmt[-1].isdigit() else fmt + str(e.get('bits'))} g{g}"  # int6 / nvfp4 name their width
    if e.get("format") == "int":
        s += " sym" if e.get("symmetric") else " asym"
    s = f"{s} ({e.get('method', '?')})"
    a = e.get("act")
    if a:
        ga = a.get("group_size") or "tok"
        af = str(a.get("format"))
        s += f" | act {af if af[-1].isdigit() else af + str(a.get('bits'))} g{ga}"
        if a.get("residual_channels"):
            s += f" +{a['residual_channels']}ch"
        if a.get("bits_per_activation") is not None:
            s += f" {a['bits_per_activation']:.2f}b/act"
        if a.get("int8_blocks") is not None:
            s += f" int8 blocks {a['int8_blocks']}/{a['blocks']}"
        if a.get("sensitivity") is not None:
            s += f" sens={a['sensitivity']:.3g}"
    return s


def inspect_checkpoint(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise QuantkitError(f"checkpoint folder '{path}' does not exist")
    _, qc = read_config(path)
    index = path / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else sorted(p.name for p in path.glob("*.safetensors"))
    sizes: dict[str, int] = {}
    numels: dict[str, int] = {}
    for f in files:
        try:
            with safe_open(str(path / f), framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    numels[k] = n
                    sizes[k] = n * _dtype_bytes(sl.get_dtype())
        except Exception as e:
            raise QuantkitError(f"checkpoint shard '{path / f}' is truncated or corrupt ({e})") from None
    rows, qparams, qbytes = [], 0, 0
    for name, e in qc["modules"].items():
        k, n = int(e["in_features"]), int(e["out_features"])
        b = sum(v for key, v in sizes.items() if key.startswith(name + ".") and key != name + ".bias")
        rows.append({"name": name, "scheme": _scheme_str(e), "shape": f"{n}x{k}",
                     "bits_per_weight": 8 * b / (k * n), "bytes": b, "act": e.get("act")})
        qparams += k * n
        qbytes += b
    disk = sum(sizes.values())
    # what the same tensors take in bf16: quantized Linears at 2 bytes/weight, the rest at 2 bytes/element
    other = sum(numels[k] for k in numels if not any(k.startswith(r["name"] + ".") and not k.endswith(".bias")
                                                      for r in rows))
    bf16 = 2 * (qparams + other)
    return {
        "path": str(path), "format_version": qc["format_version"], "recipe": (qc.get("recipe") or {}).get("name"),
        "modules": rows,
        "totals": {"quantized_modules": len(rows), "quantized_params": qparams,
                   "quantized_disk_bytes": qbytes, "quantized_bf16_bytes": 2 * qparams,
                   "bits_per_weight": 8 * qbytes / max(qparams, 1), "disk_bytes": disk, "bf16_bytes": bf16},
    }


def _dtype_bytes(dt: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dt, 4)
