"""Uniform integer weights: w ≈ scale · (q − zero), per output row and group of K.

- asymmetric: q ∈ [0, 2^b − 1], scale = (max − min)/(2^b − 1), integer zero = round(−min/scale) clamped;
- symmetric:  q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1], scale = absmax/(2^(b−1) − 1), zero = 2^(b−1) implied.

Stored (see docs/format.md): `qweight int32 [ceil(Kp/32)·b, N]` (packing.py), `scales fp16 [groups, N]`,
`zeros uint8 [groups, N]` (asymmetric only). Scales are rounded to fp16 in `fit`, so quantization (RTN and
GPTQ alike) uses exactly the stored values.

`clip_search: mse` (recipe option, as for int6) shrinks each group's range by c on a grid from 1 down to
`clip_min` (`clip_steps` values; asymmetric: [c·min, c·max], symmetric: c·absmax) and keeps the c whose
quantized group has the smallest squared error Σ_j (w_j − ŵ_j)²; `mse_h` weighs it by GPTQ's Hessian diagonal
h_j. c = 1 is the plain rule and wins ties. Only scales and zeros change: codes, layout and kernels are the same.
"""

from __future__ import annotations

import torch

from quantkit.formats import clip
from quantkit.formats.base import Params, TensorSpec, WeightFormat, register_format
from quantkit.formats.packing import pack_codes, packed_rows, unpack_codes

SCALE_DTYPE = torch.float16


@register_format
class UniformInt(WeightFormat):
    name = "int"
    bits_range = (2, 8)
    min_group_size = 8
    recipe_keys = clip.RECIPE_KEYS

    def __init__(self, bits: int, group_size: int | None, symmetric: bool = False, clip_search: str = "none",
                 clip_min: float = 0.7, clip_steps: int = 31):
        clip.check_options({"clip_search": clip_search, "clip_min": clip_min, "clip_steps": clip_steps},
                           fmt="int")
        super().__init__(bits, group_size)
        self.symmetric = symmetric
        self.qmax = (1 << bits) - 1
        self.clip_search = clip_search
        self.clip_grid = clip.grid(clip_min, clip_steps)
        self.fit_uses_importance = clip_search == "mse_h"  # GPTQ then hands `fit` its Hessian diagonal

    @classmethod
    def check_options(cls, options: dict, where: str) -> None:
        clip.check_options(options, where, fmt="int")

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

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        """w [..., g] → {"scale", "zero"} [...] (scale fp16-exact); `importance` [g] or [..., g] weights the
        clip search (`mse_h`)."""
        w = w.float()
        if self.clip_search == "none" or w.shape[-1] == 0 or len(self.clip_grid) < 2:
            return self._fit_range(w, 1.0)
        imp = importance.to(w.device, torch.float32) if importance is not None and self.fit_uses_importance \
            else None
        return clip.search(self.clip_grid, lambda c: self._fit_range(w, c), lambda q: self._group_error(w, q, imp))

    def _group_error(self, w: torch.Tensor, p: Params, importance: torch.Tensor | None) -> torch.Tensor:
        d = w - self.dequantize(self.quantize(w, p), p)
        d = d * d
        return (d * importance if importance is not None else d).sum(dim=-1)

    def _fit_range(self, w: torch.Tensor, c: float) -> Params:
        """The plain rule on the group's range shrunk by c (c = 1: min/max, absmax)."""
        if self.symmetric:
            half = 1 << (self.bits - 1)
            amax = w.abs().amax(dim=-1) * c
            scale = amax / (half - 1) if self.bits > 1 else amax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            scale = scale.to(SCALE_DTYPE).float()
            return {"scale": scale, "zero": torch.full_like(scale, float(half))}
        lo, hi = w.amin(dim=-1) * c, w.amax(dim=-1) * c
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
