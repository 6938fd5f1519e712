"""GPTQ settings on two texts, without the save/reload round trip of `quantkit.eval.quality`.

    python experiments/gptq_variants.py OUT.jsonl '[["label", "base-recipe", {method overrides}, {weights overrides}], ...]' [--fp]

Quantizes the demo model in memory once per variant (the base recipe with the overrides merged into its
`method` / `weights` sections), calibration 32 x 2048 tokens of PTB train (seed 0), and appends one JSON line
per variant with the perplexity on the first 8 PTB test windows and the first 4 enwiki test windows, the
quantize and evaluation seconds. Used to decide recipe defaults; the shipped recipes are then measured with
the quality job.
"""
import copy
import json
import sys
import time

import torch

import quantkit as qk
from quantkit.data import calibration_windows
from quantkit.eval import perplexity
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe

out = sys.argv[1]
variants = json.loads(sys.argv[2])  # list of [label, base_recipe, method_overrides, weights_overrides]
torch.manual_seed(0)
fp, tok = qk.load_model("demo", device="cpu", dtype=torch.float32)
calib = calibration_windows(tok, "ptb", 32, 2048, 0)


def ev(m):
    a = perplexity(m, tok, dataset="ptb", seq_len=2048, max_windows=8, progress=False)["ppl"]
    b = perplexity(m, tok, dataset="enwiki", seq_len=2048, max_windows=4, progress=False)["ppl"]
    return a, b


res = []
if "--fp" in sys.argv:
    t = time.time()
    a, b = ev(fp)
    res.append({"label": "fp", "ptb": a, "enwiki": b, "secs": time.time() - t})
    print(res[-1], flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(res[-1]) + "\n")
for label, base, mo, wo in variants:
    r = load_recipe(base).to_dict()
    r["method"].update(mo)
    r["weights"].update(wo)
    r["name"] = label
    m = copy.deepcopy(fp)
    t = time.time()
    quantize_model(m, load_recipe(r), calib, progress=False)
    qs = time.time() - t
    a, b = ev(m)
    res.append({"label": label, "ptb": a, "enwiki": b, "quant_s": qs, "eval_s": time.time() - t - qs})
    print(res[-1], flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(res[-1]) + "\n")
