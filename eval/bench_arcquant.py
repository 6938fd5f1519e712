"""ARCQuant kernel benchmark (protocol in docs/performance.md): the full ARC linear vs cuBLAS bf16, on a CUDA GPU.

    python -m quantkit.eval.bench_arcquant [--shapes 4096x14336,...] [--ms 1,16,128,1024,4096]
                                           [--s 256,0] [--json out/bench_arcquant.json] [--no-check]

For Llama-3-8B linear shapes (K, N), batch sizes M and residual channels s it times, side by side:
- `bf16`       cuBLAS `x @ w.t()` (w [N, K] bf16)
- `arc_fused`  full ARC linear: activation kernel (reorder + NVFP4 + residual + pack, with its amax pre-pass
               where M·K > 2^14) → NVFP4×NVFP4 GEMM (the GEMV up to GEMV_MAX_M rows, else tensor cores)
- `arc_dequant` full ARC linear, large-M strategy: activation kernel writing bf16 X' (S folded in) → W'
               decoded to a bf16 workspace → cuBLAS addmm (alpha = Sw)   [M >= 32 only]
- `gemm`       the NVFP4 GEMM alone on a pre-quantized X'
- `act`        the activation kernel alone
Every contender rotates among copies of its weights (> 2.5× L2 in total, ≥ 120 MB) and is timed as CUDA-graph
replays (eval/bench_kernels.time_rotated), so launch overhead and L2 reuse are out of every row alike.
Before timing, `--check` (default on) verifies at the real shapes: activation kernel == torch reference bit
for bit, GEMM vs a float64 reference. Prints a table (µs and ratios vs bf16) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantkit.eval.bench_kernels import copy_bandwidth, n_copies, time_rotated

SHAPES = [(4096, 14336), (4096, 4096), (14336, 4096), (4096, 1024)]
MS = [1, 16, 128, 1024, 4096]


def _inputs(m: int, k: int, dev, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    chan = torch.rand(k, device=dev, generator=g) * 2 + 0.05
    chan[torch.randperm(k, device=dev, generator=g)[: k // 100]] *= 30  # ~1% outlier channels
    return (torch.randn(m, k, device=dev, generator=g) * chan).to(torch.bfloat16)


def _weights(k: int, n: int, s: int, dev, copies: int):
    from quantkit.arc_numerics import arc_weight
    from quantkit.kernels import nvfp4_gemm as kg

    reorder = torch.randperm(k, device=dev)
    w = torch.randn(n, k, device=dev) * 0.02
    wq = arc_weight(w, reorder, s)
    del w
    first = kg.prepare_arc_weight(wq.packed, wq.block_scales, wq.tensor_scale, k, s)
    ws = [first] + [kg.ArcWeight(first.q.clone(), first.s.clone(), first.sw, k, s) for _ in range(copies - 1)]
    return reorder, wq, ws


def check(k: int, n: int, s: int, ms: list[int], dev, log) -> list[dict]:
    """Correctness at a real shape: activation kernel bit-exact, GEMM / full linear vs float64."""
    from quantkit.arc_numerics import arc_quantize_activation
    from quantkit.kernels import nvfp4_gemm as kg
    from quantkit.kernels.nvfp4_reference import nvfp4_mm_ref

    reorder, wq, (wp,) = _weights(k, n, s, dev, 1)
    ridx = reorder.to(torch.int32)
    out = []
    for m in ms:
        x = _inputs(m, k, dev, seed=m)
        ref = arc_quantize_activation(x, reorder, s)
        q, bs, sx = kg.arc_quantize_activation_triton(x, ridx, s)
        exact = (torch.equal(q, ref.packed) and torch.equal(bs.view(torch.uint8), ref.block_scales.view(torch.uint8))
                 and sx.item() == ref.tensor_scale.item())
        _, xd = kg.arc_quantize_activation_triton(x, ridx, s, packed=False, deq_dtype=torch.bfloat16)
        from quantkit.formats.nvfp4 import nvfp4_dequantize

        deq_exact = torch.equal(xd, nvfp4_dequantize(ref.packed, ref.block_scales, ref.tensor_scale).to(torch.bfloat16))
        yref = nvfp4_mm_ref(q, bs, sx, wq.packed, wq.block_scales, wq.tensor_scale)
        y32 = kg.nvfp4_mm(q, bs, sx, wp, out_dtype=torch.float32)
        err_gemm = ((y32.double() - yref).norm() / yref.norm()).item()
        y32 = kg.nvfp4_mm(q, bs, sx, wp, out_dtype=torch.float32, path="mm")
        err_mm = ((y32.double() - yref).norm() / yref.norm()).item()
        errs = {}
        for path in ("fused", "dequant"):
            y = kg.arc_linear(x, ridx, wp, path=path)
            errs[path] = ((y.double() - yref).norm() / yref.norm()).item()
        row = {"K": k, "N": n, "s": s, "M": m, "act_bit_exact": exact, "deq_bf16_exact": deq_exact,
               "gemm_fp32_rel_err": err_gemm, "mm_fp32_rel_err": err_mm, "fused_bf16_rel_err": errs["fused"],
               "dequant_bf16_rel_err": errs["dequant"]}
        log(f"  check {row}")
        out.append(row)
    return out


def bench_shape(k: int, n: int, s: int, ms: list[int], l2: int, dev, log, bf16_cache: dict) -> list[dict]:
    from quantkit.kernels import nvfp4_gemm as kg

    rows = []

    def add(m, name, us, copies):
        rows.append({"K": k, "N": n, "s": s, "M": m, "contender": name, "us": us, "copies": copies})
        log(f"  K={k:<6} N={n:<6} s={s:<4} M={m:<5} {name:<12} {us:10.2f} us  ({copies} copies)")

    xs = {m: _inputs(m, k, dev, seed=m) for m in ms}
    if (k, n) not in bf16_cache:
        nb = n * k * 2
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(n_copies(nb, l2))]
        bf16_cache[(k, n)] = {m: time_rotated([lambda w=w, x=xs[m]: x @ w.t() for w in wb]) for m in ms}
        bf16_cache[(k, n, "copies")] = len(wb)
        del wb
        torch.cuda.empty_cache()
    for m in ms:
        add(m, "bf16", bf16_cache[(k, n)][m], bf16_cache[(k, n, "copies")])
    wbytes = n * (-(-k // 16) * 16 + s) * 9 // 16
    copies = max(n_copies(wbytes, l2), -(-(120 << 20) // wbytes))
    reorder, _wq, ws = _weights(k, n, s, dev, copies)
    ridx = reorder.to(torch.int32)
    for m in ms:
        x = xs[m]
        q, bs, sx = kg.arc_quantize_activation_triton(x, ridx, s)
        add(m, "act", time_rotated([lambda x=x: kg.arc_quantize_activation_triton(x, ridx, s)] * 4), 1)
        add(m, "gemm", time_rotated([lambda w=w, q=q, bs=bs, sx=sx: kg.nvfp4_mm(q, bs, sx, w) for w in ws]), len(ws))
        if m <= 16:  # both GEMM paths where either could serve (decides GEMV_MAX_M)
            for path in ("gemv", "mm"):
                add(m, f"gemm_{path}", time_rotated([lambda w=w, q=q, bs=bs, sx=sx, p=path: kg.nvfp4_mm(q, bs, sx, w, path=p)
                                                     for w in ws]), len(ws))
        add(m, "arc_fused", time_rotated([lambda w=w, x=x: kg.arc_linear(x, ridx, w, path="fused") for w in ws]),
            len(ws))
        if m >= 32:
            add(m, "arc_dequant", time_rotated([lambda w=w, x=x: kg.arc_linear(x, ridx, w, path="dequant")
                                                for w in ws]), len(ws))
    del ws
    torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    by = {}
    for r in rows:
        by.setdefault((r["K"], r["N"], r["s"], r["M"]), {})[r["contender"]] = r["us"]
    out = []
    for (k, n, s, m), c in sorted(by.items()):
        bf = c.get("bf16")
        full = {p: c[p] for p in ("arc_fused", "arc_dequant") if p in c}
        best = min(full, key=full.get) if full else None
        out.append({"K": k, "N": n, "s": s, "M": m, "bf16_us": bf, "act_us": c.get("act"), "gemm_us": c.get("gemm"), "gemm_gemv_us": c.get("gemm_gemv"),
                    "gemm_mm_us": c.get("gemm_mm"),
                    "arc_fused_us": c.get("arc_fused"), "arc_dequant_us": c.get("arc_dequant"),
                    "best_path": best, "arc_us": full.get(best),
                    "arc_vs_bf16": full[best] / bf if best and bf else None,
                    "gemm_vs_bf16": c["gemm"] / bf if "gemm" in c and bf else None})
    return out


def tuned_configs() -> dict:
    """The autotuner's choice per key (M bucket, N, KQ), for the record."""
    from quantkit.kernels import nvfp4_gemm as kg

    return {name: {str(key): str(cfg) for key, cfg in fn.cache.items()}
            for name, fn in (("gemv", kg.gemv_tuned), ("mm_small", kg.mm_small_tuned), ("mm_large", kg.mm_large_tuned))}


