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

A format whose `fit_uses_importance` is true (int6 with `clip_search: mse_h`) gets `fit(w, importance=h)`,
h = the group's slice of diag(H) (∝ mean x_j² of each input channel): the error a weight's rounding adds to
the layer's output on its own is e_j² · H_jj, so that is what its group-scale search weighs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import Params, WeightFormat
from quantkit.methods.base import WeightAlgorithm, register_algorithm


class HessianAccumulator:
    """Running H = 2/n Σ xᵀx over the rows of every batch passed to `add` (x: [..., K]).

    sink_weight: the first position of each sequence (x: [batch, seq, K]) counts that many times."""

    def __init__(self, k: int, device: torch.device | str, sink_weight: float = 1.0):
        self.k, self.device = k, torch.device(device)
        self._h: torch.Tensor | None = None  # allocated by the first add (window_rows never needs it)
        self.n = 0
        self.sink_weight = float(sink_weight)

    @property
    def h(self) -> torch.Tensor:
        if self._h is None:
            self._h = torch.zeros(self.k, self.k, dtype=torch.float32, device=self.device)
        return self._h

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.sink_weight != 1.0 and x.dim() >= 3:
            x = x.clone()
            x[..., 0, :] *= self.sink_weight ** 0.5
        return x.reshape(-1, x.shape[-1]).to(self.device, torch.float32)

    @torch.no_grad()
    def window_rows(self, x: torch.Tensor):
        """The result of a fresh accumulator fed `x` alone, by row panels (for the pipeline's exact sum, which
        then never holds a K x K float copy): (its shape, a bound of its entries' magnitudes,
        rows(lo, hi) -> float32 [hi - lo, K])."""
        x = self._rows(x)
        x = x * (2.0 / max(x.shape[0], 1)) ** 0.5
        # |H_ij| <= sqrt(H_ii H_jj) <= max_i H_ii (H is a Gram matrix); margin for the GEMM's rounding
        bound = float((x * x).sum(0).max()) * (1 + 2**-8) if x.numel() else 0.0
        return (self.k, self.k), bound, lambda lo, hi: x[:, lo:hi].t() @ x

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = self._rows(x)
        m = x.shape[0]
        if m == 0:
            return
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.t(), x)

    def result(self) -> torch.Tensor:
        return self.h


