"""GPTQ's damped inverse Cholesky on a GPU at down_proj width (K = 14336): time, extra peak VRAM over the
Hessian and agreement of the in-place factorization (used for wide Hessians on GPUs) with the reference.

    python3 experiments/bench_gptq_factor.py
"""

import time

import torch

from quantkit.methods.gptq import _inverse_cholesky, _inverse_cholesky_inplace


def _timed(fn, h: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    u = fn(h, 0.01)
    torch.cuda.synchronize()
    return u, time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2**30


def main(k: int = 14336) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, k, device="cuda", generator=g) * torch.rand(k, device="cuda", generator=g) * 3
    h = x.t() @ x / 4096
    del x
    ref, t_ref, m_ref = _timed(_inverse_cholesky, h.clone())
    ref = ref.cpu()
    u, t_in, m_in = _timed(_inverse_cholesky_inplace, h)  # consumes h: the extra peak excludes the Hessian
    print(f"reference: {t_ref:.2f} s, extra peak {m_ref:.2f} GiB (input copy included)")
    print(f"in place:  {t_in:.2f} s, extra peak {m_in:.2f} GiB; one K x K is {k * k * 4 / 2**30:.2f} GiB")
    print(f"max |U - U_ref| / max |U_ref| = {float((u.cpu() - ref).abs().max() / ref.abs().max()):.2e}")


if __name__ == "__main__":
    main()
