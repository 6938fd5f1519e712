"""GPTQ: Hessian-weighted error compensation, generic over weight formats.

The engine needs from a format only `fit` (group parameters from the group's current, error-updated
weights), `quantize` and `dequantize` of single columns under those parameters (see formats/base.py), so
uniform INT, HLQ, INT6 and NVFP4 weights all reuse it unchanged.

Algorithm (Frantar et al. 2022, with the usual lazy block updates): H = 2/n Σ x xᵀ; dead inputs (H_ii = 0)
get H_ii = 1 and zero weights; H += λ·mean(diag H)·I; U = chol(H⁻¹)ᵀ; columns are quantized left to right,
each column's error e = (w − q)/U_ii is pushed onto the not-yet-quantized columns through U's row.

Groups: without act-order, a group's parameters are fitted when the sweep reaches its first column, on the
weights as updated so far (including the in-block updates that the reference implementation omits). With
act-order, columns are visited in descending diag(H) order but groups stay contiguous in the original order
("static groups"): every group's parameters are fitted up front on the original weights, so the packed
layout needs no g_idx and kernels see plain contiguous groups.
"""

from __future__ import annotations

import contextlib

import torch

from quantkit.formats.base import Params, WeightFormat


class HessianAccumulator:
    """Running H = 2/n Σ xᵀx over the rows of every batch passed to `add` (x: [..., K])."""

    def __init__(self, k: int, device: torch.device | str):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.t(), x)


