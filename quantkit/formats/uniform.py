"""Uniform integer weights: w ≈ scale · (q − zero), per output row and group of K.

- asymmetric: q ∈ [0, 2^b − 1], scale = (max − min)/(2^b − 1), integer zero = round(−min/scale) clamped;
- symmetric:  q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1], scale = absmax/(2^(b−1) − 1), zero = 2^(b−1) implied.

Stored (see docs/format.md): `qweight int32 [ceil(Kp/32)·b, N]` (packing.py), `scales fp16 [groups, N]`,
`zeros uint8 [groups, N]` (asymmetric only). Scales are rounded to fp16 in `fit`, so quantization (RTN and
GPTQ alike) uses exactly the stored values.
"""

from __future__ import annotations

import torch

from quantkit.formats.base import Params, TensorSpec, WeightFormat, register_format
from quantkit.formats.packing import pack_codes, packed_rows, unpack_codes

SCALE_DTYPE = torch.float16


@register_format
class UniformInt(WeightFormat):
    name = "int"
    bits_range = (2, 8)
    min_group_size = 8

    def __init__(self, bits: int, group_size: int | None, symmetric: bool = False):
        super().__init__(bits, group_size)
        self.symmetric = symmetric
        self.qmax = (1 << bits) - 1

    @classmethod
    def example_specs(cls) -> tuple:
        from quantkit.recipe import WeightSpec

        return (WeightSpec("int", 4, 128, False), WeightSpec("int", 3, 32, True), WeightSpec("int", 2, 64, False),
                WeightSpec("int", 8, None, True))

    def packed_tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        n, groups = out_features, self.groups(in_features)
        out = {"qweight": TensorSpec((packed_rows(self.padded_k(in_features), self.bits), n), torch.int32),
               "scales": TensorSpec((groups, n), SCALE_DTYPE)}
        if not self.symmetric:
            out["zeros"] = TensorSpec((groups, n), torch.uint8)
        return out

    def fit(self, w: torch.Tensor) -> Params:
        w = w.float()
        if self.symmetric:
            half = 1 << (self.bits - 1)
            amax = w.abs().amax(dim=-1)
            scale = amax / (half - 1) if self.bits > 1 else amax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            scale = scale.to(SCALE_DTYPE).float()
            return {"scale": scale, "zero": torch.full_like(scale, float(half))}
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        flat = hi <= lo  # constant group: widen to include 0 so the constant is representable
        lo = torch.where(flat, torch.minimum(lo, torch.zeros_like(lo)), lo)
        hi = torch.where(flat, torch.maximum(hi, torch.zeros_like(hi)), hi)
        scale = (hi - lo) / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = scale.to(SCALE_DTYPE).float()
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow guard
        zero = torch.round(-lo / scale).clamp(0, self.qmax)
        return {"scale": scale, "zero": zero}

    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        s, z = params["scale"].unsqueeze(-1), params["zero"].unsqueeze(-1)
        return torch.clamp(torch.round(w.float() / s) + z, 0, self.qmax).to(torch.int64)

    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        s, z = params["scale"].unsqueeze(-1), params["zero"].unsqueeze(-1)
        return (codes.float() - z) * s

    def pack(self, codes: torch.Tensor, params: Params, k: int) -> dict[str, torch.Tensor]:
        out = {
            "qweight": pack_codes(self.pad_codes(codes, k), self.bits),
            "scales": params["scale"].t().to(SCALE_DTYPE).contiguous(),
        }
        if not self.symmetric:
            out["zeros"] = params["zero"].t().to(torch.uint8).contiguous()
        return out

    def unpack(self, packed: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, Params]:
        codes = unpack_codes(packed["qweight"], self.bits, k).to(torch.int64)
        scale = packed["scales"].float().t()
        if self.symmetric:
            zero = torch.full_like(scale, float(1 << (self.bits - 1)))
        else:
            zero = packed["zeros"].float().t()
        return codes, {"scale": scale, "zero": zero}
