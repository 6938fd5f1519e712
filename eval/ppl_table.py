"""Quantize a model with several recipes and evaluate each: the perplexity tables in docs/results.md.

    python -m quantkit.eval.ppl_table --recipes rtn-w4g128,gptq-w4g128 --nsamples 32 --json out/table.json

For each recipe: quantize (timed), save the packed checkpoint, reload it, perplexity over all full windows
(or --max-windows), bits/weight from the checkpoint (the steps of `quantkit.eval.quality`, on one text). FP is
evaluated once. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> None:
    import quantkit as qk

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--recipes", required=True, help="comma-separated recipe names or paths")
    ap.add_argument("--dataset", default="ptb")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-fp", action="store_true", help="skip the unquantized baseline")
    ap.add_argument("--out-dir", default="out/ppl_table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out_dir = Path(args.out_dir)
    rows = []
    json_path = Path(args.json) if args.json else out_dir / "table.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)

    from quantkit.eval.report import environment

    # library versions: GPTQ results moved with the environment alone (README, demo), so record it
    env = environment(args.device)

    def dump():
        json_path.write_text(json.dumps({"model": args.model, "dataset": args.dataset, "seq_len": args.seq_len,
                                         "nsamples": args.nsamples, "env": env, "rows": rows}, indent=2))

    if not args.no_fp:
        m, tok = qk.load_model(args.model, device=args.device)
        r = qk.eval.perplexity(m, tok, dataset=args.dataset, seq_len=args.seq_len, max_windows=args.max_windows)
        rows.append({"recipe": "fp", "ppl": r["ppl"], "windows": r["windows"], "bits_per_weight": 16.0,
                     "quant_seconds": 0.0, "eval": r})
        dump()
        del m
    from quantkit.eval.quality import measure_recipe

    for name in args.recipes.split(","):
        row = measure_recipe(args.model, name, out_dir, [(args.dataset, args.max_windows)], args.nsamples,
                             args.seq_len, 0, args.device, calibration=args.dataset)
        r = row["eval"][args.dataset]
        rows.append({"recipe": name, "ppl": r["ppl"], "windows": r["windows"],
                     "bits_per_weight": row["bits_per_weight"], "quant_seconds": row["quant_seconds"], "eval": r})
        dump()
    print(f"\n{args.model}, {args.dataset} test, seq_len {args.seq_len}, calibration {args.nsamples} x "
          f"{args.seq_len}")
    print(f"{'recipe':<18} {'ppl':>10} {'windows':>8} {'bits/w':>8} {'quant s':>8}")
    for r in rows:
        print(f"{r['recipe']:<18} {r['ppl']:>10.3f} {r['windows']:>8} {r['bits_per_weight']:>8.3f} "
              f"{r['quant_seconds']:>8.1f}")
    print(f"JSON: {json_path}")


if __name__ == "__main__":
    main()
