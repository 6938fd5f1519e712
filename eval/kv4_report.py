"""KV4 cache on a model (default: the demo, SmolLM2-135M): bytes, generate() vs eval path, perplexity by group.

    python -m quantkit.eval.kv4_report --groups 16,32,64 --max-windows 4 --gen-float64 \
        --json docs/results/kv4_smollm2.json

(a) bytes per token (all layers, K and V) of a KV4Cache after a full window, against a bf16 DynamicCache;
(b) greedy generation of --new-tokens tokens from --prompts PTB-test prompts of --prompt-len tokens with
    `model.generate(cache=KV4Cache(...))`, against a greedy loop that recomputes the whole sequence
    each step under `kv4_enabled` (the evaluation path; no cache carried between steps): per-token agreement,
    and the share of stored 4-bit codes that agree with one eval-path forward over the generated sequence;
    for scale, the share of bitwise-equal K/V between an unquantized DynamicCache filled by generate() and
    one full forward (matmuls over 1 token vs. over the window round differently), and how many tokens
    agree with unquantized greedy generation; `--gen-float64` repeats (b) in float64;
(c) PTB-test perplexity (`quantkit.eval.perplexity`, the fixed protocol) with weights and activations in full
    precision and only K/V in KV4, one row per group size, plus the FP row.
Weights stay unquantized; model dtype float32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantkit.kvcache import cache_argument


def _greedy_recompute(model, prompt: torch.Tensor, new_tokens: int, group: int, rotate: bool = False) -> torch.Tensor:
    from quantkit.kvcache import kv4_enabled

    seq = prompt
    with torch.no_grad(), kv4_enabled(model, group=group, rotate=rotate):
        for _ in range(new_tokens):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def generation_agreement(model, prompts: torch.Tensor, new_tokens: int, group: int, rotate: bool = False) -> dict:
    """Tokens of generate(KV4Cache) vs the full-recompute eval path, per prompt (prompts: [P, L] ids)."""
    from transformers import DynamicCache

    from quantkit.kvcache import KV4Cache, unpack_int4

    rows = []
    for p in prompts:
        x = p.unsqueeze(0)
        mask = torch.ones_like(x)
        cache = KV4Cache(model.config, group=group, rotate=rotate)
        t0 = time.perf_counter()
        gen = model.generate(x, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, **{cache_argument(model): cache})
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = _greedy_recompute(model, x, new_tokens, group, rotate)
        t_ref = time.perf_counter() - t0
        dyn = DynamicCache(config=model.config)
        fp = model.generate(x, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                            min_new_tokens=new_tokens, **{cache_argument(model): dyn})
        a, b, f = gen[0, x.shape[1]:], ref[0, x.shape[1]:], fp[0, x.shape[1]:]
        diff = (a != b).nonzero()
        # stored codes: the cache after generate vs one eval-path forward over the same tokens
        fresh = KV4Cache(model.config, group=group, rotate=rotate)
        with torch.no_grad():
            model(gen[:, :-1], **{cache_argument(model): fresh})
        same = total = 0
        for la, lb in zip(cache.layers, fresh.layers, strict=True):
            for key in ("k", "v"):
                ca, cb = unpack_int4(la.stored()[key][0]), unpack_int4(lb.stored()[key][0])
                same += int((ca == cb).sum())
                total += ca.numel()
        # the unquantized cache shows the same chunking effect: generate's DynamicCache vs one full forward
        full = DynamicCache(config=model.config)
        with torch.no_grad():
            model(fp[:, :-1], **{cache_argument(model): full})
        fp_same = fp_total = 0
        for la, lb in zip(dyn.layers, full.layers, strict=True):
            for ta, tb in ((la.keys, lb.keys), (la.values, lb.values)):
                fp_same += int((ta == tb).sum())
                fp_total += ta.numel()
        rows.append({"agree": int((a == b).sum()), "tokens": int(a.numel()),
                     "first_divergence": int(diff[0]) if diff.numel() else None,
                     "agree_with_fp_generate": int((a == f).sum()),
                     "code_agreement": same / total, "fp_cache_bitwise": fp_same / fp_total,
                     "generate_seconds": round(t_gen, 2),
                     "recompute_seconds": round(t_ref, 2), "memory": cache.memory_report()})
    agree, tokens = sum(r["agree"] for r in rows), sum(r["tokens"] for r in rows)
    return {"group": group, "rotate": rotate, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "agree": agree, "tokens": tokens, "agreement_pct": 100.0 * agree / tokens,
            "agree_with_fp_pct": 100.0 * sum(r["agree_with_fp_generate"] for r in rows) / tokens,
            "code_agreement_pct": 100.0 * sum(r["code_agreement"] for r in rows) / len(rows),
            "fp_cache_bitwise_pct": 100.0 * sum(r["fp_cache_bitwise"] for r in rows) / len(rows), "prompts": rows}


def main(argv=None) -> None:
    from quantkit.data import load_text, tokenize
    from quantkit.eval.perplexity import perplexity
    from quantkit.kvcache import KV4Cache, check_group, head_dim_of, kv4_bytes_per_token, kv4_enabled
    from quantkit.models import load_fp_model, resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--groups", default="16,32,64", help="comma-separated group sizes (must divide head_dim)")
    ap.add_argument("--gen-group", type=int, default=None, help="group for (b) (default: the KV4Cache default)")
    ap.add_argument("--dataset", default="ptb")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--rotate", choices=("off", "on", "both"), default="off",
                    help="Hadamard rotation of K/V before quantizing (kv_cache.rotate); both: ppl rows for each")
    ap.add_argument("--gen-float64", action="store_true",
                    help="repeat (b) in float64 (matmul rounding no longer depends on how tokens are chunked)")
    ap.add_argument("--json", type=Path, default=Path("out/kv4_report.json"))
    a = ap.parse_args(argv)

    model, tok = load_fp_model(resolve_model_path(a.model))
    cfg = model.config
    hd = head_dim_of(cfg)
    groups = [check_group(hd, int(g)) for g in a.groups.split(",")]
    out = {"model": a.model, "head_dim": hd, "kv_heads": cfg.num_key_value_heads, "layers": cfg.num_hidden_layers,
           "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "dataset": a.dataset}
    a.json.parent.mkdir(parents=True, exist_ok=True)

    def dump():
        a.json.write_text(json.dumps(out, indent=2))

    # (a) bytes per token: measured on a cache filled by one window of the test split
    ids = tokenize(tok, load_text(a.dataset, "test"))
    window = ids[: min(a.seq_len, ids.numel())].unsqueeze(0)
    gen_rotate = a.rotate == "on"  # (a) and (b) measure one setting; (c) can measure both
    out["bytes"] = []
    for g in groups:
        cache = KV4Cache(cfg, group=g, rotate=gen_rotate)
        with torch.no_grad():
            model(window, **{cache_argument(model): cache})
        rep = cache.memory_report()
        assert rep["kv4_bytes"] == rep["tokens"] * cfg.num_hidden_layers * kv4_bytes_per_token(
            cfg.num_key_value_heads, hd, g)
        out["bytes"].append(rep)
    dump()

    # (b) generate() with KV4Cache vs the full-recompute eval path
    gen_group = a.gen_group or KV4Cache(cfg).group
    stride = max(ids.numel() // a.prompts, a.prompt_len)
    prompts = torch.stack([ids[i * stride : i * stride + a.prompt_len] for i in range(a.prompts)])
    out["generation"] = [generation_agreement(model, prompts, a.new_tokens, gen_group, gen_rotate)]
    dump()

    # (c) perplexity, KV4 only
    out["ppl"] = []
    if not a.no_ppl:
        r = perplexity(model, tok, dataset=a.dataset, seq_len=a.seq_len, max_windows=a.max_windows)
        out["ppl"].append({"kv": "fp", "group": None, **r})
        dump()
        for rot in {"off": [False], "on": [True], "both": [False, True]}[a.rotate]:
            for g in groups:
                with kv4_enabled(model, group=g, rotate=rot):
                    r = perplexity(model, tok, dataset=a.dataset, seq_len=a.seq_len, max_windows=a.max_windows)
                out["ppl"].append({"kv": "kv4+rot" if rot else "kv4", "group": g, **r})
                dump()

    if a.gen_float64:
        model.double()
        out["generation"].append(generation_agreement(model, prompts, a.new_tokens, gen_group, gen_rotate))
        model.float()
        dump()

    print(f"\n{a.model}: head_dim {hd}, {cfg.num_key_value_heads} KV heads, {cfg.num_hidden_layers} layers, "
          f"{out['dtype']}")
    print("(a) bytes per token, all layers, K+V")
    print(f"{'group':>6} {'KV4 B/tok':>10} {'bf16 B/tok':>11} {'ratio':>7}")
    for r in out["bytes"]:
        print(f"{r['group']:>6} {r['kv4_bytes_per_token']:>10.0f} {r['bf16_bytes_per_token']:>11.0f} "
              f"{r['ratio']:>7.4f}")
    print(f"(b) greedy {a.new_tokens} tokens x {a.prompts} PTB prompts of {a.prompt_len}: generate(KV4Cache) vs "
          f"full-recompute eval path")
    print(f"{'dtype':>8} {'group':>6} {'tokens agree':>14} {'%':>7} {'codes equal %':>14} "
          f"{'FP cache bitwise %':>19} {'same as FP gen %':>17}")
    for g in out["generation"]:
        print(f"{g['dtype']:>8} {g['group']:>6} {g['agree']:>8}/{g['tokens']:<5} {g['agreement_pct']:>7.2f} "
              f"{g['code_agreement_pct']:>14.3f} {g['fp_cache_bitwise_pct']:>19.3f} {g['agree_with_fp_pct']:>17.1f}")
    if out["ppl"]:
        fp = out["ppl"][0]["ppl"]
        w = out["ppl"][0]
        print(f"(c) {a.dataset} test ppl, seq_len {a.seq_len}, {w['windows']} windows ({w['predicted_tokens']} "
              f"tokens predicted), weights/activations FP")
        print(f"{'KV':>7} {'group':>6} {'ppl':>9} {'x FP':>7} {'KV bytes vs bf16':>17}")
        ratio = {r["group"]: r["ratio"] for r in out["bytes"]}
        for r in out["ppl"]:
            rr = f"{ratio[r['group']]:.4f}" if r["group"] else "1"
            print(f"{r['kv']:>7} {r['group'] or '-':>6} {r['ppl']:>9.3f} {r['ppl'] / fp:>7.4f} {rr:>17}")
    print(f"JSON: {a.json}")


if __name__ == "__main__":
    main()
