"""Probe of the large-M int8 prefill GEMM (kernels/int8_prefill.py): modes × tile configs at M = 4096, K = 4096,
N = 14336, next to cuBLAS bf16, torch._int_mm and the current `int8_gemm` kernel, in one process.

    python experiments/probe_int8_prefill.py [--json PATH] [--m 4096] [--tma]

Timing: quantkit.eval.bench_kernels.time_rotated (CUDA-graph replays over rotated weight copies). Checks every mode-1/2
result against the float64 reference at M = 256 first.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> dict:
    from quantkit.eval.bench_int8_gemm import _w4, _w6, comet_bits
    from quantkit.eval.bench_kernels import time_rotated
    from quantkit.kernels import int8_gemm as kg
    from quantkit.kernels import int8_prefill as kp
    from quantkit.kernels import int8_reference as ref

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--sweep-ms", default="128,256,512,1024,4096")
    ap.add_argument("--tma", action="store_true",
                    help="only the TMA GEMM's configs next to the pointer GEMM (bit-identity checks, M sweep)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    m, k, n = args.m, args.k, args.n
    rows = []

    def add(name, us, **extra):
        tops = 2 * m * k * n / us / 1e6
        rows.append({"name": name, "us": us, "tops": tops, **extra})
        print(f"{name:<44} {us:9.1f} us  {tops:7.1f} TOPS", flush=True)

    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(2)]
    add("bf16 cuBLAS", time_rotated([lambda w=w: x @ w.t() for w in wb]))
    wi = [torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(2)]
    xi = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
    add("torch._int_mm", time_rotated([lambda w=w: torch._int_mm(xi, w.t()) for w in wi]))

    w6, w4 = _w6(k, n, dev), _w4(k, n, dev)
    bits = comet_bits(k, dev)
    qa, s, qs = kg.quantize_act(x, 8)
    qa4, s4, _ = kg.quantize_act(x, bits)
    add("int8_gemm w6a8 (current)", time_rotated([lambda: kg.lowbit_gemm(qa, s, qs, w6)]))
    wt6 = kp.unpack_weight(w6)
    wt4 = kp.unpack_weight(w4)
    add("unpack w6 -> int8", time_rotated([lambda: kp.unpack_weight(w6, wt6)]))
    add("unpack w4 -> int8", time_rotated([lambda: kp.unpack_weight(w4, wt4)]))

    # correctness at M = 256 (rows of the same activations)
    checks = {}
    for name, w, wt, a, sc in (("w6", w6, wt6, qa, s), ("w4", w4, wt4, qa4, s4)):
        yr = ref.lowbit_gemm_ref(a[:256], sc[:256], w)
        for mode in (1, 2):
            y = kp.prefill_gemm(a[:256], sc[:256], wt, w, mode=mode)
            err = ((y.double() - yr).norm() / yr.norm()).item()
            rnd = ((yr.to(torch.bfloat16).double() - yr).norm() / yr.norm()).item()
            checks[f"{name}_mode{mode}"] = {"rel_err": err, "bf16_rounding": rnd, "ok": err < 2 * rnd + 1e-4}
    print("checks:", json.dumps(checks), flush=True)

    ws6 = w6.scales.float()
    ws4 = w4.scales.float()
    if args.tma:
        return _probe_tma(args, add, rows, checks, qa, s, qa4, s4, w6, w4, wt6, wt4, ws6, ws4, x, wb, bits)
    for mode, configs in ((0, [(128, 128, 8, 3), (128, 128, 16, 3)]),
                          (1, [(64, 128, 4, 3), (64, 128, 8, 3), (64, 128, 8, 4), (128, 128, 16, 3),
                               (128, 128, 16, 4), (128, 64, 8, 3), (64, 256, 16, 3), (128, 256, 16, 3)])):
        for bm, bn, nw, ns in configs:
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
            try:
                us = time_rotated([lambda cfg=cfg, mode=mode: kp.prefill_gemm(qa, s, wt6, w6, config=cfg, mode=mode, w_scale=ws6)])
            except Exception as e:  # out of shared memory / registers: record and go on
                print(f"mode {mode} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            add(f"prefill w6 mode{mode} {bm}x{bn} w{nw} s{ns}", us, mode=mode, **cfg)
    best = min((r for r in rows if r.get("mode") == 1), key=lambda r: r["us"])
    cfg = {key: best[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    print("best", cfg, flush=True)
    for mm in [int(v) for v in args.sweep_ms.split(",")]:
        xm = x[:mm]
        add(f"M={mm} bf16", time_rotated([lambda w=w, xm=xm: xm @ w.t() for w in wb]), m_rows=mm)
        add(f"M={mm} current w6a8 linear", time_rotated([lambda xm=xm: kg.lowbit_linear(xm, w6, 8)]), m_rows=mm)
        add(f"M={mm} prefill w6a8 linear (quant+unpack+gemm)", time_rotated(
            [lambda xm=xm: kp.prefill_gemm(*kg.quantize_act(xm, 8)[:2], kp.unpack_weight(w6, wt6), w6, config=cfg,
                                     w_scale=ws6)]), m_rows=mm)
        add(f"M={mm} current comet linear", time_rotated([lambda xm=xm: kg.lowbit_linear(xm, w4, bits)]), m_rows=mm)
        add(f"M={mm} prefill comet linear", time_rotated(
            [lambda xm=xm: kp.prefill_gemm(*kg.quantize_act(xm, bits)[:2], kp.unpack_weight(w4, wt4), w4, config=cfg,
                                     w_scale=ws4)]), m_rows=mm)
    return _finish(args, rows, checks)


def _finish(args, rows, checks) -> dict:
    import triton

    out = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "m": args.m, "k": args.k,
           "n": args.n, "rows": rows, "checks": checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _probe_tma(args, add, rows, checks, qa, s, qa4, s4, w6, w4, wt6, wt4, ws6, ws4, x, wb, bits) -> dict:
    from quantkit.eval.bench_kernels import time_rotated
    from quantkit.kernels import int8_gemm as kg
    from quantkit.kernels import int8_prefill as kp

    for name, w, wt, a, sc in (("w6", w6, wt6, qa, s), ("w4", w4, wt4, qa4, s4)):
        for mm in (77, 256, 1000, 4096):  # the same blocks in the same order: bit-identical expected
            y0 = kp.prefill_gemm(a[:mm], sc[:mm], wt, w, config={"BLOCK_M": 64, "BLOCK_N": 128}, tma=False)
            for cfg in ({"BLOCK_M": 64, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}):
                y1 = kp.prefill_gemm(a[:mm], sc[:mm], wt, w, config=cfg, tma=True)
                checks[f"tma_{name}_m{mm}_{cfg['BLOCK_M']}x{cfg['BLOCK_N']}"] = bool(torch.equal(y0, y1))
    print("tma checks (bit-identical to the pointer GEMM):", json.dumps(checks), flush=True)
    add("pointer GEMM w6, autotuned", time_rotated([lambda: kp.prefill_gemm(qa, s, wt6, w6, w_scale=ws6,
                                                                            tma=False)]))
    add("TMA GEMM w6, autotuned", time_rotated([lambda: kp.prefill_gemm(qa, s, wt6, w6, w_scale=ws6, tma=True)]))
    for bm, bn, nw, ns in ((64, 128, 4, 3), (64, 128, 4, 2), (64, 128, 4, 4), (64, 64, 4, 3), (64, 64, 4, 2),
                           (64, 256, 8, 3), (64, 256, 8, 2), (128, 128, 8, 3), (128, 64, 4, 4)):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
        try:
            us = time_rotated([lambda cfg=cfg: kp.prefill_gemm(qa, s, wt6, w6, config=cfg, w_scale=ws6, tma=True)])
        except Exception as e:  # out of shared memory / registers: record and go on
            print(f"tma {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        add(f"TMA GEMM w6 {bm}x{bn} w{nw} s{ns}", us, tma=True, **cfg)
    for tma in (False, True):  # the ceiling without the per-block promotion (wrong results, timing only)
        for bm, bn, nw in ((64, 128, 4), (128, 128, 8), (128, 256, 8)):
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw}
            add(f"{'TMA' if tma else 'pointer'} GEMM mode 0 (no promotion) {bm}x{bn} w{nw} s3", time_rotated(
                [lambda tma=tma, cfg=cfg: kp.prefill_gemm(qa, s, wt6, w6, w_scale=ws6, mode=0, tma=tma,
                                                          config=cfg)]))
    add("TMA GEMM w4 (COMET weights), autotuned", time_rotated(
        [lambda: kp.prefill_gemm(qa4, s4, wt4, w4, w_scale=ws4, tma=True)]))
    for mm in [int(v) for v in args.sweep_ms.split(",")]:
        xm = x[:mm]
        add(f"M={mm} bf16", time_rotated([lambda w=w, xm=xm: xm @ w.t() for w in wb]), m_rows=mm)
        add(f"M={mm} w6a8 linear (int8_gemm.lowbit_linear)", time_rotated(
            [lambda xm=xm: kg.lowbit_linear(xm, w6, 8)]), m_rows=mm)
        add(f"M={mm} comet linear (int8_gemm.lowbit_linear)", time_rotated(
            [lambda xm=xm: kg.lowbit_linear(xm, w4, bits)]), m_rows=mm)
    return _finish(args, rows, checks)


if __name__ == "__main__":
    main()