def factor_threads() -> int:
    """Threads of CPU factorizations, whatever the process's intra-op thread count: LAPACK's Cholesky (MKL's
    potrf) gives other bits with another thread count, so N processes sharing a host (fewer threads each)
    would otherwise solve to another checkpoint than one process. `QUANTKIT_FACTOR_THREADS` (inherited by
    the workers), else min(8, cores): the host's, not the process's."""
    env = os.environ.get("QUANTKIT_FACTOR_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise QuantkitError(f"QUANTKIT_FACTOR_THREADS={env!r}: give a positive integer (threads)")
        return int(env)
    return max(1, min(8, os.cpu_count() or 1))


@contextlib.contextmanager
def _cpu_threads(device: torch.device, n: int | None):
    """Run the body on `n` intra-op threads when on the CPU (None, or another device: unchanged)."""
    old = torch.get_num_threads()
    if device.type != "cpu" or n is None or old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _inverse_cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ with damping; escalates damping until H is positive definite.

    Uses `h` as scratch (callers pass a copy they own) and keeps at most two K x K matrices alive: on a
    14336-wide down_proj each is 0.8 GB, which decides the peak of a streamed layer on a GPU. On CPU it runs
    on `factor_threads()` threads, so its bits do not depend on the caller's thread count.
    """
    with _cpu_threads(h.device, factor_threads()):  # GPU factorizations do not depend on threads
        return _inverse_cholesky_any_threads(h, damping)


def _inverse_cholesky_any_threads(h: torch.Tensor, damping: float) -> torch.Tensor:
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


# Hessians at least this large (on a GPU) are factorized in place (K >= 8192)
LOWMEM_MIN_BYTES = 256 * 2**20


def _flip_inplace(a: torch.Tensor, chunk: int = 1 << 22) -> None:
    """a := J·a·J (both axes reversed) without a second matrix: on a contiguous square matrix that is the
    reversal of the flattened storage, done by swapping mirrored chunks."""
    flat = a.view(-1)
    n = flat.numel()
    for lo in range(0, n // 2, chunk):
        hi = min(lo + chunk, n // 2)
        head = flat[lo:hi].clone()
        flat[lo:hi] = flat[n - hi : n - lo].flip(0)
        flat[n - hi : n - lo] = head.flip(0)


def _cholesky_lower_inplace(a: torch.Tensor, bounds: list[tuple[int, int]]) -> bool:
    """Blocked right-looking Cholesky: a's lower triangle := L (A = L·Lᵀ). Writes only the diagonal blocks
    and what lies below them, so the strict upper triangle off the diagonal blocks keeps A. False if A is
    not positive definite (a is then partly overwritten)."""
    k = a.shape[0]
    for idx, (j, j2) in enumerate(bounds):
        l11, info = torch.linalg.cholesky_ex(a[j:j2, j:j2])
        if int(info) != 0:
            return False
        a[j:j2, j:j2] = l11
        if j2 < k:
            l21 = torch.linalg.solve_triangular(l11.t(), a[j2:, j:j2], upper=True, left=False)  # L21·L11ᵀ = A21
            a[j2:, j:j2] = l21
            for c, c2 in bounds[idx + 1 :]:  # trailing update, lower block columns only
                a[c:, c:c2].addmm_(l21[c - j2 :], l21[c - j2 : c2 - j2].t(), alpha=-1.0)
    return True


def _tril_inverse_inplace(a: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
    """a's lower triangle (L, diagonal blocks already lower triangular) := L⁻¹, block column by block column
    from the right: X[j2:, j] = −X[j2:, j2:]·L[j2:, j]·X_jj reads only columns already inverted."""
    k = a.shape[0]
    for idx in range(len(bounds) - 1, -1, -1):
        j, j2 = bounds[idx]
        eye = torch.eye(j2 - j, dtype=a.dtype, device=a.device)
        x_jj = torch.linalg.solve_triangular(torch.tril(a[j:j2, j:j2]), eye, upper=False)
        if j2 < k:
            t = torch.empty(k - j2, j2 - j, dtype=a.dtype, device=a.device)
            for i, i2 in bounds[idx + 1 :]:
                acc = a[i:i2, i:i2] @ a[i:i2, j:j2]  # X_ii (upper part zero) · L_ij
                if i > j2:
                    acc.addmm_(a[i:i2, j2:i], a[j2:i, j:j2])
                t[i - j2 : i2 - j2] = acc
            a[j2:, j:j2] = -(t @ x_jj)
            del t
        a[j:j2, j:j2] = x_jj


def _inverse_cholesky_inplace(h: torch.Tensor, damping: float, block: int = 1024) -> torch.Tensor:
    """The same U (H⁻¹ = UᵀU, U upper) as `_inverse_cholesky`, computed inside `h` itself (returned): one
    K x K plus K x block temporaries. On a streamed 8B layer the factorization's K x K matrices (0.8 GB each
    for down_proj) decided peak VRAM.

    With J the exchange matrix and J·H·J = L̃·L̃ᵀ (lower Cholesky): H = R·Rᵀ with R = J·L̃·J upper, so
    H⁻¹ = R⁻ᵀ·R⁻¹ and U = R⁻¹ = J·L̃⁻¹·J. The flips reverse the storage in place, the Cholesky and the
    triangular inverse are blocked and in place. A failed Cholesky is undone from the untouched upper
    triangle (H is symmetric) and the saved diagonal blocks, then retried with more damping.
    """
    k = h.shape[0]
    _flip_inplace(h)
    bounds = [(j, min(j + block, k)) for j in range(0, k, block)]
    diag_blocks = [h[j:j2, j:j2].clone() for j, j2 in bounds]
    diag = h.diagonal()
    mean_diag = torch.mean(diag).clamp_min(1e-8)
    orig = diag.clone()
    lam = damping
    for _ in range(8):
        diag.copy_(orig + lam * mean_diag)  # = h + λ·mean(diag)·I, as `_inverse_cholesky` does it
        if _cholesky_lower_inplace(h, bounds):
            break
        for (j, j2), d in zip(bounds, diag_blocks, strict=True):
            h[j:j2, j:j2] = d
            h[j2:, j:j2] = h[j:j2, j2:].t()
        lam = max(lam * 10, 1e-4)
    else:
        raise RuntimeError("Hessian could not be made positive definite even with heavy damping")
    del diag_blocks, diag, orig
    _tril_inverse_inplace(h, bounds)
    for j, j2 in bounds:
        h[j:j2, j2:] = 0.0
    _flip_inplace(h)
    if not all(torch.isfinite(h[i : i + block]).all() for i in range(0, k, block)):
        raise RuntimeError("GPTQ: the inverse Hessian factor is not finite; raise method.damping")
    return h


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
    hdiag = torch.diag(h).clone() if getattr(fmt, "fit_uses_importance", False) else None  # original order
    bounds = fmt.group_bounds(k)
    group_of = torch.empty(k, dtype=torch.long)
    for gi, (s, e) in enumerate(bounds):
        group_of[s:e] = gi
    params: list[Params | None] = [None] * len(bounds)

    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        for gi, (s, e) in enumerate(bounds):  # static groups, fitted on the original weights
            params[gi] = _fit(fmt, w[:, s:e], hdiag, s, e)
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
        u = _inverse_cholesky_inplace(h, damping)  # u is h, factorized in place
        del h
    else:
        u = _inverse_cholesky(h, damping)
        del h
    # codes are < 2^8 for every format: uint8 during the sweep (1/8 of int64's memory), int64 on return
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    # the column sweep is thousands of tiny ops: on CPU, intra-op threads cost more than they bring
    # (measured 14x slower with 2 threads on a busy 2-core machine for a 576x576 layer), so use one
    with _cpu_threads(w.device, 1 if n * block_size <= 2_000_000 else None):
        _sweep(w, u, codes, params, fmt, bounds, group_of, perm_cpu, block_size, act_order, hdiag)
    del u, w
    codes = codes.to(torch.int64)
    stacked = {key: torch.stack([p[key] for p in params], dim=1) for key in params[0]}
    return codes, stacked


def _fit(fmt: WeightFormat, w: torch.Tensor, hdiag: torch.Tensor | None, s: int, e: int) -> Params:
    """fmt.fit of group columns s..e, with diag(H)[s:e] as importance when the format uses it."""
    return fmt.fit(w) if hdiag is None else fmt.fit(w, importance=hdiag[s:e])


def _sweep(w, u, codes, params, fmt, bounds, group_of, perm_cpu, block_size, act_order, hdiag=None) -> None:
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
                params[gi] = _fit(fmt, cur, hdiag, col, e)
            p = params[gi]
            col_w = w1[:, i : i + 1]
            q = fmt.quantize(col_w, p)
            dq = fmt.dequantize(q, p)
            codes[:, col] = q[:, 0]
            e_col = (col_w[:, 0] - dq[:, 0]) / u1[i, i]
            w1[:, i:] -= e_col.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e_col
        w[:, i2:] -= err1 @ u[i1:i2, i2:]


# Hessians at least this large are factorized on the host when the pipeline runs with host_factorization
HOST_FACTOR_MIN_BYTES = 256 * 2**20


@dataclass(frozen=True)
class GPTQSettings:
    damping: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy-update block
    act_order: bool = False  # columns in descending diag(H) order (groups stay static, see above)
    true_sequential: bool = True  # re-collect inputs after quantizing each sub-block of a layer
    # weight of each calibration window's first token (the attention sink) in the Hessian; > 1 keeps GPTQ
    # from trading that token's error for the others'
    sink_weight: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.damping < 1:
            raise QuantkitError(f"method.damping = {self.damping} is out of range: use 0 <= damping < 1")
        if self.block_size < 1:
            raise QuantkitError(f"method.block_size = {self.block_size} must be >= 1")
        if not self.sink_weight > 0:
            raise QuantkitError(f"method.sink_weight = {self.sink_weight} must be > 0 (1 = every token alike)")


@register_algorithm
class GPTQ(WeightAlgorithm):
    """GPTQ over a Hessian of each Linear's calibration inputs, in any weight format."""

    name = "gptq"
    Settings = GPTQSettings
    needs_data = True

    @property
    def sequential(self) -> bool:
        return self.settings.true_sequential

    def statistics(self, in_features: int, device: torch.device) -> HessianAccumulator:
        return HessianAccumulator(in_features, device, self.settings.sink_weight)

    def quantize(self, weight, fmt, stats, act=None, host_factorization=False):
        """stats: None (no data reached this Linear: RTN), the Hessian, or a one-element list handing it over
        (see gptq_quantize). With an activation scheme, GPTQ solves for the columns it names."""
        if stats is None:
            return fmt.quantize_rtn(weight.detach().float())
        h0 = stats[0] if isinstance(stats, list) else stats
        host = host_factorization and h0.is_cuda and h0.numel() * 4 >= HOST_FACTOR_MIN_BYTES
        del h0
        s = self.settings
        solve = act.gptq_weight(weight) if act is not None else weight
        codes, params = gptq_quantize(solve, stats, fmt, damping=s.damping, block_size=s.block_size,
                                      act_order=s.act_order, factor_device="cpu" if host else None)
        if act is not None:
            codes, params = act.complete_gptq(codes, params, fmt)
        return codes, params

    def work_bytes(self, n_out, k, device, host_factorization):
        # H (handed over) and its Cholesky factor (wide Hessians on a GPU: factorized in place, plus K x block
        # panels), W in fp32, codes in uint8; with host_factorization, wide Hessians are factorized on the host
        kk = k * k * 4
        host = host_factorization and device.type == "cuda" and kk >= HOST_FACTOR_MIN_BYTES
        inplace = device.type == "cuda" and kk >= LOWMEM_MIN_BYTES and not host
        factor = kk if host else kk + 2 * k * 1024 * 4 if inplace else 2 * kk
        return factor + n_out * k * (4 + 1), (3 * kk if host else 0)
