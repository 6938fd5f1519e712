"""The weight-format interface every quantization method (RTN, GPTQ, ...) works through.

A format turns float weights into integer codes plus per-group parameters and back, exactly:

    params = fmt.fit(w)                 # w: [..., g] float32, the weights of one group per leading index
    codes  = fmt.quantize(w, params)    # [..., c] int64, any c columns of that group
    w_hat  = fmt.dequantize(codes, params)

`params` is a dict of float32 tensors whose leading dims match `w`'s (one entry per group). Parameters are
rounded to their storage dtype inside `fit`, so the values GPTQ quantizes against are the values saved.
`pack` / `unpack` convert (codes [N, K], params stacked per group [N, G, ...]) to the tensors stored in a
checkpoint and held by the runtime module. Group-size padding rule (docs/format.md): groups run along K from
column 0; when the group size does not divide K, the last group is short. Parameters are fitted on its real
columns only; in packed form K is padded with zero codes up to a whole number of groups (and of 32-code
runs) and consumers pad activations with zeros, so padding never contributes to a product.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

Params = dict[str, torch.Tensor]


class WeightFormat(ABC):
    name: ClassVar[str]

    def __init__(self, bits: int, group_size: int | None):
        self.bits = bits
        self.group_size = group_size  # None = one group per output row (per-channel)

    def groups(self, k: int) -> int:
        g = self.group_size or k
        return -(-k // g)

    def padded_k(self, k: int) -> int:
        g = self.group_size or k
        return self.groups(k) * g

    def group_bounds(self, k: int) -> list[tuple[int, int]]:
        g = self.group_size or k
        return [(s, min(s + g, k)) for s in range(0, k, g)]

    def pad_codes(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """Zero-pad codes [N, K] along K to a whole number of groups (the packed K)."""
        kp = self.padded_k(k)
        return torch.nn.functional.pad(codes, (0, kp - codes.shape[1])) if kp > codes.shape[1] else codes

    # fit / quantize / dequantize work on any leading dims: w [..., g] with params [..., (extra)]
    @abstractmethod
    def fit(self, w: torch.Tensor) -> Params: ...

    @abstractmethod
    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor: ...

    @abstractmethod
    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor: ...

    @abstractmethod
    def pack(self, codes: torch.Tensor, params: Params, k: int) -> dict[str, torch.Tensor]:
        """codes: [N, K] int, params: {name: [N, groups, ...]} → tensors to store."""

    @abstractmethod
    def unpack(self, packed: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, Params]: ...

    # ---- whole-matrix helpers built from the per-group primitives ----

    def quantize_rtn(self, w: torch.Tensor) -> tuple[torch.Tensor, Params]:
        """Round-to-nearest over all groups at once. w: [N, K] → codes [N, K], params [N, groups, ...]."""
        n, k = w.shape
        g = self.group_size or k
        full = k // g
        codes, parts = [], []
        if full:
            wf = w[:, : full * g].reshape(n, full, g).float()
            p = self.fit(wf)
            codes.append(self.quantize(wf, p).reshape(n, full * g))
            parts.append(p)
        if full * g < k:  # the short last group is fitted on its real columns only
            wl = w[:, full * g :].unsqueeze(1).float()
            p = self.fit(wl)
            codes.append(self.quantize(wl, p).reshape(n, k - full * g))
            parts.append(p)
        params = {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}
        return torch.cat(codes, dim=1), params

    def dequantize_grouped(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """codes [N, K] with params [N, groups, ...] → float32 [N, K] (all groups in one call)."""
        n, k = codes.shape
        g = self.group_size or k
        c = self.pad_codes(codes, k).reshape(n, self.groups(k), g)
        return self.dequantize(c, params).reshape(n, -1)[:, :k]

    def bits_per_weight(self, k: int, n: int) -> float:
        """Stored bits per real weight, parameters included (from the packed tensors' sizes)."""
        codes = torch.zeros(n, k, dtype=torch.int64)
        params = self.fit(torch.zeros(n, self.groups(k), self.group_size or k))
        packed = self.pack(codes, params, k)
        return sum(t.numel() * t.element_size() * 8 for t in packed.values()) / (n * k)


FORMATS: dict[str, type[WeightFormat]] = {}


def register_format(cls: type[WeightFormat]) -> type[WeightFormat]:
    FORMATS[cls.name] = cls
    return cls
