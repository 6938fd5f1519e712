"""Benchmark of the int8-tensor-core W{4,6}A{4,6,8} kernels (kernels/int8_gemm.py), the kernel protocol of docs/performance.md.

    python -m quantkit.eval.bench_int8_gemm [--json PATH] [--shapes 4096x14336,...] [--ms 1,16,...]

For Llama-3-8B linear shapes (K, N) and batch sizes M it times, in one process, side by side:
- `bf16`         cuBLAS `x @ w.t()` (w [N, K] bf16): the baseline of every ratio
- `int8_mm`      `torch._int_mm` (int8 × int8 → int32, no scales; M padded to ≥ 32 as it requires)
- `w6a8_linear`  FlexQ's full linear: activation quantization kernel (A8, per token × 128) + W6 g128 GEMM
- `w6a8_gemm`    the W6A8 GEMM alone (activations quantized beforehand)
- `w6a8_token`   the per-token form: INT6 per-channel weights, A8 with one scale per token (activation kernel +
                 GEMM); its prefill GEMM accumulates in int32 with no per-block rescaling
- `w6a8_token_gemm` that GEMM alone
- `comet_linear` COMET-style full linear: INT4 asymmetric g128 weights, activations 4-bit with 20% of the
                 128-channel blocks 8-bit, channel permutation gathered in the activation kernel
- `w4_gemm`      the W4 GEMM alone
- `act_quant`    the activation kernels alone (A8; and COMET's mixed bits + perm)
- `roofline`     bytes a contender must move (weights + scales + activations + output) / copy bandwidth

Every contender rotates among copies of its weights (> 2.5× L2 in total) and is timed the same way as
eval/bench_kernels.py: CUDA-graph replays of a sequence of calls over all copies, so launch overhead is out of
the small-M rows and L2 reuse out of all rows. Before timing, each shape's kernels are checked against the
torch reference at M = 16 and M = 256. Prints a table (µs and ratios vs bf16) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]
MS = [1, 16, 128, 1024, 4096]
COMET_INT8_FRACTION = 0.2


def _copies(nbytes: int, l2: int) -> int:
    return max(2, min(64, math.ceil(2.5 * l2 / max(nbytes, 1))))


def _w6(k: int, n: int, dev, group_size: int | None = 128) -> object:
    from quantkit.formats.int6 import pack_int6
    from quantkit.kernels.int8_reference import LowbitWeight

    g = -(-k // group_size) if group_size else 1
    qw = pack_int6(torch.randint(1, 64, (n, k), device=dev))
    return LowbitWeight(6, k, n, qw, (torch.rand(g, n, device=dev) * 0.002 + 1e-4).half(), None, group_size)


def _w4(k: int, n: int, dev) -> object:
    from quantkit.kernels.int8_reference import LowbitWeight, pack_nibble_planes

    g = -(-k // 128)
    qw = pack_nibble_planes(torch.randint(0, 16, (n, k), device=dev))
    zeros = torch.randint(0, 16, (g, n), device=dev).to(torch.uint8)
    return LowbitWeight(4, k, n, qw, (torch.rand(g, n, device=dev) * 0.004 + 1e-4).half(), zeros, 128)


def _clone(w):
    from dataclasses import replace

    return replace(w, qweight=w.qweight.clone(), scales=w.scales.clone(),
                   zeros=None if w.zeros is None else w.zeros.clone())


def _nbytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros) if t is not None)


def comet_bits(k: int, dev) -> torch.Tensor:
    """Per 128-channel block activation bits: 8 for every 5th block (20%), else 4."""
    g = -(-k // 128)
    b = torch.full((g,), 4, dtype=torch.int32, device=dev)
    b[:: round(1 / COMET_INT8_FRACTION)] = 8
    return b


def check_shape(k: int, n: int, w6, w4, bits, perm, dev, w6t=None) -> dict:
    """Relative error of the full linears vs the float64 torch reference, and vs bf16 output rounding."""
    from quantkit.formats.act_int import fake_quant_act_int
    from quantkit.kernels import int8_gemm as kg
    from quantkit.kernels import int8_reference as ref

    out = {}
    cases = [("w6a8", w6, 8, None), ("comet", w4, bits, perm)] + ([("w6a8_token", w6t, 8, "token")] if w6t else [])
    for m in (16, 256):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        for name, w, ab, p in cases:
            if p == "token":
                y = kg.lowbit_linear(x, w, ab, per_token=True)
                y_ref = fake_quant_act_int(x.double(), ab, k) @ ref.dequantize(w).double().t()
            else:
                y = kg.lowbit_linear(x, w, ab, p)
                y_ref = ref.lowbit_linear_ref(x, w, ab, p, dtype=torch.float64)
            rnd = ((y_ref.to(torch.bfloat16).double() - y_ref).norm() / y_ref.norm()).item()
            err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
            out[f"{name}_M{m}"] = {"rel_err": err, "bf16_rounding": rnd, "ok": err < 2 * rnd + 1e-4}
            del y, y_ref
    return out


def bench_shape(k: int, n: int, ms: list[int], l2: int, bw: float, dev, log) -> tuple[list[dict], dict]:
    from quantkit.eval.bench_kernels import time_rotated
    from quantkit.kernels import int8_gemm as kg

    rows = []

    def add(m, name, us, copies, wbytes, abytes):
        roof = (wbytes + abytes + 2 * m * n) / bw * 1e6
        rows.append({"K": k, "N": n, "M": m, "contender": name, "us": us, "copies": copies,
                     "weight_bytes": wbytes, "roofline_us": roof})
        log(f"  K={k:<6} N={n:<6} M={m:<5} {name:<14} {us:10.2f} us  roof {roof:8.2f}  ({copies} copies)")

    perm = torch.randperm(k, device=dev).to(torch.int32)
    bits = comet_bits(k, dev)
    w6 = [_w6(k, n, dev)]
    w6t = [_w6(k, n, dev, None)]
    w4 = [_w4(k, n, dev)]
    checks = check_shape(k, n, w6[0], w4[0], bits, perm, dev, w6t[0])
    log(f"  check K={k} N={n}: " + ", ".join(f"{a}: {b['rel_err']:.2e} (bf16 {b['bf16_rounding']:.2e})"
                                                for a, b in checks.items()))
    b6, b4 = _nbytes(w6[0]), _nbytes(w4[0])
    w6 += [_clone(w6[0]) for _ in range(_copies(b6, l2) - 1)]
    b6t = _nbytes(w6t[0])
    w6t += [_clone(w6t[0]) for _ in range(_copies(b6t, l2) - 1)]
    w4 += [_clone(w4[0]) for _ in range(_copies(b4, l2) - 1)]
    wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02]
    bb = wb[0].numel() * 2
    wb += [torch.randn_like(wb[0]) for _ in range(_copies(bb, l2) - 1)]
    wi = [torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(_copies(bb // 2, l2))]
    def one_m(m: int) -> None:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ab = 2 * m * k  # bf16 activations in
        add(m, "bf16", time_rotated([lambda w=w: x @ w.t() for w in wb]), len(wb), bb, ab)
        mp = max(m, 32)
        xi = torch.randint(-127, 128, (mp, k), device=dev, dtype=torch.int8)
        add(m, "int8_mm", time_rotated([lambda w=w: torch._int_mm(xi, w.t()) for w in wi]), len(wi), bb // 2,
            mp * k)
        add(m, "w6a8_linear", time_rotated([lambda w=w: kg.lowbit_linear(x, w, 8) for w in w6]), len(w6), b6,
            ab + 2 * m * k)
        qa, s, qs = kg.quantize_act(x, 8)
        add(m, "w6a8_gemm", time_rotated([lambda w=w: kg.lowbit_gemm(qa, s, qs, w) for w in w6]), len(w6), b6,
            m * k)
        add(m, "w6a8_token", time_rotated([lambda w=w: kg.lowbit_linear(x, w, 8, per_token=True) for w in w6t]),
            len(w6t), b6t, ab + 2 * m * k)
        qat, st, qst = kg.quantize_act(x, 8, per_token=True)
        add(m, "w6a8_token_gemm", time_rotated([lambda w=w: kg.lowbit_gemm(qat, st, qst, w, per_token=True)
                                                for w in w6t]), len(w6t), b6t, m * k)
        add(m, "comet_linear", time_rotated([lambda w=w: kg.lowbit_linear(x, w, bits, perm) for w in w4]),
            len(w4), b4, ab + 2 * m * k)
        qa4, s4, qs4 = kg.quantize_act(x, bits, perm)
        add(m, "w4_gemm", time_rotated([lambda w=w: kg.lowbit_gemm(qa4, s4, qs4, w) for w in w4]), len(w4), b4,
            m * k)
        add(m, "act_quant_a8", time_rotated([lambda: kg.quantize_act(x, 8)]), 1, 0, 3 * m * k)
        add(m, "act_quant_comet", time_rotated([lambda: kg.quantize_act(x, bits, perm)]), 1, 0, 3 * m * k)

    for m in ms:
        one_m(m)
    torch.cuda.empty_cache()
    return rows, checks


def tuned_configs() -> dict:
    """The autotuner's choice per key, for the record."""
    from quantkit.kernels import int8_gemm as kg

    out = {}
    for name, fn in (("gemv", kg.gemv_tuned), ("small", kg.gemm_small_tuned), ("large", kg.gemm_large_tuned)):
        out[name] = {str(key): str(cfg) for key, cfg in fn.cache.items()}
    return out


