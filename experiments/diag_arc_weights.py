"""Diagnostic (CPU, demo model): why do GPTQ / searched-scale weights hurt ARCQuant?

Per Linear, the ARC output error on a held-out PTB window for RTN, searched-scale (`mse`) and GPTQ weights (the
Hessian of the ARC-quantized input, `gptq`, or of the float input, `gptqF`), under NVFP4 + residual activations
(`a4`) or 16-bit ones (`a16`), split into token 0 (the window's first token: the attention sink) and the other
tokens. Inputs come from the FP model (calibration: 3 train windows; evaluation: a 4th). Prints one line per
Linear, then geometric means per Linear type. About 20 minutes on 2 cores:

    python experiments/diag_arc_weights.py
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

WEIGHTS = ("rtn", "mse", "gptq", "gptqF")
LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _arc_input(xr: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """X~ = Q1 + Q2 on the outlier channels: what the augmented GEMM multiplies the weight with."""
    from quantkit.formats.nvfp4 import compute_tensor_scale, nvfp4_fake_quant

    scale = compute_tensor_scale(xr)
    q = nvfp4_fake_quant(xr, scale)
    if s:
        q[:, k - s:] += nvfp4_fake_quant(xr[:, k - s:] - q[:, k - s:], scale)
    return q


def _linear_inputs(n_windows: int = 4) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.nn.Module]]:
    from transformers import AutoTokenizer

    from quantkit.data import calibration_windows
    from quantkit.models import demo_model_dir, load_fp_model

    path = demo_model_dir()
    model = load_fp_model(path)
    model = model[0] if isinstance(model, tuple) else model
    windows = calibration_windows(AutoTokenizer.from_pretrained(path), "ptb", nsamples=n_windows, seq_len=2048)
    windows = windows if isinstance(windows, torch.Tensor) else torch.cat(list(windows))
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        for i in range(n_windows):
            model(windows[i : i + 1])
    for h in hooks:
        h.remove()
    return inputs, dict(model.named_modules())


@torch.no_grad()
def main() -> None:
    from quantkit.formats.nvfp4 import NVFP4Format
    from quantkit.methods.gptq import gptq_quantize

    torch.manual_seed(0)
    inputs, modules = _linear_inputs()
    logs: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for name, xs in inputs.items():
        cal, ev = torch.cat(xs[:3]), xs[3]
        k = cal.shape[1]
        a = cal.abs()
        reorder = torch.argsort(a.amax(0), stable=True)
        ratio = (a > a.amax(-1, keepdim=True) / 8).float().mean().item()  # per-token rule, as the recipe
        s = min(k, math.ceil(k * ratio / 16) * 16)
        w = modules[name].weight.detach().float()[:, reorder]
        fmt = NVFP4Format().prepare(w)
        quantized = {}
        for label, f in (("rtn", fmt), ("mse", NVFP4Format(scale_search="mse").prepare(w))):
            codes, params = f.quantize_rtn(w)
            quantized[label] = f.dequantize_grouped(codes, params)
        xc = _arc_input(cal[:, reorder], k, s)
        for label, h in (("gptq", xc.t() @ xc), ("gptqF", cal[:, reorder].t() @ cal[:, reorder])):
            codes, params = gptq_quantize(w, h, fmt)
            quantized[label] = fmt.dequantize_grouped(codes, params)
        xr = ev[:, reorder]
        y = xr @ w.t()
        xq = _arc_input(xr, k, s)
        parts = []
        for label in WEIGHTS:
            for act, x_in in (("a4", xq), ("a16", xr)):
                e = x_in @ quantized[label].t() - y
                rest = float(e[1:].pow(2).sum() / y[1:].pow(2).sum())
                tok0 = float(e[0].pow(2).sum() / y[0].pow(2).sum())
                typ = name.rsplit(".", 1)[-1]
                logs[(typ, f"{label}/{act}", "rest")].append(math.log(rest))
                logs[(typ, f"{label}/{act}", "tok0")].append(math.log(tok0))
                parts.append(f"{label}/{act} {rest:.3g}/{tok0:.3g}")
        print(f"{name} s={s} (rest/token 0) " + " | ".join(parts), flush=True)
    print("geometric mean of the relative squared error per Linear type, other tokens / token 0:")
    for typ in LINEAR_TYPES:
        cells = []
        for label in WEIGHTS:
            key = f"{label}/a4"
            rest, tok0 = logs[(typ, key, "rest")], logs[(typ, key, "tok0")]
            if rest:
                cells.append(f"{key} {math.exp(sum(rest) / len(rest)):.4f}/{math.exp(sum(tok0) / len(tok0)):.4f}")
        print(f"{typ:10s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
