"""One launch of each prefill GEMM variant (explicit config, no autotuning) for Nsight Compute:
    ncu --clock-control none -k regex:_gemm_kernel python3 experiments/ncu_prefill.py"""

import torch

from quantkit.eval.bench_int8_gemm import _w6
from quantkit.kernels import int8_gemm as kg
from quantkit.kernels import int8_prefill as kp

x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
w = _w6(4096, 14336, "cuda")
qa, s, _ = kg.quantize_act(x, 8)
wt = kp.unpack_weight(w)
cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
for mode in (1, 0):
    kp.prefill_gemm(qa, s, wt, w, config=cfg, mode=mode)
torch.cuda.synchronize()
