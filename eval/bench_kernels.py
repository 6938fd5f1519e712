"""Kernel benchmark (protocol in docs/performance.md): weight-only Triton GEMMs vs cuBLAS bf16 / fp8 and torch's tinygemm.

Imported as `quantkit.eval.bench_kernels`; `main(argv)` is the entry point (`quantkit bench kernels`).

For Llama-3-8B linear shapes (K, N) and batch sizes M it times, in one process, side by side:
- `bf16`      cuBLAS `a @ w.t()` (w [N, K] bf16)
- `fp8`       cuBLAS `torch._scaled_mm` (e4m3 × e4m3 → bf16, per-tensor scales; M padded up to 16; activation
              quantization not counted)
- `tinygemm`  `torch.ops.aten._weight_int4pack_mm` (int4, group 128, bf16 scales+zeros) with its packing op
- ours        per format and path: `gemv` (split-K GEMV), `gemm` (dequant in registers + tl.dot),
              `dequant_kn` / `dequant_nk` (dequantize into a bf16 workspace, [K, N] or nn.Linear's [N, K],
              then cuBLAS); the row marked `dispatch` is the path QuantLinear takes at that M
- `roofline`  bytes the format must move (weights + params + activations + output) / measured copy bandwidth

Every contender rotates among copies of its weights (> 2.5× L2 in total), and every row is timed the same
way: CUDA-graph replays of a sequence of calls over all copies (median of several replays / calls), so
launch overhead is out of the small-M rows and L2 reuse out of all rows. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from quantkit.eval.report import Column, environment, format_table, write_json

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]
MS = [1, 16, 128, 1024, 4096]
MAIN_FORMAT = ("int", 4, 128)
OTHER_FORMATS = [("int", 3, 128), ("int", 2, 128), ("hlq", 4, 128), ("hlq", 3, 128), ("hlq", 2, 128)]


def copy_bandwidth(dev, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (median of 10)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).normal_()
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times)


def time_rotated(calls: list, target_us: float = 3000.0, replays: int = 7) -> float:
    """µs per call: CUDA graph of rounds over `calls` (one per weight copy), median over replays."""
    for c in calls:  # warm-up: autotuning, compilation, allocator
        c()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for c in calls:
        c()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e6 / len(calls), 1.0)
    rounds = max(1, min(50, int(target_us / (est * len(calls)))))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(rounds):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    del g
    return statistics.median(times) / (rounds * len(calls))


def n_copies(nbytes: int, l2: int) -> int:
    return max(2, min(128, math.ceil(2.5 * l2 / max(nbytes, 1))))


def random_quant(fmt: str, bits: int, gs: int, k: int, n: int, dev) -> dict[str, torch.Tensor]:
    from quantkit.formats.packing import pack_codes

    groups = -(-k // gs)
    codes = torch.randint(0, 1 << bits, (n, groups * gs), device=dev)
    out = {"qweight": pack_codes(codes, bits)}
    del codes
    if fmt == "int":
        out["scales"] = (torch.rand(groups, n, device=dev) * 0.02 + 1e-3).half()
        out["zeros"] = torch.randint(0, 1 << bits, (groups, n), device=dev).to(torch.uint8)
    else:
        out["scales"] = (torch.randn(groups, bits, n, device=dev) * 0.02).half()
        out["offsets"] = (torch.randn(groups, n, device=dev) * 0.02).half()
    return out


def clone_prepared(p):
    q0 = p.q0.clone()
    q1 = q0 if p.q1 is p.q0 else p.q1.clone()
    scales = p.scales.clone()
    zeros = scales if p.zeros is p.scales else p.zeros.clone()
    return replace(p, q0=q0, q1=q1, scales=scales, zeros=zeros)


def prepared_bytes(p) -> int:
    ts = {id(t): t for t in (p.q0, p.q1, p.scales, p.zeros)}
    return sum(t.numel() * t.element_size() for t in ts.values())


def bench_shape(k: int, n: int, ms: list[int], formats: list, l2: int, bw: float, dev, log) -> list[dict]:
    from quantkit.kernels import dispatch

    rows = []

    def add(m, name, us, copies, nbytes, path=None, fmt=None, **extra):
        row = {"K": k, "N": n, "M": m, "contender": name, "path": path, "format": fmt, "us": us,
               "copies": copies, "weight_bytes": nbytes,
               "roofline_us": (nbytes + 2 * m * (k + n)) / bw * 1e6, **extra}
        rows.append(row)
        log(f"  K={k:<6} N={n:<6} M={m:<5} {name:<22} {us:10.2f} us  ({copies} copies)")

    # cuBLAS bf16
    wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02]
    nb = wb[0].numel() * 2
    wb += [torch.randn_like(wb[0]) for _ in range(n_copies(nb, l2) - 1)]
    xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in ms}
    for m in ms:
        add(m, "bf16", time_rotated([lambda w=w, x=xs[m]: x @ w.t() for w in wb]), len(wb), nb)
    # cuBLAS fp8
    try:
        w8 = [(torch.randn(n, k, device=dev) * 0.02).to(torch.float8_e4m3fn)
              for _ in range(n_copies(nb // 2, l2))]
        one = torch.ones((), device=dev)
        for m in ms:
            mp = -(-m // 16) * 16
            x8 = torch.randn(mp, k, device=dev).to(torch.float8_e4m3fn)
            calls = [lambda w=w, x=x8: torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one,
                                                         out_dtype=torch.bfloat16) for w in w8]
            add(m, "fp8", time_rotated(calls), len(w8), nb // 2, padded_m=mp)
        del w8
    except Exception as e:
        log(f"  fp8 unavailable: {e!r}"[:300])
    # tinygemm int4 g128
    try:
        gs = 128
        q = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        except RuntimeError:
            packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
        sz = torch.randn(k // gs, n, 2, device=dev, dtype=torch.bfloat16) * 0.01
        tb = packed.numel() * packed.element_size() + sz.numel() * 2
        tg = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(n_copies(tb, l2) - 1)]
        for m in ms:
            calls = [lambda p=p, s=s, x=xs[m]: torch.ops.aten._weight_int4pack_mm(x, p, gs, s) for p, s in tg]
            add(m, "tinygemm_int4_g128", time_rotated(calls), len(tg), tb)
        del tg
    except Exception as e:
        log(f"  tinygemm unavailable: {e!r}"[:300])
    del wb
    torch.cuda.empty_cache()
    # ours
    for fmt, bits, gs, fms in formats:
        p0 = dispatch.prepare(fmt, bits, gs, k, n, random_quant(fmt, bits, gs, k, n, dev))
        pb = prepared_bytes(p0)
        ps = [p0] + [clone_prepared(p0) for _ in range(n_copies(pb, l2) - 1)]
        name = f"{fmt}{bits}_g{gs}"
        for m in [m for m in ms if m in fms]:
            paths = ["gemv", "gemm"] if m <= 16 else ["gemm", "dequant_kn", "dequant_nk"]
            auto = dispatch.choose_path(p0, m)
            if auto not in paths:
                paths.append(auto)
            for path in paths:
                calls = [lambda p=p, x=xs[m], path=path: dispatch.matmul(p, x, None, path) for p in ps]
                try:
                    us = time_rotated(calls)
                except Exception as e:
                    log(f"  {name} {path} M={m} failed: {e!r}"[:300])
                    continue
                add(m, name, us, len(ps), pb, path=path, fmt=name, dispatch=(path == auto))
        del ps, p0
        torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (K, N, M, format): the fastest path and its ratios vs bf16, tinygemm and the roofline."""
    base = {(r["K"], r["N"], r["M"], r["contender"]): r["us"] for r in rows if r["format"] is None}
    best: dict = {}
    for r in rows:
        if r["format"] is None:
            continue
        key = (r["K"], r["N"], r["M"], r["format"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    out = []
    for (k, n, m, f), r in sorted(best.items()):
        bf = base.get((k, n, m, "bf16"))
        tg = base.get((k, n, m, "tinygemm_int4_g128"))
        f8 = base.get((k, n, m, "fp8"))
        dispatched = [x for x in rows if x.get("dispatch") and (x["K"], x["N"], x["M"], x["format"]) == (k, n, m, f)]
        out.append({"K": k, "N": n, "M": m, "format": f, "best_path": r["path"], "us": r["us"],
                    "dispatch_path": dispatched[0]["path"] if dispatched else None,
                    "dispatch_us": dispatched[0]["us"] if dispatched else None,
                    "bf16_us": bf, "fp8_us": f8, "tinygemm_us": tg, "roofline_us": r["roofline_us"],
                    "vs_bf16": r["us"] / bf if bf else None, "vs_fp8": r["us"] / f8 if f8 else None,
                    "vs_tinygemm": r["us"] / tg if tg else None, "vs_roofline": r["us"] / r["roofline_us"]})
    return out


TABLE_COLUMNS = [
    Column("K", "K", "d"), Column("N", "N", "d"), Column("M", "M", "d"),
    Column("format", "format", "<11", "<"), Column("best_path", "path", "<8", "<"),
    Column("us", "us", ".2f"), Column("bf16_us", "bf16", ".2f"), Column("fp8_us", "fp8", ".2f"),
    Column("tinygemm_us", "tiny", ".2f"), Column("roofline_us", "roof", ".2f"),
    Column("vs_bf16", "/bf16", ".3f"), Column("vs_tinygemm", "/tiny", ".3f"), Column("vs_roofline", "/roof", ".2f"),
]


def table(summary: list[dict]) -> str:
    return format_table(summary, TABLE_COLUMNS)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quantkit bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape (4096×14336), M ∈ {1, 16, 4096}, int4 only")
    ap.add_argument("--out", default="out/bench_kernels.json", help="JSON output path")
    ap.add_argument("--no-others", action="store_true", help="only int4 g128 (skip int3/int2/hlq rows)")
    ap.add_argument("--ms", default=None, help="batch sizes M, comma-separated (default 1,16,128,1024,4096)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA GPU")
    import triton

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth(dev)
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, copy bandwidth "
          f"{bw / 1e12:.2f} TB/s (read + write); torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    shapes = [(4096, 14336)] if args.quick else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else [1, 16, 4096] if args.quick else MS
    rows = []
    out = Path(args.out)
    for k, n in shapes:
        formats = [(*MAIN_FORMAT, ms)]
        if not args.quick and not args.no_others and (k, n) == (4096, 14336):
            formats += [(*f, [m for m in ms if m in (1, 16, 4096)] or ms[-1:]) for f in OTHER_FORMATS]
        rows += bench_shape(k, n, ms, formats, l2, bw, dev, lambda s: print(s, flush=True))
        write_json(out, {"partial": True, "rows": rows})
    summary = summarize(rows)
    print(table(summary), flush=True)
    result = {**environment(), "device": props.name, "sms": props.multi_processor_count, "l2_bytes": l2,
              "copy_bw_Bps": bw, "timing": "CUDA-graph replays, weights rotated over > 2.5x L2", "rows": rows,
              "summary": summary}
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