def _inverse_cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ with damping; escalates damping until H is positive definite.

    Uses `h` as scratch (callers pass a copy they own) and keeps at most two K x K matrices alive: on a
    14336-wide down_proj each is 0.8 GB, which decides the peak of a streamed layer on a GPU.
    """
    diag = h.diagonal()
    mean_diag = torch.mean(diag).clamp_min(1e-8)
    orig = diag.clone()
    lam = damping
    for _ in range(8):
        diag.copy_(orig + lam * mean_diag)  # = h + λ·mean(diag)·I, bit for bit, without an identity matrix
        l, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            torch.cholesky_inverse(l, out=h)  # h := H⁻¹
            u, info = torch.linalg.cholesky_ex(h, upper=True, out=(l, info))  # u reuses l's memory
            if info == 0 and all(torch.isfinite(u[i : i + 1024]).all() for i in range(0, u.shape[0], 1024)):
                return u  # (checked in row blocks: a K x K bool mask would be one more 0.2 GB temporary)
            # rare: H⁻¹ not numerically positive definite; get H back and retry with more damping
            h.copy_(torch.linalg.inv(h))
            diag = h.diagonal()
        lam = max(lam * 10, 1e-4)
    raise RuntimeError("Hessian could not be made positive definite even with heavy damping")


# Hessians at least this large (on a GPU) take the two-matrix factorization below (K >= 8192)
LOWMEM_MIN_BYTES = 256 * 2**20


def _inverse_cholesky_lowmem(h: torch.Tensor, damping: float, block: int = 1024) -> torch.Tensor:
    """The same U (H⁻¹ = UᵀU, U upper) as `_inverse_cholesky`, never holding more than two K x K matrices
    and no solver temporaries of that size (the step that decided a streamed 8B layer's peak VRAM).

    With J the exchange matrix and J·H·J = L̃·L̃ᵀ (lower Cholesky): H = R·Rᵀ with R = J·L̃·J upper, so
    H⁻¹ = R⁻ᵀ·R⁻¹ and U = R⁻¹ = J·L̃⁻¹·J. L̃⁻¹ is built column block by column block with triangular solves
    and written straight into U, flipped. `h` is consumed (the caller hands it over).
    """
    k = h.shape[0]
    ht = torch.flip(h, (0, 1))
    del h
    diag = ht.diagonal()
    mean_diag = torch.mean(diag).clamp_min(1e-8)
    orig = diag.clone()
    lam = damping
    for _ in range(8):
        diag.copy_(orig + lam * mean_diag)
        lt, info = torch.linalg.cholesky_ex(ht)
        if info == 0:
            break
        lt = None  # free the failed factor before the next try
        lam = max(lam * 10, 1e-4)
    else:
        raise RuntimeError("Hessian could not be made positive definite even with heavy damping")
    del ht, diag
    u = torch.zeros(k, k, dtype=lt.dtype, device=lt.device)
    for j1 in range(0, k, block):
        j2 = min(j1 + block, k)
        rhs = torch.zeros(k - j1, j2 - j1, dtype=lt.dtype, device=lt.device)
        rhs[: j2 - j1].fill_diagonal_(1.0)
        x = torch.linalg.solve_triangular(lt[j1:, j1:], rhs, upper=False)  # L̃⁻¹[j1:, j1:j2]
        u[: k - j1, k - j2 : k - j1] = torch.flip(x, (0, 1))
        del rhs, x
    if not all(torch.isfinite(u[i : i + block]).all() for i in range(0, k, block)):
        raise RuntimeError("GPTQ: the inverse Hessian factor is not finite; raise method.damping")
    return u


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | list[torch.Tensor],
    fmt: WeightFormat,
    damping: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    consume_hessian: bool = False,
    factor_device: torch.device | str | None = None,
) -> tuple[torch.Tensor, Params]:
    """Quantize `weight: [N, K]` with GPTQ under format `fmt`.

    Returns codes `[N, K]` (original column order) and parameters stacked per group `{name: [N, groups,
    ...]}`, the same shapes `fmt.quantize_rtn` returns. With `consume_hessian`, `hessian` (fp32, on the
    weight's device) is used as scratch space instead of being copied: the caller must not reuse it. A
    one-element list hands the Hessian over (consumed, and freed as soon as it is no longer needed: the
    caller must hold no other reference).
    factor_device: where the damped inverse Cholesky factorization runs (default: the weight's device). The
    streaming pipeline sends wide Hessians to the host: on a GPU the factorization's K x K temporaries and
    the solver's workspace, not the layer, decide peak VRAM (down_proj, K = 14336: 0.8 GB per matrix).
    """
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    if isinstance(hessian, list):  # handed over: the caller kept no reference, so it is freed as we go
        hessian, consume_hessian = hessian.pop(), True
    h = hessian.to(w.device, torch.float32)
    if not (consume_hessian and h is hessian):
        h = h.clone()
    del hessian
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    bounds = fmt.group_bounds(k)
    group_of = torch.empty(k, dtype=torch.long)
    for gi, (s, e) in enumerate(bounds):
        group_of[s:e] = gi
    params: list[Params | None] = [None] * len(bounds)

    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        for gi, (s, e) in enumerate(bounds):  # static groups, fitted on the original weights
            params[gi] = fmt.fit(w[:, s:e])
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = torch.arange(k, device=w.device)
    perm_cpu = perm.cpu().tolist()

    if factor_device is not None and torch.device(factor_device) != h.device:
        h_dev = h.to(factor_device)
        del h
        u = _inverse_cholesky(h_dev, damping)
        del h_dev
        u = u.to(w.device)
    elif h.is_cuda and h.numel() * 4 >= LOWMEM_MIN_BYTES:
        u = _inverse_cholesky_lowmem(h, damping)
        del h
    else:
        u = _inverse_cholesky(h, damping)
        del h
    # codes are < 2^8 for every format: uint8 during the sweep (1/8 of int64's memory), int64 on return
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    with _few_threads(w.device, n * block_size):
        _sweep(w, u, codes, params, fmt, bounds, group_of, perm_cpu, block_size, act_order)
    del u, w
    codes = codes.to(torch.int64)
    stacked = {key: torch.stack([p[key] for p in params], dim=1) for key in params[0]}
    return codes, stacked


@contextlib.contextmanager
def _few_threads(device: torch.device, work: int):
    """The column sweep is thousands of tiny ops: on CPU, intra-op threads cost more than they bring
    (measured 14x slower with 2 threads on a busy 2-core machine for a 576x576 layer), so use one."""
    if device.type != "cpu" or work > 2_000_000:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sweep(w, u, codes, params, fmt, bounds, group_of, perm_cpu, block_size, act_order) -> None:
    """The GPTQ column sweep with lazy block updates; fills `codes` and `params` in place."""
    k = w.shape[1]

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm_cpu[i1 + i]
            gi = int(group_of[col])
            if not act_order and col == bounds[gi][0]:
                e = bounds[gi][1]
                # current weights of the whole group: in-block columns from w1; columns beyond this block
                # still owe this block's pending updates, applied here without committing them.
                cur = w1[:, i : min(e, i2) - i1]
                if e > i2:
                    rest = w[:, i2:e] - err1[:, :i] @ u[i1 : i1 + i, i2:e]
                    cur = torch.cat([cur, rest], dim=1)
                params[gi] = fmt.fit(cur)
            p = params[gi]
            col_w = w1[:, i : i + 1]
            q = fmt.quantize(col_w, p)
            dq = fmt.dequantize(q, p)
            codes[:, col] = q[:, 0]
            e_col = (col_w[:, 0] - dq[:, 0]) / u1[i, i]
            w1[:, i:] -= e_col.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e_col
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
