"""Focused decode benchmark / config sweep (developer tool, not the protocol benchmark).

    python3 -m quantkit.eval.bench_decode [--out DIR] [--formats int4,int2,hlq4] [--quick]

K=4096, N=14336, g128: correctness of the GEMV (M=1) and small-M GEMM (M=16) against a float64 reference,
then every explicit config in the sweep timed like eval/bench_kernels.py (CUDA-graph replays, weights rotated
over > 2.5x L2), next to cuBLAS bf16 and tinygemm in the same run; registers / spills and a SASS opcode
histogram of the fastest GEMV per format. The autotuner's config lists are chosen from this.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import torch

from quantkit.eval.bench_kernels import (
    clone_prepared,
    n_copies,
    prepared_bytes,
    random_quant,
    time_rotated,
)
from quantkit.kernels import dispatch
from quantkit.kernels.reference import wq_matmul_ref

K, N, GS = 4096, 14336, 128
FORMATS = {"int4": ("int", 4), "int3": ("int", 3), "int2": ("int", 2), "hlq4": ("hlq", 4), "hlq3": ("hlq", 3),
           "hlq2": ("hlq", 2)}
GEMV_SWEEP = [  # BLOCK_N, RUNS, num_warps, maxnreg, split
    (512, 1, 4, None, 64), (1024, 1, 4, None, 64), (512, 1, 2, None, 64), (256, 1, 1, None, 64),
    (1024, 1, 8, None, 64), (128, 1, 1, None, 64), (256, 1, 2, None, 64), (512, 1, 4, None, 32),
]
GEMV_H2_SWEEP = [  # BLOCK_N, num_warps, split, maxnreg (wq_gemv._gemv_h2_kernel)
    (256, 1, 32, None), (256, 1, 32, 128), (256, 1, 32, 96), (256, 1, 32, 80), (256, 1, 48, 96),
    (256, 1, 64, 96), (512, 1, 64, 128), (512, 2, 64, 128), (512, 2, 64, 96), (512, 2, 48, 128),
    (128, 1, 32, 64), (128, 1, 16, 64), (256, 2, 32, 80), (1024, 4, 32, 128),
]
GEMM_SWEEP = [  # BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP, split
    (64, 128, 4, 4, False, 5), (64, 128, 4, 4, False, 8), (32, 128, 4, 4, False, 4), (64, 128, 4, 4, True, 3),
    (64, 128, 4, 3, False, 5), (128, 128, 4, 4, False, 4),
]


def _split(tiles, k_tiles, target, cap=32):
    from quantkit.kernels.triton_common import split_k

    return split_k(tiles, k_tiles, target, cap)


def _sass_hist(ck) -> dict:
    try:
        sass = ck.asm["sass"]
    except Exception as e:
        return {"error": repr(e)[:200]}
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return dict(ops.most_common(18))


def _ptx_hist(ck) -> dict:
    ops = collections.Counter()
    for line in ck.asm["ptx"].splitlines():
        m = re.match(r"\s*(?:@%p\d+\s+)?([a-z][a-z0-9_.]+)\s", line)
        if m and not line.strip().startswith("."):
            ops[m.group(1)] += 1
    return dict(ops.most_common(16))


def profile(dev):
    """One launch each of the decode kernels (for ncu): the half2 int4 GEMV at M=1 (its winning config), the
    fp32 int4 / hlq4 GEMVs at M=1 and the int4 GEMM at M=16."""
    x1 = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    x16 = torch.randn(16, K, device=dev, dtype=torch.bfloat16)
    p = dispatch.prepare("int", 4, GS, K, N, random_quant("int", 4, GS, K, N, dev))
    h2 = {"BLOCK_N": 256, "SPLIT_K": 32, "num_warps": 1, "num_stages": 1, "maxnreg": 128}
    dispatch.gemv_h2(p, x1, None, h2)
    for fmt, bits in (("int", 4), ("hlq", 4)):
        p = dispatch.prepare(fmt, bits, GS, K, N, random_quant(fmt, bits, GS, K, N, dev))
        dispatch.gemv(p, x1, None, {"BLOCK_N": 512, "RUNS": 1, "SPLIT_K": 64, "num_warps": 4, "num_stages": 1})
        if bits == 4 and fmt == "int":
            dispatch.gemm(p, x16, None, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8,
                                          "num_warps": 4, "num_stages": 4})
    torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench_decode")
    ap.add_argument("--formats", default="int4,int2,hlq4,int3,hlq3,hlq2")
    ap.add_argument("--gemv-sweep", default="all", help="'all' or comma list of sweep indices")
    ap.add_argument("--gemm-formats", default="int4,hlq4,int2")
    ap.add_argument("--kernels", default="h2,f32", help="GEMV kernels to sweep: h2 (wq_gemv), f32 (wq_gemm)")
    ap.add_argument("--profile", action="store_true", help="one launch of each decode kernel (run under ncu)")
    args = ap.parse_args(argv)
    import triton

    if args.profile:
        profile(torch.device("cuda"))
        return 0

    from quantkit.kernels import wq_gemm
    from quantkit.kernels.triton_common import set_sms

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    set_sms(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"{props.name} {sms} SMs L2 {l2 >> 20} MiB torch {torch.__version__} triton {triton.__version__}",
          flush=True)
    res = {"device": props.name, "gemv": [], "gemm": [], "base": {}}
    torch.manual_seed(0)
    xs = {m: torch.randn(m, K, device=dev, dtype=torch.bfloat16) for m in (1, 16)}
    # baselines
    wb = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02]
    wb += [torch.randn_like(wb[0]) for _ in range(n_copies(wb[0].numel() * 2, l2) - 1)]
    for m in (1, 16):
        res["base"][f"bf16_M{m}"] = time_rotated([lambda w=w, x=xs[m]: x @ w.t() for w in wb])
    del wb
    q = torch.randint(0, 16, (N, K), device=dev, dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    except RuntimeError:
        packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
    sz = torch.randn(K // 128, N, 2, device=dev, dtype=torch.bfloat16) * 0.01
    tb = packed.numel() * packed.element_size() + sz.numel() * 2
    tg = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(n_copies(tb, l2) - 1)]
    for m in (1, 16):
        res["base"][f"tinygemm_M{m}"] = time_rotated(
            [lambda p=p, s=s, x=xs[m]: torch.ops.aten._weight_int4pack_mm(x, p, 128, s) for p, s in tg])
    del tg, q, packed
    torch.cuda.empty_cache()
    print({k: round(v, 2) for k, v in res["base"].items()}, flush=True)
    sweep = GEMV_SWEEP if args.gemv_sweep == "all" else [GEMV_SWEEP[int(i)] for i in args.gemv_sweep.split(",")]
    for name in args.formats.split(","):
        fmt, bits = FORMATS[name]
        raw = random_quant(fmt, bits, GS, K, N, dev)
        p0 = dispatch.prepare(fmt, bits, GS, K, N, raw)
        ps = [p0] + [clone_prepared(p0) for _ in range(n_copies(prepared_bytes(p0), l2) - 1)]
        ref = {m: wq_matmul_ref(xs[m], fmt, bits, GS, K, raw["qweight"], raw["scales"], raw.get("zeros"),
                                raw.get("offsets"), dtype=torch.float64) for m in (1, 16)}

        def _raw_args(_p, raw=raw):
            return raw["qweight"], raw["scales"], raw.get("zeros"), raw.get("offsets")
        best = None
        for bn, nw, split, nreg in (GEMV_H2_SWEEP if "h2" in args.kernels else []):
            cfg = {"BLOCK_N": bn, "SPLIT_K": split, "num_warps": nw, "num_stages": 1}
            if nreg:
                cfg["maxnreg"] = nreg
            try:
                y = dispatch.gemv_h2(ps[0], xs[1], None, cfg)
                err = ((y.double() - ref[1]).norm() / ref[1].norm()).item()
                us = time_rotated([lambda p=p, c=cfg: dispatch.gemv_h2(p, xs[1], None, c) for p in ps])
            except Exception as e:
                print(f"{name} gemv_h2 {cfg} FAILED {e!r}"[:600], flush=True)
                continue
            res["gemv"].append({"format": name, "kernel": "h2", **cfg, "us": us, "err": err})
            print(f"{name:5} h2   M=1  BN={bn:<4} w={nw} split={split:<3} nreg={nreg} {us:8.2f} us  err {err:.1e}",
                  flush=True)
        if "h2" in args.kernels:  # the autotuned choice next to a fixed config
            us = time_rotated([lambda p=p: dispatch.gemv_h2(p, xs[1], None) for p in ps])
            res["gemv"].append({"format": name, "kernel": "h2", "auto": True, "us": us})
            cfg = {"BLOCK_N": 256, "SPLIT_K": 32, "num_warps": 1, "num_stages": 1}
            um = time_rotated([lambda p=p, c=cfg: dispatch.gemv_h2(p, xs[1], None, c) for p in ps])
            res["gemv"].append({"format": name, "kernel": "h2", **cfg, "us": um})
            print(f"{name} h2 autotuned {us:.2f} us; 256/1/32 {um:.2f} us", flush=True)
            for m in (2, 4, 8, 16):  # the half2 GEMV at a few more rows
                xm = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
                rm = wq_matmul_ref(xm, fmt, bits, GS, K, *_raw_args(p0), dtype=torch.float64)
                cfg = {"BLOCK_N": 512, "SPLIT_K": 16 if m < 8 else 8, "num_warps": 1, "num_stages": 1}
                y = dispatch.gemv_h2(ps[0], xm, None, cfg)
                err = ((y.double() - rm).norm() / rm.norm()).item()
                us = time_rotated([lambda p=p, x=xm, c=cfg: dispatch.gemv_h2(p, x, None, c) for p in ps])
                res["gemv"].append({"format": name, "kernel": "h2", "M": m, **cfg, "us": us, "err": err})
                print(f"{name} h2 M={m} {cfg} {us:.2f} us err {err:.1e}", flush=True)
        for bn, runs, nw, nreg, split in (sweep if "f32" in args.kernels else []):
            cfg = {"BLOCK_N": bn, "RUNS": runs, "SPLIT_K": split, "num_warps": nw, "num_stages": 1}
            if nreg:
                cfg["maxnreg"] = nreg
            try:
                y = dispatch.gemv(ps[0], xs[1], None, cfg)
                err = ((y.double() - ref[1]).norm() / ref[1].norm()).item()
                us = time_rotated([lambda p=p, c=cfg: dispatch.gemv(p, xs[1], None, c) for p in ps])
            except Exception as e:
                print(f"{name} gemv {cfg} FAILED {e!r}"[:400], flush=True)
                continue
            row = {"format": name, **cfg, "us": us, "err": err}
            res["gemv"].append(row)
            print(f"{name:5} gemv M=1  BN={bn:<4} R={runs} w={nw} nreg={nreg} split={split:<3} {us:8.2f} us  "
                  f"err {err:.1e}", flush=True)
            if best is None or us < best["us"]:
                best = row
        if best is not None:  # registers, spills, SASS of the fastest config
            cfg = {k: best[k] for k in ("BLOCK_N", "RUNS", "SPLIT_K", "num_warps", "num_stages", "maxnreg")
                   if k in best}
            out = torch.empty(1, N, dtype=torch.bfloat16, device=dev)
            a = dispatch.launch_args(ps[0], xs[1], out, None)
            ck = wq_gemm._gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"], 1)](
                *a, **dispatch.launch_consts(ps[0], None), **cfg)
            best["regs"], best["spills"] = getattr(ck, "n_regs", None), getattr(ck, "n_spills", None)
            best["sass_ops"] = _sass_hist(ck)
            best["ptx_ops"] = _ptx_hist(ck)
            os.makedirs(args.out, exist_ok=True)
            for kind in ("ptx", "sass"):
                try:
                    with open(os.path.join(args.out, f"gemv_{name}.{kind}"), "w") as f:
                        f.write(ck.asm[kind])
                except Exception:
                    pass
            print(f"{name} ptx {best['ptx_ops']}", flush=True)
            for m in (2, 4, 8):  # the GEMV at a few more rows (decides GEMV_MAX_M)
                xm = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
                c2 = dict(cfg, SPLIT_K=_split(triton.cdiv(N, cfg["BLOCK_N"]) * m, triton.cdiv(K, 32 * cfg["RUNS"]),
                                              16 * sms, 64))
                us = time_rotated([lambda p=p, x=xm, c=c2: dispatch.gemv(p, x, None, c) for p in ps])
                res["gemv"].append({"format": name, "M": m, **c2, "us": us})
                print(f"{name} gemv M={m} {c2} {us:.2f} us", flush=True)
            print(f"{name} best gemv {best['us']:.2f} us regs {best['regs']} spills {best['spills']} "
                  f"sass {best['sass_ops']}", flush=True)
        if name in args.gemm_formats.split(","):
            for bn, bk, nw, ns, swap, split in GEMM_SWEEP:
                cfg = {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": nw,
                       "num_stages": ns, "SWAP": swap}
                try:
                    y = dispatch.gemm(ps[0], xs[16], None, cfg)
                    err = ((y.double() - ref[16]).norm() / ref[16].norm()).item()
                    us = time_rotated([lambda p=p, c=cfg: dispatch.gemm(p, xs[16], None, c) for p in ps])
                except Exception as e:
                    print(f"{name} gemm {cfg} FAILED {e!r}"[:400], flush=True)
                    continue
                res["gemm"].append({"format": name, **cfg, "us": us, "err": err})
                if bn == 64 and bk == 128 and ns == 4 and not swap and split == 5:
                    for m in (2, 4, 8):
                        xm = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
                        um = time_rotated([lambda p=p, x=xm, c=cfg: dispatch.gemm(p, x, None, c) for p in ps])
                        res["gemm"].append({"format": name, "M": m, **cfg, "us": um})
                        print(f"{name} gemm M={m} {um:.2f} us", flush=True)
                print(f"{name:5} gemm M=16 BN={bn:<4} BK={bk:<3} w={nw} s={ns} swap={swap:d} split={split:<3} "
                      f"{us:8.2f} us  err {err:.1e}", flush=True)
        del ps, p0
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("== summary (us) ==", {k: round(v, 2) for k, v in res["base"].items()})
    for kind in ("gemv", "gemm"):
        byf = {}
        for r in res[kind]:
            if r["format"] not in byf or r["us"] < byf[r["format"]]["us"]:
                byf[r["format"]] = r
        for f, r in byf.items():
            print(kind, f, round(r["us"], 2), {k: v for k, v in r.items() if k not in ("format", "us", "sass_ops")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
