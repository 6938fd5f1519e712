"""Layer-local proxy 2 (see int6_layer_proxy.py): GPTQ act-order INT6 g128 with 16 / 32 / 64 calibration
windows, damping 0.003 / 0.01 / 0.03 / 0.1, plain order, fixed scale headroom c = 1.03 / 1.06, and
`clip_search: mse`; held-out relative output error of each Linear vs the shipped setting (32 windows,
damping 0.01), geometric means last.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python experiments/int6/int6_layer_proxy2.py 0,15,29
"""
import math
import sys
import time

import torch

from quantkit.data import calibration_windows
from quantkit.formats import Int6
from quantkit.methods import HessianAccumulator, gptq_quantize
from quantkit.models import decoder_layers, demo_model_dir, load_fp_model

LAYERS = [int(x) for x in sys.argv[1].split(",")]
SNAP = [16, 32, 64]
NTEST, SEQ = 8, 2048
model, tok = load_fp_model(demo_model_dir())
cal = calibration_windows(tok, "ptb", max(SNAP), SEQ, seed=0)
test = calibration_windows(tok, "ptb", NTEST, SEQ, seed=123)
layers = decoder_layers(model)
lin = {f"{li}.{n}": m for li in LAYERS for n, m in layers[li].named_modules() if isinstance(m, torch.nn.Linear)}
acc, snaps = {}, {}
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
    mode[0] = "test"
    for i in range(NTEST):
        model(test[i : i + 1])
    mode[0] = "cal"
    for i in range(max(SNAP)):
        model(cal[i : i + 1])
        if i + 1 in SNAP:
            for n in lin:
                snaps[(n, i + 1)] = acc[(n, "cal")].h.clone()
            print(f"{i+1} windows, {time.time()-t:.0f}s", flush=True)
for h in hs:
    h.remove()

class Head(Int6):
    def __init__(self, c):
        super().__init__(6, 128)
        self.c = c
    def fit(self, w, importance=None):
        return {"scale": self._scale(w.float().abs().amax(-1) * self.c)}

def relerr(w, deq, H):
    e = w - deq
    return float(torch.einsum("nk,kl,nl->", e, H, e) / torch.einsum("nk,kl,nl->", w, H, w))

f0 = Int6(6, 128)
fu = Int6(6, 128, clip_search="mse")
V = {"n16": (16, 0.01, f0, True), "n32": (32, 0.01, f0, True), "n64": (64, 0.01, f0, True),
     "n32_noact": (32, 0.01, f0, False),
     "n32_d.003": (32, 0.003, f0, True), "n32_d.03": (32, 0.03, f0, True), "n32_d.1": (32, 0.1, f0, True),
     "n64_d.03": (64, 0.03, f0, True),
     "n32_head1.03": (32, 0.01, Head(1.03), True), "n32_head1.06": (32, 0.01, Head(1.06), True),
     "n32_mse": (32, 0.01, fu, True), "n64_mse": (64, 0.01, fu, True)}
results = {}
for name, m in lin.items():
    w = m.weight.detach().float()
    Ht = acc[(name, "test")].h
    r = {}
    for vn, (nc, d, f, ao) in V.items():
        c, p = gptq_quantize(w, snaps[(name, nc)], f, damping=d, block_size=128, act_order=ao)
        r[vn] = relerr(w, f.dequantize_grouped(c, p), Ht)
    results[name] = r
    print(name, " ".join(f"{k}={v/r['n32']:.3f}" for k, v in r.items()), flush=True)
for k in V:
    gm = math.exp(sum(math.log(r[k] / r["n32"]) for r in results.values()) / len(results))
    print(f"{k:16s} geomean vs n32: {gm:.4f}")
