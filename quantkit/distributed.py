"""Several processes: data-parallel quantization over torch.distributed (torchrun; NCCL on GPUs, gloo on CPU).

The layer-by-layer pipeline runs unchanged on every rank; this module holds what changes with several:

- `Dist`: the rank, the world size and the collectives the pipeline uses (a one-process `Dist` does no
  communication, so the plain run takes exactly the same code path);
- `ExactSum`: the order-independent sum that makes calibration statistics (GPTQ's Hessian) bitwise the same
  for any number of processes, the plain run included (see docs/design.md, "Several processes");
- `launch`: `quantkit quantize --nproc N / --gpus N` starts N workers through torch's elastic launcher (the
  engine behind `torchrun`) and turns a failed worker into one error line.

A worker started by torchrun (`torchrun --nproc-per-node N -m quantkit.cli quantize ...`) finds WORLD_SIZE in
its environment and joins the group in `init_from_env`.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

# exit status of a worker that stopped on a QuantkitError (its message is in the error folder or on stderr)
EXIT_REPORTED = 3
# exit status of a worker that stopped because another one failed (a broken collective): nothing to report
EXIT_PEER = 4
ERROR_DIR_ENV = "QUANTKIT_DIST_ERRORS"
BACKEND_ENV = "QUANTKIT_DIST_BACKEND"
TIMEOUT_ENV = "QUANTKIT_DIST_TIMEOUT"


class Dist:
    """The process group as the pipeline sees it. `Dist()` is the single process (world 1, no communication)."""

    def __init__(self, rank: int = 0, world: int = 1, backend: str | None = None):
        self.rank, self.world, self.backend = rank, world, backend

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes shards, the manifest and the checkpoint."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of n calibration windows (sizes differ by at most one)."""
        if self.world > n:
            raise QuantkitError(f"{self.world} processes for {n} calibration windows: every process needs at least "
                                f"one window; use at most {n} processes or raise --nsamples")
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def assign(self, costs: list[float]) -> list[int]:
        """An owner rank per job: longest job first onto the least loaded rank (ties: lowest index, lowest
        rank), the same on every rank."""
        load = [0.0] * self.world
        owners = [0] * len(costs)
        for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owners[j] = r
            load[r] += costs[j]
        return owners

    # ---- collectives (no-ops on one process) ----
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor the backend can send: gloo works on host tensors, NCCL on CUDA ones."""
        if self.backend == "gloo":
            return t.cpu()
        return t if t.is_cuda else t.cuda(torch.cuda.current_device())

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def all_gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj if self.rank == src else None]
        td.broadcast_object_list(box, src=src)
        return box[0]

    def pass_on(self, obj, src: int, device):
        """`obj` as rank `src` holds it, on every rank (tensors land on `device`; serialized with torch.save,
        so tensors it references travel too). One process: `obj` itself."""
        if not self.active:
            return obj
        import io

        data = None
        if self.rank == src:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
        data = self.broadcast_object(data, src)
        if self.rank == src:
            return obj
        return torch.load(io.BytesIO(data), map_location=device, weights_only=False)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place on `t`. Only for sums that are exact in any order (integers; 0/±inf/NaN patterns)."""
        if not self.active:
            return t
        import torch.distributed as td

        c = self._comm(t)
        td.all_reduce(c, op=td.ReduceOp.SUM)
        if c is not t:
            t.copy_(c)
        return t

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if not self.active:
            return t
        import torch.distributed as td

        c = self._comm(t)
        td.broadcast(c, src=src)
        if c is not t:
            t.copy_(c)
        return t


_SINGLE = Dist()
_CURRENT: list[Dist] = [_SINGLE]