def _f(v, spec):
    return format(v, spec) if v is not None else "-"


def table(summary: list[dict]) -> str:
    head = (f"{'K':>6} {'N':>6} {'s':>4} {'M':>5} {'bf16':>9} {'act':>8} {'gemm':>9} {'fused':>9} {'dequant':>9} "
            f"{'best':>8} {'arc/bf16':>8} {'gemm/bf16':>9}")
    lines = [head, "-" * len(head)]
    for r in summary:
        lines.append(f"{r['K']:>6} {r['N']:>6} {r['s']:>4} {r['M']:>5} {_f(r['bf16_us'], '9.2f')} "
                     f"{_f(r['act_us'], '8.2f')} {_f(r['gemm_us'], '9.2f')} {_f(r['arc_fused_us'], '9.2f')} "
                     f"{_f(r['arc_dequant_us'], '9.2f')} {r['best_path'] or '-':>8} {_f(r['arc_vs_bf16'], '8.3f')} "
                     f"{_f(r['gemm_vs_bf16'], '9.3f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m quantkit.eval.bench_arcquant", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN list")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--s", default="256,0", help="residual channel counts")
    ap.add_argument("--s0-shapes", default="4096x14336", help="shapes that also run the s values after the first")
    ap.add_argument("--json", default="out/bench_arcquant.json", help="JSON output path")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check at real shapes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_arcquant needs a CUDA GPU")
    import triton

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth(dev)
    log = lambda s: print(s, flush=True)
    log(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, copy bandwidth "
        f"{bw / 1e12:.2f} TB/s; torch {torch.__version__}, triton {triton.__version__}")
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    s0 = {tuple(int(v) for v in sh.split("x")) for sh in args.s0_shapes.split(",") if sh}
    ms = [int(v) for v in args.ms.split(",")]
    ss = [int(v) for v in args.s.split(",")]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": props.name, "sms": props.multi_processor_count, "l2_bytes": l2, "copy_bw_Bps": bw,
              "torch": torch.__version__, "triton": triton.__version__,
              "timing": "CUDA-graph replays, weights rotated over > 2.5x L2 (>= 120 MB)", "checks": [], "rows": []}
    t0 = time.time()
    if not args.no_check:
        result["checks"] = check(*shapes[0], ss[0], [1, 16, 4096], dev, log)
        out.write_text(json.dumps(result, indent=1))
    bf16_cache: dict = {}
    for k, n in shapes:
        for s in ss if (k, n) in s0 else ss[:1]:
            result["rows"] += bench_shape(k, n, s, ms, l2, dev, log, bf16_cache)
            result["summary"] = summarize(result["rows"])
            out.write_text(json.dumps(result, indent=1))
            log(f"  [{time.time() - t0:.0f} s]")
    result["tuned"] = tuned_configs()
    out.write_text(json.dumps(result, indent=1))
    log(table(result["summary"]))
    for name, cfgs in result["tuned"].items():
        for key, cfg in cfgs.items():
            log(f"  tuned {name} {key}: {cfg}")
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
