"""Probe of the ARC activation kernel (GPU): amax pre-pass settings, the quantization pass at several M, and the
reciprocal + FMA-correction division against IEEE division (prints a table, writes OUT/probe_arc_act.json)."""
import json
import os

import torch
import triton
import triton.language as tl

from quantkit.eval.bench_kernels import time_rotated
from quantkit.kernels import nvfp4_gemm as kg


def _write(out: dict) -> None:
    with open(os.path.join(os.environ.get("OUT", "out"), "probe_arc_act.json"), "w") as f:
        json.dump(out, f, indent=1)


dev = torch.device("cuda")
k, s = 4096, 256
out = {}
for m in (1, 4, 16, 1024, 4096):
    x = (torch.randn(m, k, device=dev) * 2).to(torch.bfloat16)
    rand = torch.randperm(k, device=dev).to(torch.int32)
    part = torch.empty(256, device=dev)
    rows = []
    for blk, nw in ((1024, 4), (2048, 4), (4096, 8), (8192, 8), (4096, 4)):
        per = -(-(m * k) // 256)
        per = -(-per // blk) * blk
        p = -(-(m * k) // per)
        rows.append((f"amax_b{blk}_w{nw}", lambda x=x, part=part, m=m, per=per, p=p, blk=blk, nw=nw: kg._amax_kernel[(p,)](x, part, m * k, per, BLOCK=blk, num_warps=nw)))
    rows += [
        ("act_packed", lambda x=x, rand=rand: kg.arc_quantize_activation_triton(x, rand, s)),
        ("act_deq", lambda x=x, rand=rand: kg.arc_quantize_activation_triton(x, rand, s, packed=False, deq_dtype=torch.bfloat16)),
        ("act_deq_bk512", lambda x=x, rand=rand: kg.arc_quantize_activation_triton(x, rand, s, packed=False, deq_dtype=torch.bfloat16, block_k=512)),
        ("copy_bf16", lambda x=x: x.clone()),
    ]
    for name, fn in rows:
        us = time_rotated([fn] * 4)
        out[f"{m}/{name}"] = us
        print(f"M={m:<5} {name:<18} {us:9.2f} us", flush=True)
_write(out)

# Reciprocal + FMA corrections vs IEEE division on random (x, d) in the domain where the activation kernel's
# quotient decides a code: d = e4m3 · S ≥ 2^-99 (the kernel takes this path for S ≥ 2^-90) with a random
# significand, |x/d| in [2^-3, 16) (below 2^-3 every quotient gives code 0).


@triton.jit
def _divcheck(x_ptr, d_ptr, bad_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=1.0)
    d = tl.load(d_ptr + offs, mask=ok, other=1.0)
    y = tl.math.div_rn(1.0, d)
    q = x * y
    q1 = tl.fma(tl.fma(-q, d, x), y, q)  # one correction
    q = tl.fma(tl.fma(-q1, d, x), y, q1)  # two: what the activation kernel does
    ref = tl.math.div_rn(x, d)
    bad = (q.to(tl.int32, bitcast=True) != ref.to(tl.int32, bitcast=True)) & ok
    bad1 = (q1.to(tl.int32, bitcast=True) != ref.to(tl.int32, bitcast=True)) & ok
    tl.atomic_add(bad_ptr, tl.sum(bad.to(tl.int32), axis=0))
    tl.atomic_add(bad_ptr + 1, tl.sum(bad1.to(tl.int32), axis=0))


bad = torch.zeros(2, dtype=torch.int32, device=dev)
n, total = 1 << 26, 0
for i in range(32):
    g = torch.Generator(device=dev).manual_seed(i)
    d = torch.exp2(torch.randint(-99, 20, (n,), device=dev, generator=g).float()) * (1 + torch.rand(n, device=dev, generator=g))
    sign = torch.randint(0, 2, (n,), device=dev, generator=g).float() * 2 - 1
    x = d * torch.exp2(torch.randint(-3, 4, (n,), device=dev, generator=g).float()) * (1 + torch.rand(n, device=dev, generator=g)) * sign
    _divcheck[(triton.cdiv(n, 1024),)](x, d, bad, n, BLOCK=1024, enable_fp_fusion=False)
    total += n
print(f"division check: {bad[0].item()} (two corrections) / {bad[1].item()} (one) of {total} quotients differ "
      "from div_rn", flush=True)
out["div_check"] = {"pairs": total, "mismatches_two_corrections": bad[0].item(), "mismatches_one": bad[1].item()}
_write(out)
