"""Export a quantkit checkpoint for other runtimes (`quantkit export`, docs/serving.md).

- `export_compressed_tensors(ckpt, out)`: the compressed-tensors format (transformers, vLLM), every scheme it
  can store exactly, bit for bit; the others are refused with one line naming the nearest recipe that exports.
- `export_dequantized(ckpt, out, dtype)`: a plain bf16 / fp16 Hugging Face folder of the dequantized weights.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError

TARGETS = ("compressed-tensors",)


def export(ckpt, out, to: str | None = None, dequantize: bool = False, dtype: str = "bfloat16",
           overwrite: bool = False) -> Path:
    """`quantkit export`: exactly one of `to` (a target in TARGETS) and `dequantize`."""
    if to is not None and dequantize:
        raise QuantkitError("pass either --to TARGET or --dequantize, not both")
    if dequantize:
        from quantkit.export.dequantized import export_dequantized

        return export_dequantized(ckpt, out, dtype=dtype, overwrite=overwrite)
    if to is None:
        raise QuantkitError(f"say what to export to: --to {' | '.join(TARGETS)}, or --dequantize for a plain "
                            f"16-bit folder")
    if to not in TARGETS:
        raise QuantkitError(f"unknown export target '--to {to}': use {' | '.join(TARGETS)}, or --dequantize for "
                            f"a plain 16-bit folder")
    from quantkit.export.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(ckpt, out, overwrite=overwrite)


__all__ = ["TARGETS", "export"]
