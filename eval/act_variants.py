"""One set of quantized weights, several activation schemes: the FlexQ perplexity table in one quantization.

    python -m quantkit.eval.act_variants --base flexq-w6a6 \
        --variants int6-w6a16,flexq-w6a8,flexq-w6a6-noa8,flexq-w6a6-down8,flexq-w6a6 --nsamples 32

Activation quantization is dynamic and the pipeline propagates activation-float outputs while it quantizes
weights, so recipes that differ only in their `activations` produce bit-identical weights
(tests/test_act_quant.py checks this). The base recipe is quantized once (the search recipe, so every
Linear's A6-vs-A8 sensitivity is measured); each variant then gets its own recipe's activation spec per
module (the search re-run on the recorded scores where the variant asks for it) and is evaluated.
Variants must share the base's method and weight scheme. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def apply_variant(model, recipe) -> list[str]:
    """Give every QuantLinear the activation quantizer `recipe` asks for (keeping measured sensitivities);
    returns the Linears the search put in high precision."""
    from quantkit.methods.flexq import select_high_precision
    from quantkit.nn import QuantLinear, build_act_quantizer
    from quantkit.pipeline import set_kv_cache

    set_kv_cache(model, recipe.kv_cache)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for n, m in mods.items():
        if recipe.scheme_for(n) != m.spec:
            raise SystemExit(f"variant '{recipe.name}' quantizes '{n}' as {recipe.scheme_for(n)}, the base as "
                             f"{m.spec}: variants must share the base's weights")
        if not hasattr(m, "_base_act"):
            m._base_act = m.act
        base, spec = m._base_act, recipe.act_scheme_for(n)
        if base is not None and base.transform_weight(torch.eye(2, m.in_features)).shape[1] != m.in_features:
            raise SystemExit("act_variants handles activation schemes that keep the input width only")
        if spec is None:
            if base is not None and base.spec.format != "int":
                raise SystemExit(f"variant '{recipe.name}' drops the base's '{base.spec.format}' activation "
                                 f"transform, which the stored weights depend on")
            m.act = None
        elif base is not None and base.spec == spec:
            m.act = base  # the same settings: nothing to re-derive (works on a loaded checkpoint too)
        elif base is not None and base.spec.format == spec.format:
            m.act = base.with_spec(spec)  # same calibration (scores, permutation), the variant's settings
            if hasattr(base, "sensitivity"):
                m.act.sensitivity = base.sensitivity
        elif spec.format == "int" and (base is None or base.spec.format == "int"):
            m.act = build_act_quantizer(spec, m.in_features)
        else:
            raise SystemExit(f"variant '{recipe.name}' uses activation format '{spec.format}' on '{n}', the base "
                             f"'{base.spec.format if base else None}': they must match")
        m.kernel_key = m.fmt.name if m.act is None else f"{m.act.spec.format}:{m.fmt.name}"
    return select_high_precision(mods)


def main(argv=None) -> None:
    import quantkit as qk
    from quantkit.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--base", required=True, help="recipe quantized once (use the one with the search)")
    ap.add_argument("--variants", required=True, help="comma-separated recipes sharing the base's weights")
    ap.add_argument("--dataset", default="ptb")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--fp", action="store_true", help="also evaluate the unquantized model")
    ap.add_argument("--out-dir", default="out/act_variants")
    ap.add_argument("--load", default=None,
                    help="a checkpoint an earlier run saved (<out-dir>/<base>): its weights instead of quantizing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out_dir = Path(args.out_dir)
    json_path = Path(args.json) if args.json else out_dir / "table.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def dump():
        json_path.write_text(json.dumps({"model": args.model, "dataset": args.dataset, "seq_len": args.seq_len,
                                         "nsamples": args.nsamples, "base": args.base, "rows": rows}, indent=2))

    def evaluate(m, tok=None):
        return qk.eval.perplexity(m, tok, dataset=args.dataset, seq_len=args.seq_len,
                                  max_windows=args.max_windows)

    if args.fp:
        m, tok = qk.load_model(args.model)
        r = evaluate(m, tok)
        rows.append({"recipe": "fp", "ppl": r["ppl"], "a8_linears": None, "eval": r})
        dump()
        del m
    t0 = time.perf_counter()
    if args.load:
        model, ck = qk.load(args.load), args.load
    else:
        model = qk.quantize(args.model, args.base, dataset=args.dataset, nsamples=args.nsamples,
                            seq_len=args.seq_len)
        ck = qk.save(model, out_dir / args.base, overwrite=True)
    quant_s = time.perf_counter() - t0
    for name in args.variants.split(","):
        rec = load_recipe(name)
        high = apply_variant(model, rec)
        n_q = sum(1 for m in model.modules() if hasattr(m, "kernel_key"))
        a8 = sum(1 for _, m in model.named_modules()
                 if getattr(m, "act", None) is not None and hasattr(m, "kernel_key") and m.act.spec.bits >= 8)
        blocks = [(int((m.act.block_bits >= 8).sum()), m.act.block_bits.numel(), n.rsplit(".", 1)[-1])
                  for n, m in model.named_modules() if hasattr(getattr(m, "act", None), "block_bits")]
        share = None
        if blocks:  # COMET: share of INT8 activation blocks, overall and per Linear type
            share = {"all": sum(b[0] for b in blocks) / sum(b[1] for b in blocks)}
            for t in sorted({b[2] for b in blocks}):
                sel = [b for b in blocks if b[2] == t]
                share[t] = sum(b[0] for b in sel) / sum(b[1] for b in sel)
        r = evaluate(model)
        rows.append({"recipe": name, "ppl": r["ppl"], "a8_linears": a8, "quantized_linears": n_q,
                     "searched_a8": high, "int8_block_share": share, "kv_cache": r.get("kv_cache"), "eval": r})
        dump()
    fp = next((r["ppl"] for r in rows if r["recipe"] == "fp"), None)
    print(f"\n{args.model}, {args.dataset} test, seq_len {args.seq_len}, calibration {args.nsamples} x "
          f"{args.seq_len}; weights of '{args.base}' "
          + (f"(loaded from {ck})" if args.load else f"(quantized once in {quant_s:.0f} s, saved to {ck})"))
    print(f"{'recipe':<20} {'ppl':>10} {'x FP':>7} {'A8 Linears':>11}")
    for r in rows:
        ratio = f"{r['ppl'] / fp:.3f}" if fp else "-"
        a8 = "-" if r["a8_linears"] is None else f"{r['a8_linears']}/{r['quantized_linears']}"
        print(f"{r['recipe']:<20} {r['ppl']:>10.3f} {ratio:>7} {a8:>11}")
    print(f"JSON: {json_path}")


if __name__ == "__main__":
    main()
