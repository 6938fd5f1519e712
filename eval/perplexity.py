"""Perplexity by the fixed protocol of docs/design.md (section "Evaluation protocol").

Tokenize the whole split (no BOS), cut it into non-overlapping windows of `seq_len`, drop the remainder,
ppl = exp(mean NLL over every predicted token (seq_len − 1 per window)).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantkit.data import load_text, tokenize
from quantkit.errors import QuantkitError


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # a mean NLL past ~709 nats: report inf (the CLI refuses non-finite results)
        return math.inf


@torch.no_grad()
def perplexity(model, tokenizer=None, dataset: str = "ptb", seq_len: int = 2048,
               max_windows: int | None = None, split: str = "test", progress: bool = True) -> dict:
    """Evaluate `model` (any HF causal LM, quantized or not) and return a JSON-ready dict with `ppl`."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "quantkit_tokenizer", None)
    if tokenizer is None:
        raise QuantkitError("perplexity needs a tokenizer: pass tokenizer=...")
    ids = tokenize(tokenizer, load_text(dataset, split))
    windows = ids.numel() // seq_len
    if windows == 0:
        raise QuantkitError(f"{dataset}/{split} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        windows = min(windows, max_windows)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    model.eval()
    from quantkit.nn import set_weight_cache

    # On CPU, dequantize each QuantLinear once for the whole evaluation instead of once per window.
    set_weight_cache(model, device.type == "cpu")
    from quantkit.pipeline import kv_cache_context

    kv = getattr(model, "quantkit_kv_cache", None)
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    bar = tqdm(range(windows), desc=f"ppl {dataset}", unit="window", disable=not progress)
    try:
        with kv_cache_context(model):  # a quantized KV cache (COMET's KV4) takes part in every window
            for i in bar:
                x = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(device)
                logits = model(x, use_cache=False).logits[0, :-1].float()
                nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
                count += seq_len - 1
                bar.set_postfix(ppl=f"{_exp(nll / count):.3f}")
    finally:
        set_weight_cache(model, False)
    return {
        "dataset": dataset, "split": split, "seq_len": seq_len, "windows": windows,
        "tokens": windows * seq_len, "predicted_tokens": count, "nll": nll / count,
        "ppl": _exp(nll / count), "seconds": round(time.perf_counter() - t0, 2),
        "dtype": str(dtype).replace("torch.", ""), "device": str(device), "kv_cache": kv,
    }
