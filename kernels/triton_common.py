"""Helpers shared by the Triton kernels (weight-only, int8 and NVFP4 GEMMs): tile order, split-K ranges and
epilogues, the split-K workspace, the SM count the split heuristics aim at, autotuner options.

Device side (`@triton.jit`):
- `grouped_tile`   (pid_m, pid_n) of a program in grouped order (GROUP_M row blocks share weight tiles in L2).
- `split_range`    [t0, t1): the K steps of one split-K slice.
- `store_out`      output tile epilogue, split-K by atomic adds into an all-zero fp32 workspace; the last
                   program of a tile (per-tile counter) reads it back, re-zeroes it, adds the bias, writes.
- `finish_tile`    output tile epilogue, split-K by per-slice fp32 partials summed in slice order
                   (deterministic) by the last program of a tile.
Host side:
- `NUM_SMS`, `set_sms`  the SM count the split-K heuristics target (set from the device before a launch).
- `split_k`        how many K slices give about `target` programs.
- `workspace`      the fp32 split-K workspace (kept all-zero) + per-tile counters, per device.
- `pow2`, `bucket` next power of two (autotuning keys bucket M with it).
- `interpreting`   whether Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1).
- `AUTOTUNE_CACHE_KW`  `cache_results=True` where this triton's autotuner has it (chosen configs on disk).
- `quick_bench`    a short `do_bench` for autotuners that tune many shapes.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

AUTOTUNE_CACHE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters \
    else {}

NUM_SMS = [132]  # set from the device (`set_sms`) before autotuned launches


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_sms(device: torch.device) -> None:
    if device.type == "cuda":
        NUM_SMS[0] = torch.cuda.get_device_properties(device).multi_processor_count


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bucket(m: int) -> int:
    """M as an autotuning key: the next power of two."""
    return pow2(m)


def split_k(tiles: int, k_tiles: int, target: int, cap: int = 32) -> int:
    """Split K until there are about `target` programs (enough loads in flight to stream the weights)."""
    if tiles >= target:
        return 1
    return max(1, min(k_tiles // 2, -(-target // tiles), cap))


def quick_bench(fn, quantiles=None):
    """Short autotuning runs (the default 25 + 100 ms per config adds up over many shapes)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# fp32 workspace (kept all-zero) and per-tile counters for split-K, per device
_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 workspace of at least `floats` zeros, int32 counters of at least `tiles` zeros) on `device`; the
    kernels leave both all-zero again."""
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < tiles:
        floats = max(floats, ws.numel() if ws is not None else 0, 1 << 20)
        tiles = max(tiles, cnt.numel() if cnt is not None else 0, 1 << 14)
        ws = torch.zeros(floats, dtype=torch.float32, device=device)
        cnt = torch.zeros(tiles, dtype=torch.int32, device=device)
        _WORKSPACE[device] = (ws, cnt)
    return ws, cnt


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row blocks in a row share weight tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def split_range(pid_k, n_steps, SPLIT_K: tl.constexpr):
    """[t0, t1): the K steps of split `pid_k` when `n_steps` are cut into SPLIT_K contiguous slices."""
    per_split = tl.cdiv(n_steps, SPLIT_K)
    t0 = pid_k * per_split
    return t0, tl.minimum(t0 + per_split, n_steps)


@triton.jit
def store_out(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, tile_id,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """acc: float32 [BLOCK_M, BLOCK_N] partial (or full, SPLIT_K == 1) sum of one output tile."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    optrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        wptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(wptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is in before the (cumulative) release below
        done = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # last contributor: read back (and re-zero) the sum, finish the tile
            zero = tl.zeros_like(acc)
            tot = tl.atomic_add(wptrs, zero, mask=mask, sem="acquire")  # read at L2, after all partials
            tl.store(wptrs, zero, mask=mask)
            if HAS_BIAS:
                tot += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
            tl.store(optrs, tot.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + tile_id, 0)


@triton.jit
def finish_tile(acc, o_ptrs, omask, tile, bias_ptrs, bmask, part_ptr, MN, pid_k, cnt,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write one output tile (+ bias). Split-K: each slice stores its fp32 partial at part[pid_k, tile]; the
    slice that moves the tile's counter last adds the partials in slice order (deterministic), writes the
    output and resets the counter (one launch, no memset). bias_ptrs / bmask broadcast to acc."""
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptrs, mask=bmask, other=0).to(tl.float32)
        tl.store(o_ptrs, acc.to(o_ptrs.dtype.element_ty), mask=omask)
    else:
        tl.store(part_ptr + pid_k * MN + tile, acc, mask=omask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        old = tl.atomic_add(cnt, 1, sem="acq_rel")
        if old == SPLIT_K - 1:  # the last slice of this tile: sum the partials in slice order
            tot = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                tot += tl.load(part_ptr + s * MN + tile, mask=omask, other=0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(bias_ptrs, mask=bmask, other=0).to(tl.float32)
            tl.store(o_ptrs, tot.to(o_ptrs.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt, 0)
