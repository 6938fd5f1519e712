"""Compile a Triton kernel for sm_90 on a machine without a GPU and summarize what it became, to study a kernel
without device time: wgmma count and waits (`pendings`), layout conversions, shared-memory allocations, async
copies (pipelined loads), shared memory, registers and spills (ptxas -v).

Use the GPU machine's triton version for faithful output (it is not the CPU test venv's), e.g.

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 numpy
    /tmp/t36/bin/python experiments/device/compile_offline.py --site /path/to/venv/site-packages

The site directory (a venv with torch and this repository installed) is appended after triton's own, so the
side venv's triton wins. Pointers and the integer arguments named in DIV16 are marked divisible by 16, as
Triton's launcher specializes them at run time (without that, loads are not vectorized and not pipelined).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import site
import subprocess
import sys
import tempfile

DIV16 = ("N", "K", "stride_xm", "stride_om", "R0", "R1")


def compile_kernel(fn, sig: dict, consts: dict, num_warps: int, num_stages: int, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    s = dict(sig)
    names = list(fn.arg_names)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*") or k in DIV16}
    for k in consts:
        s[k] = "constexpr"
    src = ASTSource(fn=fn, signature=s, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def summary(ck) -> dict:
    import triton

    tg, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    d = {"wgmma": len(re.findall(r"warp_group_dot ", tg)),
         "wgmma_wait_pendings": re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", tg),
         "convert_layout": len(re.findall(r"ttg.convert_layout", tg)),
         "local_alloc": len(re.findall(r"ttg.local_alloc", tg)),
         "async_copy": len(re.findall(r"async_copy_global_to_local", tg)),
         "sync_loads_in_loop": len(re.findall(r"= tt.load", tg.split("scf.for", 1)[-1])),
         "shared_bytes": ck.metadata.shared}
    with tempfile.TemporaryDirectory() as t:
        p = os.path.join(t, "k.ptx")
        open(p, "w").write(ptx)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        r = subprocess.run([ptxas, "-v", "-arch=sm_90a", p, "-o", os.path.join(t, "k.cubin")],
                           capture_output=True, text=True)
    m = re.search(r"Used (\d+) registers", r.stderr)
    sp = re.search(r"(\d+) bytes spill stores", r.stderr)
    d["registers"] = int(m.group(1)) if m else None
    d["spill_bytes"] = int(sp.group(1)) if sp else None
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", required=True, help="site-packages with torch and quantkit installed")
    ap.add_argument("--ttgir", default=None, help="also write each kernel's TTGIR into this folder")
    args = ap.parse_args()
    site.addsitedir(args.site)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton

    import prefill_variants as V
    from quantkit.kernels import wq_gemm

    print("triton", triton.__version__)
    wq = {"x_ptr": "*bf16", "q0_ptr": "*i32", "q1_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "bias_ptr": "*bf16",
          "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "R0": "i32",
          "R1": "i32", "stride_xm": "i32", "stride_om": "i32", "M_BUCKET": "i32", "ONE": "i32"}
    var = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*bf16", "M": "i32",
           "N": "i32", "K": "i32", "stride_xm": "i32", "MAGIC_ARG": "i32", "ONE_ARG": "i32"}
    base = dict(GS=128, FMT=0, BITS=4, HAS_ZERO=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    cases = [("wq_gemm._gemm_kernel", wq_gemm._gemm_kernel, wq, {**base, "HAS_BIAS": False, "SPLIT_K": 1, "SWAP": False}),
             ("wq_gemm._gemm_kernel SWAP", wq_gemm._gemm_kernel, wq, {**base, "HAS_BIAS": False, "SPLIT_K": 1, "SWAP": True}),
             ("prefill_variants._tc_kernel SWAP", V._tc_kernel, var, {**base, "SWAP": True, "EVEN_K": True}),
             ("prefill_variants._rd_kernel", V._rd_kernel, var, {**base, "SWAP": True, "EVEN_K": True})]
    for name, fn, sig, consts in cases:
        ck = compile_kernel(fn, sig, consts, num_warps=8, num_stages=3)
        print(f"{name:<34} {json.dumps(summary(ck))}", flush=True)
        if args.ttgir:
            os.makedirs(args.ttgir, exist_ok=True)
            open(os.path.join(args.ttgir, name.replace(" ", "_") + ".ttgir"), "w").write(ck.asm["ttgir"])


if __name__ == "__main__":
    main()
