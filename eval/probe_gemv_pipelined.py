"""Probe: the half2 decode GEMV (kernels/wq_gemv.py) with its weight words streamed through shared memory by
the compiler (PIPELINED, NSTAGE runs in flight) against the register-prefetch version, on the decode step's
Llama-3-8B shapes (fused q/k/v and gate/up included), M = 1.

    python -m quantkit.eval.probe_gemv_pipelined [--json PATH] [--formats int4,hlq2] [--shapes 4096x14336,...]

Timing: eval/bench_kernels.time_rotated (CUDA-graph replays, weights rotated over > 2.5x L2). Every config is
checked against the float64 reference first (relative error printed).
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = [(4096, 14336), (4096, 4096), (4096, 6144), (14336, 4096), (4096, 28672)]
FORMATS = {"int4": ("int", 4), "int2": ("int", 2), "hlq2": ("hlq", 2), "int3": ("int", 3), "hlq4": ("hlq", 4)}
# BLOCK_N, num_warps, NSTAGE, SPLIT_K (None: the same PPS rule as the register version, 8 programs per SM)
PIPE_SWEEP = [(256, 1, 3, 8), (256, 1, 4, 8), (256, 1, 4, 4), (256, 1, 6, 4), (256, 1, 4, 16), (128, 1, 4, 8),
              (128, 1, 4, 16), (512, 2, 4, 8), (512, 2, 4, 4), (256, 2, 4, 8), (512, 1, 4, 8), (256, 1, 8, 2)]


def _run(ps, x, ref, cfg, label, ctx) -> dict:
    from quantkit.eval.bench_kernels import time_rotated
    from quantkit.kernels import dispatch

    y = dispatch.gemv_h2(ps[0], x, None, cfg)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    us = time_rotated([lambda p=p: dispatch.gemv_h2(p, x, None, cfg) for p in ps])
    print(f"  {ctx['format']:5} {label:<34} {us:8.2f} us  ({us / ctx['bf16_us']:.3f}x bf16)  err {err:.1e}",
          flush=True)
    return {**ctx, "label": label, "cfg": cfg, "us": us, "err": err}


def main(argv=None) -> dict:
    from quantkit.eval.bench_kernels import (
        _clone_prepared,
        _n_copies,
        _prepared_bytes,
        _random_quant,
        time_rotated,
    )
    from quantkit.kernels import dispatch
    from quantkit.kernels.reference import wq_matmul_ref

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--formats", default="int4,hlq2")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02]
        wb += [torch.randn_like(wb[0]) for _ in range(_n_copies(wb[0].numel() * 2, l2) - 1)]
        bf16 = time_rotated([lambda w=w, x=x: x @ w.t() for w in wb])
        del wb
        print(f"K={k} N={n} bf16 {bf16:.2f} us", flush=True)
        for name in args.formats.split(","):
            fmt, bits = FORMATS[name]
            raw = _random_quant(fmt, bits, 128, k, n, dev)
            p0 = dispatch.prepare(fmt, bits, 128, k, n, raw)
            ps = [p0] + [_clone_prepared(p0) for _ in range(_n_copies(_prepared_bytes(p0), l2) - 1)]
            ref = wq_matmul_ref(x, fmt, bits, 128, k, raw["qweight"], raw["scales"], raw.get("zeros"),
                                raw.get("offsets"), dtype=torch.float64)

            ctx = {"K": k, "N": n, "format": name, "bf16_us": bf16, "weight_bytes": _prepared_bytes(p0)}
            rows.append(_run(ps, x, ref, None, "autotuned (register prefetch)", ctx))
            for bn, nw, st, split in PIPE_SWEEP:
                cfg = {"BLOCK_N": bn, "SPLIT_K": split, "num_warps": nw, "num_stages": 1, "PIPELINED": True,
                       "NSTAGE": st}
                try:
                    rows.append(_run(ps, x, ref, cfg, f"pipelined bn{bn} w{nw} st{st} split{split}", ctx))
                except Exception as e:  # resources: record and go on
                    print(f"  {name} {cfg} FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)
            del ps, p0
            torch.cuda.empty_cache()
    best = {}
    for r in rows:
        key = (r["K"], r["N"], r["format"], r["label"].startswith("pipelined"))
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("== best per shape / format: register prefetch vs pipelined (us)")
    for (k, n, f, piped), r in sorted(best.items()):
        if piped:
            old = best.get((k, n, f, False))
            print(f"K={k:<6} N={n:<6} {f:5} {old['us'] if old else float('nan'):8.2f} -> {r['us']:8.2f}  "
                  f"{r['label']}")
    out = {"device": torch.cuda.get_device_name(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