def current() -> Dist:
    """The group of this process: the one `init_from_env` joined, else the single process."""
    return _CURRENT[0]


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> tuple[Dist, str]:
    """Join the group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR...).

    Returns (dist, device): on CUDA each rank takes GPU LOCAL_RANK (modulo the visible GPUs: several ranks on
    one GPU is a functional mode, over gloo). Backend: NCCL when every rank has its own GPU, else gloo;
    QUANTKIT_DIST_BACKEND overrides."""
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        if n == 0:
            raise QuantkitError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        gpu = local % n
        device = f"cuda:{gpu}"
        torch.cuda.set_device(gpu)
        backend = "nccl" if int(os.environ.get("LOCAL_WORLD_SIZE", world)) <= n else "gloo"
    else:
        backend = "gloo"
    backend = os.environ.get(BACKEND_ENV, backend)
    if not td.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
        kw = {"device_id": torch.device(device)} if backend == "nccl" else {}
        td.init_process_group(backend=backend, timeout=timeout, **kw)
    d = Dist(rank, world, backend)
    _CURRENT[0] = d
    return d, device


def shutdown() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
    _CURRENT[0] = _SINGLE


# ---------------------------------------------------------------------------------------------------------
# exact, order-independent sums

_FRAC_BITS = 46  # each term is rounded to 2^-46 of its band's top
_BAND_BITS = 16  # bands of terms not in the main band: the power of two above the term, rounded up to 16 binades
_HEADROOM_BITS = 8  # the main band's top: 2^8 above the first window's bound
MAX_TERMS = 1 << 16  # 2^16 terms of magnitude < 2^46 fit an int64 band (below 2^62)
ROWS = 1024  # rows per storage chunk and conversion step (bounds the temporaries; chunks are freed one by one)


def main_band(bound: float) -> int | None:
    """The main band for terms like one bounded by `bound` (None: no usable bound)."""
    if not math.isfinite(bound) or bound <= 0.0:
        return None
    return math.frexp(bound)[1] + _HEADROOM_BITS  # bound < 2^(e) <= 2^(band - 8)


