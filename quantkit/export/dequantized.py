"""`quantkit export CKPT --dequantize`: a plain Hugging Face folder (bf16 or fp16) whose Linear weights are
the weights the quantized checkpoint represents, for tools that read no quantized format.

Only the weights are kept: online activation quantization and a quantized KV cache are runtime behaviour of
quantkit's modules and do not carry over. Where an activation scheme stores the weight for a transformed
input (COMET's channel permutation, ARCQuant's reorder + appended residual columns, which copy outlier
columns), the weight is mapped back to the model's own input channels: column j of the plain weight is the
first stored column that reads input channel j.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.export.common import copy_side_files, read_quantkit_config, write_folder

DTYPES = ("bfloat16", "float16")


def _source_columns(act, k: int):
    """For an activation quantizer whose transform gathers input channels: for each input channel j < k, the
    first column of the transformed (stored) weight holding it."""
    import torch

    probe = torch.arange(1, k + 1, dtype=torch.float64).unsqueeze(0)  # 0 marks padding columns
    src = act.transform_weight(probe)[0].round().long() - 1  # [K'] source channel of each stored column
    cols = torch.full((k,), -1, dtype=torch.long)
    for pos in range(src.numel() - 1, -1, -1):  # last to first, so the first occurrence wins
        j = int(src[pos])
        if 0 <= j < k:
            cols[j] = pos
    if bool((cols < 0).any()):
        raise QuantkitError("an activation transform that drops input channels cannot be dequantized to a plain "
                            "Linear")
    return cols


def plain_weight(m):
    """float32 [out_features, in_features] weight of QuantLinear `m`, in the model's own input channels."""
    import torch

    w = m.dequantize_weight(dtype=torch.float32)
    if m.act is None:
        return w
    k = m.in_features
    if m.weight_in_features == k and m.act.transform_weight(w) is w:
        return w
    return w[:, _source_columns(m.act, k)]


def export_dequantized(ckpt, out, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write checkpoint `ckpt` as a plain HF folder of dequantized weights in `dtype` at `out`."""
    import torch
    from torch import nn

    from quantkit.checkpoint import check_out_dir, load
    from quantkit.nn import QuantLinear

    if dtype not in DTYPES:
        raise QuantkitError(f"--dtype {dtype} is not supported for --dequantize: use {' or '.join(DTYPES)}")
    ckpt, out = Path(ckpt).expanduser(), Path(out).expanduser()
    read_quantkit_config(ckpt)
    check_out_dir(out, overwrite)
    model = load(ckpt)
    tdtype = getattr(torch, dtype)
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(plain_weight(m).to(tdtype), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().to(tdtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    model = model.to(tdtype)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        copy_side_files(model, tmp)

    return write_folder(out, overwrite, fill)
