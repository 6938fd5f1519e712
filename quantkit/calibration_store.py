"""Calibration activations that stay on the compute device while they fit and spill to disk past a budget.

The sequential pipeline keeps, per decoder layer, the layer's inputs and outputs for every calibration
sample (`nsamples` tensors of `[1, seq_len, hidden]`). On a 70B model with 128 x 2048 samples that is
128 · 2048 · 8192 · 2 B = 4 GiB per copy, so `quantkit.offload` stores them in an `ActivationStore`:

- samples go to `device` (VRAM on a GPU, RAM on CPU) while the shared `ActivationBudget` has room;
- past the budget they are appended to chunk files of raw bytes under the offload folder (at most
  `CHUNK_BYTES` each) and read back through `numpy.memmap` one sample at a time, so only the sample in use
  is resident; the files are deleted when the store is closed.

Reading a sample back returns exactly the bytes written (any dtype, bf16 included): whether a sample was
spilled never changes a result.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError

CHUNK_BYTES = 256 * 1024**2

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int | float) -> int:
    """'4GB' -> 4_000_000_000, '512MiB' -> 536_870_912, 1000 -> 1000 (bytes)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise QuantkitError(f"cannot read size '{text}': use a number with a unit, e.g. 4GB, 512MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


class ActivationBudget:
    """Bytes of activations allowed on the compute device, shared by the stores of one run."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.used = 0
        self.peak = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.max_bytes:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


@dataclass(frozen=True)
class _Spilled:
    path: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class ActivationStore:
    """An append-only sequence of tensors (one per calibration sample); `store[i]` returns sample i.

    Tensors kept in budget live on `device`; the rest are spilled to `spill_dir/<name>-<chunk>.bin`.
    A sample read back from disk is a fresh CPU tensor (the caller moves it where it needs it).
    """

    def __init__(self, device: torch.device, budget: ActivationBudget, spill_dir: Path, name: str):
        self.device = torch.device(device)
        self.budget = budget
        self.spill_dir = Path(spill_dir)
        self.name = name
        self._items: list[torch.Tensor | _Spilled] = []
        self._held = 0
        self._chunks: list[Path] = []
        self._chunk_fill = 0
        self.spilled_bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def append(self, x: torch.Tensor) -> None:
        x = x.detach()
        nbytes = x.numel() * x.element_size()
        if self.budget.take(nbytes):
            self._items.append(x.to(self.device))
            self._held += nbytes
            return
        if not self._chunks or self._chunk_fill + nbytes > CHUNK_BYTES:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._chunks.append(self.spill_dir / f"{self.name}-{len(self._chunks):05d}.bin")
            self._chunk_fill = 0
        path = self._chunks[-1]
        data = x.to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        try:
            with open(path, "ab") as f:
                data.tofile(f)
        except OSError as e:
            raise QuantkitError(f"could not spill activations to '{path}' ({e.strerror or e}); free space there "
                                f"or raise --max-activation-memory, then rerun the same command") from None
        self._items.append(_Spilled(path, self._chunk_fill, nbytes, tuple(x.shape), x.dtype))
        self._chunk_fill += nbytes
        self.spilled_bytes += nbytes

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if isinstance(item, torch.Tensor):
            return item
        mm = np.memmap(item.path, dtype=np.uint8, mode="r", offset=item.offset, shape=(item.nbytes,))
        t = torch.from_numpy(np.array(mm))  # a private copy: the mapping is dropped right away
        del mm
        return t.view(item.dtype).reshape(item.shape)

    def close(self) -> None:
        """Free the device copies (returning their budget) and delete the spill files."""
        self._items.clear()
        self.budget.give(self._held)
        self._held = 0
        for p in self._chunks:
            p.unlink(missing_ok=True)
        self._chunks.clear()


def write_samples(store, path: Path) -> None:
    """Write every sample of `store` (or a list) to `path` as raw bytes, atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for i in range(len(store)):
            store[i].to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_samples(path: Path, n: int, shape: tuple[int, ...], dtype: torch.dtype):
    """Yield the `n` samples `write_samples` wrote to `path`, one at a time (memory-mapped)."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    size = path.stat().st_size
    if size != n * nbytes:
        raise QuantkitError(f"saved activations '{path}' hold {size} bytes, expected {n * nbytes}; the resume "
                            f"state is damaged: delete the .partial folder to start over")
    for i in range(n):
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=i * nbytes, shape=(nbytes,))
        t = torch.from_numpy(np.array(mm))
        del mm
        yield t.view(dtype).reshape(shape)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
