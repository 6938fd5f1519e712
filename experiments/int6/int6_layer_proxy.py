"""Layer-local proxy for INT6 g128 weight choices: relative output error tr(E H Eᵀ)/tr(W H Wᵀ) of every Linear
in the given decoder layers of the demo model, E = W − Ŵ, H over 8 held-out PTB train windows (seed 123); the
Hessians GPTQ uses come from the first NCAL windows of the usual calibration draw (seed 0); inputs are the FP
model's (no sequential quantization). Minutes instead of the tens of minutes of a GPTQ + perplexity run.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python experiments/int6/int6_layer_proxy.py 0,15,29 8

Prints each Linear's errors relative to GPTQ act-order with the plain scale rule and the geometric means
(README, FlexQ). Variants: RTN and GPTQ with `clip_search: mse` / `mse_h` (clip_min 0.7 / 0.85 / 0.5), and
a least-squares refit of the group scales for GPTQ's codes ("+refit"; "_cal": on the calibration Hessian).
"""
import math
import sys
import time

import torch

from quantkit.data import calibration_windows
from quantkit.formats import Int6
from quantkit.formats.int6 import ZERO
from quantkit.methods import HessianAccumulator, gptq_quantize, rtn_quantize
from quantkit.models import decoder_layers, demo_model_dir, load_fp_model

torch.manual_seed(0)
LAYERS = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0, 8, 16, 24, 29]
NCAL, NTEST, SEQ = int(sys.argv[2]) if len(sys.argv) > 2 else 16, 8, 2048
model, tok = load_fp_model(demo_model_dir())
cal = calibration_windows(tok, "ptb", NCAL, SEQ, seed=0)
test = calibration_windows(tok, "ptb", NTEST, SEQ, seed=123)
layers = decoder_layers(model)
lin = {f"{li}.{n}": m for li in LAYERS for n, m in layers[li].named_modules() if isinstance(m, torch.nn.Linear)}
acc = {}
mode = ["cal"]
def mk(name, m):
    def hook(mod, args):
        key = (name, mode[0])
        if key not in acc:
            acc[key] = HessianAccumulator(m.in_features, "cpu")
        acc[key].add(args[0])
    return hook
hs = [m.register_forward_pre_hook(mk(n, m)) for n, m in lin.items()]
t = time.time()
with torch.no_grad():
    for data, md in ((cal, "cal"), (test, "test")):
        mode[0] = md
        for i in range(data.shape[0]):
            model(data[i : i + 1])
for h in hs:
    h.remove()
print(f"collected in {time.time()-t:.0f}s", flush=True)

def refit(w, codes, scale, H, g=128):
    """Least-squares group scales for fixed codes: min_s (w − Σ s_g q_g) H (…)ᵀ per row."""
    n, k = w.shape
    q = (codes - ZERO).float()
    G = scale.shape[1]
    qg = torch.zeros(n, G, k)
    for gi in range(G):
        qg[:, gi, gi * g : (gi + 1) * g] = q[:, gi * g : (gi + 1) * g]
    qgh = torch.einsum("ngk,kl->ngl", qg, H)
    A = torch.einsum("ngl,nhl->ngh", qgh, qg)
    b = torch.einsum("ngl,nl->ng", qgh, w)
    A = A + 1e-6 * A.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(G)
    s = torch.linalg.solve(A, b.unsqueeze(-1))[..., 0]
    s = torch.where(s > 0, s, scale)  # keep sign convention
    return s.half().float()

def relerr(w, deq, H):
    e = w - deq
    return float(torch.einsum("nk,kl,nl->", e, H, e) / torch.einsum("nk,kl,nl->", w, H, w))

results = {}
t = time.time()
for name, m in lin.items():
    w = m.weight.detach().float()
    Hc, Ht = acc[(name, "cal")].h, acc[(name, "test")].h
    variants = {}
    f0 = Int6(6, 128)
    fu = Int6(6, 128, clip_search="mse")
    fw = Int6(6, 128, clip_search="mse_h")
    fw85 = Int6(6, 128, clip_search="mse_h", clip_min=0.85, clip_steps=16)
    fw5 = Int6(6, 128, clip_search="mse_h", clip_min=0.5, clip_steps=51)
    for vn, f in (("rtn", f0), ("rtn_mse", fu)):
        c, p = rtn_quantize(w, f)
        variants[vn] = relerr(w, f.dequantize_grouped(c, p), Ht)
    for vn, f in (("gptq", f0), ("gptq_mse", fu), ("gptq_mseH", fw), ("gptq_mseH85", fw85), ("gptq_mseH50", fw5)):
        c, p = gptq_quantize(w, Hc, f, damping=0.01, block_size=128, act_order=True)
        variants[vn] = relerr(w, f.dequantize_grouped(c, p), Ht)
        if vn in ("gptq", "gptq_mseH"):
            s2 = refit(w, c, p["scale"], Hc)
            variants[vn + "+refit"] = relerr(w, f.dequantize_grouped(c, {"scale": s2}), Ht)
            variants[vn + "+refit_cal"] = relerr(w, f.dequantize_grouped(c, {"scale": s2}), Hc)
            variants[vn + "_cal"] = relerr(w, f.dequantize_grouped(c, p), Hc)
    results[name] = variants
    print(name, " ".join(f"{k}={v/variants['gptq']:.3f}" for k, v in variants.items()), f"gptq={variants['gptq']:.2e}", flush=True)
print(f"quantized in {time.time()-t:.0f}s")
keys = list(next(iter(results.values())))
for k in keys:
    gm = math.exp(sum(math.log(r[k] / r["gptq"]) for r in results.values()) / len(results))
    print(f"{k:22s} geomean vs gptq: {gm:.4f}")
