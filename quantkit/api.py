"""The Python API: `import quantkit as qk`.

    model = qk.quantize("demo", "gptq-w4g128", nsamples=32)      # path, 'demo', or an nn.Module
    qk.save(model, "out/smollm2-w4")
    model = qk.load("out/smollm2-w4", device="cpu")
    qk.eval.perplexity(model, dataset="ptb", max_windows=8)["ppl"]
"""

from __future__ import annotations

import os

import torch
from torch import nn

from quantkit import checkpoint
from quantkit.data import calibration_windows
from quantkit.errors import QuantkitError
from quantkit.models import default_dtype, load_fp_model, resolve_model_path
from quantkit.pipeline import needs_calibration, quantize_model
from quantkit.recipe import Recipe, load_recipe


def load_model(model: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) for 'demo', an HF folder, a GGUF file, or a quantkit checkpoint."""
    from quantkit.models import is_quantized_dir

    path = resolve_model_path(model)
    if is_quantized_dir(path):
        m = checkpoint.load(path, device=device, dtype=dtype)
        return m, m.quantkit_tokenizer
    m, tok = load_fp_model(path, dtype=dtype or default_dtype(device), device="cpu")
    m.quantkit_tokenizer = tok
    m.quantkit_source = str(path)
    return m.to(device), tok


def quantize(
    model: nn.Module | str | os.PathLike,
    recipe: str | os.PathLike | Recipe | dict,
    tokenizer=None,
    dataset: str = "ptb",
    nsamples: int = 128,
    seq_len: int = 2048,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Quantize a model with a recipe; returns the model with QuantLinear modules (on CPU).

    `model` is a loaded HF causal LM or anything `load_model` accepts. Calibration (for methods that need
    it) uses `nsamples` random windows of `seq_len` tokens from the dataset's train split.
    """
    rec = load_recipe(recipe)
    if not isinstance(model, nn.Module):
        model, tokenizer = load_model(model, device="cpu",
                                      dtype=torch.float32 if device == "cpu" else None)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "quantkit_tokenizer", None)
    calib = None
    if needs_calibration(rec):  # GPTQ, or activation schemes calibrated on data (ARCQuant, COMET, FlexQ search)
        if tokenizer is None:
            raise QuantkitError("calibration needs a tokenizer: pass tokenizer=...")
        calib = calibration_windows(tokenizer, dataset, nsamples, seq_len, seed)
    quantize_model(model, rec, calib, device=device, progress=progress)
    model.quantkit_tokenizer = tokenizer
    model.quantkit_recipe = rec.to_dict()
    return model


def quantize_streaming(model: str | os.PathLike, recipe, out: str | os.PathLike, **kwargs):
    """Disk offload: quantize an HF safetensors folder layer by layer straight into the checkpoint `out`,
    never holding the model (RAM or VRAM); resumable. See `quantkit.offload.quantize_streaming`."""
    from quantkit.offload import quantize_streaming as _qs

    return _qs(model, recipe, out, **kwargs)


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, overwrite: bool = False):
    """Write a packed checkpoint folder (see docs/format.md)."""
    return checkpoint.save(model, out, tokenizer=tokenizer, overwrite=overwrite)


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a packed checkpoint; `model.quantkit_tokenizer` holds its tokenizer."""
    return checkpoint.load(path, device=device, dtype=dtype)