def ptx_summary() -> list[dict]:
    """Per compiled `_gemm_kernel` in Triton's cache: warps, stages, shared memory and instruction counts
    (wgmma = Hopper tensor cores, mma.sync = the older path, cvt.rn.f32.s32 = slow int→float conversions)."""
    import glob

    base = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    out = []
    for ptx in sorted(glob.glob(os.path.join(base, "*", "_gemm_kernel.ptx"))):
        text = Path(ptx).read_text()
        meta_path = ptx[:-4] + ".json"
        meta = json.loads(Path(meta_path).read_text()) if os.path.exists(meta_path) else {}
        out.append({"file": os.path.basename(os.path.dirname(ptx)), "num_warps": meta.get("num_warps"),
                    "num_stages": meta.get("num_stages"), "shared": meta.get("shared"),
                    **{name: text.count(ins) for name, ins in (("wgmma", "wgmma.mma_async"), ("mma_sync", "mma.sync"),
                                                               ("cvt_f32_s32", "cvt.rn.f32.s32"),
                                                               ("cp_async", "cp.async"))}})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    base = {(r["K"], r["N"], r["M"]): r["us"] for r in rows if r["contender"] == "bf16"}
    out = []
    for r in rows:
        bf = base.get((r["K"], r["N"], r["M"]))
        out.append({**r, "bf16_us": bf, "vs_bf16": r["us"] / bf if bf else None,
                    "vs_roofline": r["us"] / r["roofline_us"] if r["roofline_us"] else None})
    return out


