"""Quantize one HF folder with a peer library and write the fake-quantized weights as a plain HF folder.

Runs inside the peers' own virtual environment (see eval/peers/run_peers.py, which calls it): it imports
llm-compressor or hqq, never quantkit.

    python peer_quantize.py --model DIR --calib windows.pt --config llmc-gptq-w4g128-actorder --out DIR

Configs: llmc-gptq-w{4,3}g128[-actorder] (llm-compressor GPTQModifier, int asymmetric groups of 128, every
decoder Linear, lm_head kept; activation order "static" or off; its other settings at their defaults) and
hqq-w{4,3}g64 (HQQ, groups of 64 along the input dimension, scale and zero unquantized). The written folder
holds float weights (in the model's dtype) equal to the peer's dequantized weights, so any evaluator reads
it; a JSON file beside it records the settings, library versions and the time taken.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

CONFIGS = {
    "llmc-gptq-w4g128": ("llmc", 4, 128, None),
    "llmc-gptq-w4g128-actorder": ("llmc", 4, 128, "static"),
    "llmc-gptq-w3g128": ("llmc", 3, 128, None),
    "llmc-gptq-w3g128-actorder": ("llmc", 3, 128, "static"),
    "hqq-w4g64": ("hqq", 4, 64, None),
    "hqq-w3g64": ("hqq", 3, 64, None),
}


def _decoder_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.search(r"\.layers\.\d+\.", n)}


def _short_last_group_for_the_observer() -> None:
    """llm-compressor 0.14's weight observer reshapes a row into whole groups and fails when the group size
    does not divide K (the demo's K = 576 with groups of 128); its GPTQ itself handles a short last group.
    Pad the observed weight with zeros to whole groups: the min-max range always includes zero, so the short
    group's scale and zero point are the ones it would get on its own."""
    from compressed_tensors.quantization import QuantizationStrategy
    from llmcompressor.observers import helpers

    orig = helpers._flatten_weight

    def flatten(value, args):
        k = value.shape[-1]
        if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP) and k % args.group_size:
            value = torch.nn.functional.pad(value, (0, args.group_size - k % args.group_size))
        return orig(value, args)

    helpers._flatten_weight = flatten


def _dequantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric INT grid of groups along K (the last one may be short): what the stored codes decode to."""
    k = w.shape[1]
    s = scale.float().repeat_interleave(group, dim=1)[:, :k]
    z = zero.float().repeat_interleave(group, dim=1)[:, :k]
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (torch.clamp(torch.round(w / s) + z, lo, hi) - z) * s


def run_llmc(model, calib: torch.Tensor, bits: int, group: int, actorder) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    # the demo's K = 576 and 1536 are not multiples of 128: the last group of a row is short (as in quantkit);
    # llm-compressor quantizes such layers but refuses them unless told that the runtime takes them
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder=actorder,
                            bypass_divisibility_checks=True)
    _short_last_group_for_the_observer()
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], pipeline="sequential")
    # GPTQModifier leaves each Linear's weight at its quantized value; check that on every Linear
    worst = 0.0
    for _name, m in _decoder_linears(model).items():
        w = m.weight.data.float()
        again = _dequantize(w, m.weight_scale, m.weight_zero_point, bits, group)
        worst = max(worst, float((again - w).abs().max()))
    if worst > 1e-5:
        raise SystemExit(f"llm-compressor left weights that are not on their quantization grid (max {worst})")
    return {"dampening_frac": modifier.dampening_frac, "block_size": modifier.block_size,
            "actorder": str(actorder), "observer": "llm-compressor default (min-max for weights)",
            "short_last_group": "observer input zero-padded to whole groups (see _short_last_group_for_the_observer)",
            "requantize_max_abs_diff": worst}


def run_hqq(model, bits: int, group: int) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    for _name, m in _decoder_linears(model).items():
        q = HQQLinear(m, cfg, compute_dtype=m.weight.dtype, device="cpu", del_orig=False)
        m.weight.data = q.dequantize().to(m.weight.dtype).reshape(m.weight.shape)
    return {"quant_config": {k: v for k, v in cfg["weight_quant_params"].items() if not callable(v)}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF folder of the model")
    ap.add_argument("--calib", required=True, help="torch file: LongTensor [nsamples, seq_len] of token ids")
    ap.add_argument("--config", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    lib, bits, group, actorder = CONFIGS[args.config]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    calib = torch.load(args.calib)
    t0 = time.perf_counter()
    info = run_llmc(model, calib, bits, group, actorder) if lib == "llmc" else run_hqq(model, bits, group)
    secs = time.perf_counter() - t0
    out = Path(args.out)
    # a plain HF folder: drop what the peer attached (observers, quantization config) by copying the weights
    # into a freshly loaded model
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    src = dict(model.named_parameters())
    with torch.no_grad():
        for name in _decoder_linears(plain):
            plain.get_submodule(name).weight.copy_(src[f"{name}.weight"])
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors", "hqq")
                if _installed(p)}
    (out / "peer.json").write_text(json.dumps({"config": args.config, "library": lib, "bits": bits,
                                               "group_size": group, "symmetric": False, "seconds": round(secs, 1),
                                               "versions": versions, **info}, indent=2))


def _installed(p: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(p)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