class ExactSum:
    """Σ_i w_i · r_i over float32 tensors r_i of one shape with integer weights w_i, independent of the order
    and the grouping of the terms, so that N processes summing disjoint parts and reducing them give exactly
    the bits one process gets.

    Each term is turned into integers once, by itself: r_i · w_i · 2^(46 − b), rounded to nearest, and summed
    in an int64 tensor of band b (exact: below 2^62 for up to 2^16 terms). Integer sums commute, so the band
    totals are the same for any split of the terms over processes (reduced with an int64 all-reduce); `result`
    converts the bands to float64 in ascending order and divides by Σ w_i. The band of a term: the main band
    `band` (given: 2^8 above the first calibration window's bound, the same on every rank) when the term is
    below its top, else its own (the power of two above it, rounded up to 16 binades), so a Linear's terms
    normally share one int64 tensor. A term keeps 46 bits below its band's top (38 below the first window's
    largest entry), more than the float32 running sums it replaces (24). Storage is in row chunks of 1024, so
    `result` frees each band chunk as it converts it. NaN/±inf entries are carried separately (their sums do not
    depend on order either)."""

    def __init__(self, band: int | None = None):
        self.main = band
        self.bands: dict[int, list[torch.Tensor | None]] = {}
        self.special: torch.Tensor | None = None
        self.weight = 0
        self.terms = 0
        self.shape: tuple[int, ...] | None = None
        self.device: torch.device | None = None

    def _layout(self) -> tuple[int, int]:
        rows = self.shape[0] if len(self.shape) > 1 else 1
        return rows, math.prod(self.shape) // rows

    def _band_of(self, m: float) -> int:
        """The band of a term whose largest magnitude (times its weight) is m > 0."""
        if self.main is not None and m < math.ldexp(1.0, self.main):
            return self.main
        return _BAND_BITS * math.ceil(math.frexp(m)[1] / _BAND_BITS)  # m < 2^band

    def _chunks(self, band: int) -> list[torch.Tensor]:
        acc = self.bands.get(band)
        if acc is None:
            rows, cols = self._layout()
            acc = self.bands[band] = [torch.zeros((min(ROWS, rows - i), cols), dtype=torch.int64, device=self.device)
                                      for i in range(0, rows, ROWS)]
        return acc

    def _start_term(self, shape: tuple[int, ...], device: torch.device, w: int) -> None:
        if self.shape is None:
            self.shape, self.device = tuple(shape), device
        elif tuple(shape) != self.shape:
            raise QuantkitError(f"calibration statistics of one Linear changed shape ({self.shape} -> "
                                f"{tuple(shape)})")
        self.weight += int(w)
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise QuantkitError(f"more than {MAX_TERMS} calibration windows: lower --nsamples")

    @staticmethod
    def _add_rows(chunk: torch.Tensor, rows: torch.Tensor, scale: float) -> None:
        chunk += torch.round(rows.double() * scale).to(torch.int64)  # r·w·2^k is exact in float64

    @torch.no_grad()
    def add(self, r: torch.Tensor, w: int) -> None:
        """One term r (float32) with weight w."""
        if r.dtype != torch.float32:
            raise QuantkitError(f"a calibration statistic must be float32 to be reduced exactly, not {r.dtype}")
        self._start_term(r.shape, r.device, w)
        flat = r.reshape(r.shape[0], -1) if r.dim() > 1 else r.reshape(1, -1)
        m = float(flat.abs().max()) if flat.numel() else 0.0  # NaN/inf if any entry is (max propagates NaN)
        if not math.isfinite(m):
            finite = torch.isfinite(flat)
            sp = torch.where(finite, torch.zeros_like(flat), flat)
            self.special = sp if self.special is None else self.special + sp
            flat = torch.where(finite, flat, torch.zeros_like(flat))
            del finite
            m = float(flat.abs().max())
        if m == 0.0:
            return
        band = self._band_of(m * w)
        scale = math.ldexp(float(w), _FRAC_BITS - band)  # w · 2^(46 - band): exact in float64
        for ci, chunk in enumerate(self._chunks(band)):
            self._add_rows(chunk, flat[ci * ROWS : ci * ROWS + chunk.shape[0]], scale)

    @torch.no_grad()
    def add_panels(self, shape: tuple[int, ...], device: torch.device, bound: float, rows, w: int) -> None:
        """One term given by row panels: rows(lo, hi) -> float32 [hi - lo, cols] (the term's rows lo..hi, as
        `algo.statistics`' `window_rows` hands them), `bound` >= its largest magnitude. Never holds the whole
        term: what the statistics of a wide Linear cost on a GPU."""
        self._start_term(shape, device, w)
        if not math.isfinite(bound):  # a non-finite input: the term as a whole, by the general path
            self.terms -= 1
            self.weight -= int(w)
            self.add(torch.cat([rows(lo, min(lo + ROWS, shape[0])) for lo in range(0, shape[0], ROWS)]), w)
            return
        if bound == 0.0:
            return
        band = self._band_of(bound * w)
        scale = math.ldexp(float(w), _FRAC_BITS - band)
        for ci, chunk in enumerate(self._chunks(band)):
            lo = ci * ROWS
            self._add_rows(chunk, rows(lo, lo + chunk.shape[0]), scale)

    @torch.no_grad()
    def reduce(self, dist: Dist) -> None:
        """Sum the parts held by the ranks of `dist` (each rank ends with the total)."""
        if not dist.active:
            return
        meta = dist.all_gather_objects((sorted(self.bands), self.special is not None, self.weight, self.terms,
                                        self.shape))
        shape = next((s for *_, s in meta if s is not None), None)
        if shape is None:
            return
        if self.shape is None:
            self.shape = shape
            self.device = self.device or torch.device("cpu")
        self.weight = sum(m[2] for m in meta)
        self.terms = sum(m[3] for m in meta)
        if self.terms > MAX_TERMS:
            raise QuantkitError(f"more than {MAX_TERMS} calibration windows: lower --nsamples")
        for band in sorted({b for m in meta for b in m[0]}):
            for chunk in self._chunks(band):
                dist.all_reduce_sum_(chunk)
        if any(m[1] for m in meta):
            if self.special is None:
                self.special = torch.zeros(self._layout(), dtype=torch.float32, device=self.device)
            dist.all_reduce_sum_(self.special)  # values in {0, ±inf, NaN}: their sum is order-independent

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        """Σ w_i r_i / Σ w_i in float32; frees the accumulators as it goes."""
        if self.shape is None or self.weight == 0:
            raise QuantkitError("no calibration input reached this Linear's statistics")
        rows, cols = self._layout()
        bands = sorted(self.bands)
        parts = []
        for ci in range((rows + ROWS - 1) // ROWS):
            n = min(ROWS, rows - ci * ROWS)
            acc = torch.zeros((n, cols), dtype=torch.float64, device=self.device)
            for b in bands:  # fixed order: ascending bands
                acc += self.bands[b][ci].double() * math.ldexp(1.0, b - _FRAC_BITS)
                self.bands[b][ci] = None
            parts.append((acc / self.weight).float())
            del acc
        self.bands.clear()
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        del parts
        if self.special is not None:
            out += self.special
            self.special = None
        return out.reshape(self.shape)


# ---------------------------------------------------------------------------------------------------------
# the launcher


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m quantkit.cli <argv>` in `nproc` workers through torch's elastic launcher (what torchrun
    runs). Returns 0, or prints one error line and returns the exit status of the failed run."""
    import logging
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="quantkit-dist-") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                           rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                           monitor_interval=0.1, start_method="spawn")
        try:
            elastic_launch(cfg, sys.executable)("-m", "quantkit.cli", *argv)
            return 0
        except ChildFailedError as e:
            def first(suffix):
                found = sorted(Path(errors).glob(f"rank*.{suffix}"), key=lambda p: int(p.stem[4:]))
                return next(((int(p.stem[4:]), t) for p in found if (t := p.read_text().strip())), None)

            reported = first("txt")
            # a worker stopped mid-update may leave its progress bar without a newline on the shared stderr:
            # start on a fresh line so the error is a line of its own
            print(file=sys.stderr, flush=True)
            if reported:
                print(f"error: {reported[1]}", file=sys.stderr, flush=True)
                return 2
            what = failure_cause({r: f.exitcode for r, f in e.failures.items()}, nproc, first("other"))
            print(f"error: {what}; the other processes were stopped. Rerun the same command (with --offload it "
                  f"resumes after the last finished layer)", file=sys.stderr, flush=True)
            return 1
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)


def failure_cause(exitcodes: dict[int, int | None], nproc: int, other: tuple[int, str] | None) -> str:
    """What failed, from the workers' exit codes (negative: killed by that signal) and the first "other"
    message (rank, text) a worker left. The launcher stops the remaining workers with SIGTERM once one has
    failed, and a worker that sees a collective break after a peer died leaves an "other" message: neither is
    the cause when a worker was killed."""
    import signal

    stopped = -int(signal.SIGTERM)
    causes = {r: c for r, c in exitcodes.items() if c != stopped} or dict(exitcodes)
    killed = {r: c for r, c in causes.items() if c is not None and c < 0}
    rank, code = min(killed.items()) if killed else min(causes.items())
    if other and not killed:
        return f"process {other[0]} of {nproc} failed ({other[1]})"
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        return f"process {rank} of {nproc} was killed ({sig})"
    return f"process {rank} of {nproc} failed with exit status {code}"


def report_error(dist: Dist, message: str | None, other: str | None = None) -> int:
    """A worker's failure: returns the exit status to stop with.

    message: a QuantkitError's text, written where the launcher reads it (without a launcher: printed by this
    rank). None: another exception (`other`: its first line), most often a broken collective after a peer
    died; the launcher prints it only when no rank reported a message and none was killed."""
    folder = os.environ.get(ERROR_DIR_ENV)
    text, suffix = (message, "txt") if message is not None else (other or "", "other")
    if folder:
        tmp = Path(folder) / f".rank{dist.rank}.tmp"
        tmp.write_text(text)
        os.replace(tmp, Path(folder) / f"rank{dist.rank}.{suffix}")
    elif message is not None or other:
        prefix = f"[rank {dist.rank}] " if dist.active else ""
        print(f"error: {prefix}{text}", file=sys.stderr, flush=True)
    return EXIT_REPORTED if message is not None else EXIT_PEER