CONTENDERS = ["bf16", "int8_mm", "w6a8_linear", "w6a8_gemm", "w6a8_token", "w6a8_token_gemm", "comet_linear",
              "w4_gemm", "act_quant_a8", "act_quant_comet"]
OURS = ("int8_mm", "w6a8_linear", "w6a8_gemm", "w6a8_token", "w6a8_token_gemm", "comet_linear", "w4_gemm")


def table(summary: list[dict]) -> str:
    """One line per (K, N, M): µs of each contender, then ratios vs bf16 of the four ours."""
    by = {}
    for r in summary:
        by.setdefault((r["K"], r["N"], r["M"]), {})[r["contender"]] = r
    short = {"bf16": "bf16", "int8_mm": "int8mm", "w6a8_linear": "w6a8", "w6a8_gemm": "w6gemm",
             "w6a8_token": "w6a8tok", "w6a8_token_gemm": "w6tokg", "comet_linear": "comet", "w4_gemm": "w4gemm",
             "act_quant_a8": "actq8", "act_quant_comet": "actqC"}
    head = f"{'K':>6} {'N':>6} {'M':>5} " + " ".join(f"{short[c]:>8}" for c in CONTENDERS) + \
        "  " + " ".join(f"{'/' + short[c]:>8}" for c in OURS)
    lines = [head, "-" * len(head)]
    for (k, n, m), d in sorted(by.items()):
        us = " ".join(f"{d[c]['us']:8.2f}" if c in d else f"{'-':>8}" for c in CONTENDERS)
        rat = " ".join(f"{d[c]['vs_bf16']:8.3f}" if c in d and d[c]["vs_bf16"] else f"{'-':>8}" for c in OURS)
        lines.append(f"{k:>6} {n:>6} {m:>5} {us}  {rat}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m quantkit.eval.bench_int8_gemm", description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="out/bench_int8_gemm.json", help="JSON output path")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,KxN,...")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="batch sizes M, comma-separated")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_int8_gemm needs a CUDA GPU")
    import triton

    from quantkit.eval.bench_kernels import copy_bandwidth

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth(dev)
    info = (f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, copy bandwidth "
            f"{bw / 1e12:.2f} TB/s (read + write); torch {torch.__version__}, triton {triton.__version__}")
    print(info, flush=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    rows, checks = [], {}
    for k, n in shapes:
        r, c = bench_shape(k, n, ms, l2, bw, dev, lambda s: print(s, flush=True))
        rows += r
        checks[f"{k}x{n}"] = c
    summary = summarize(rows)
    print(table(summary), flush=True)
    result = {"device": info, "protocol": "CUDA-graph replays over rotated weight copies (> 2.5x L2), median",
              "comet_int8_fraction": COMET_INT8_FRACTION, "checks": checks, "rows": summary,
              "configs": tuned_configs(), "ptx": ptx_summary()}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main()
