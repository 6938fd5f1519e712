"""INT6 symmetric weights (FlexQ): w ≈ scale · q, q ∈ [−31, 31], per output row and group of K.

- scale = absmax / 31 over the group's real weights, rounded to fp16 in `fit` (so RTN and GPTQ quantize
  against the stored value); an all-zero group gets scale 1.0, an fp16 underflow 2^-24.
- `clip_search: mse` (recipe option) instead picks, per group, scale = fp16(c · absmax / 31) with c on a grid
  from 1 down to `clip_min` (`clip_steps` values, c = 1 first): the c whose quantized group has the smallest
  squared error Σ_j (w_j − ŵ_j)². `clip_search: mse_h` weighs it, Σ_j h_j (w_j − ŵ_j)², with h_j = GPTQ's
  Hessian diagonal (mean x_j² of input channel j over the calibration tokens; RTN has none: unweighted).
  c = 1 is the plain rule and wins ties, so the search never has a larger group error than it. Only the scale
  values change: codes, layout and kernels are the same. Off by default: on the demo model neither helps
  GPTQ (README, FlexQ, layer-local measurements; mse_h even raises the output error by 11%).
- codes (the `WeightFormat` interface) are offset-binary: c = q + 32 ∈ [1, 63] (the `int` format's symmetric
  convention, zero point 32 implied); dequantize is (c − 32) · scale. The range is symmetric ±31 as in FlexQ:
  code 0 (q = −32) is never produced, and it is the padding code.

Stored (docs/format.md, section `int6`): `qweight uint8 [N, ceil(Kp/128)·96]` and `scales fp16 [groups, N]`.
Each output row's codes are contiguous along K, cut into blocks of 128 (96 bytes each): the codes c[0..128) of
a block form four planes of 32 (plane j = c[32j .. 32j+32)); byte 32·r + i of the block (r ∈ {0, 1, 2}) holds
plane r's code in its low 6 bits and two bits of plane 3's code in its top 2 bits:

    qweight[n, 96·b + 32·r + i] = c[32·r + i] | ((c[96 + i] >> 2r) & 3) << 6          i ∈ [0, 32)

so a kernel unpacks three [BLOCK_N, 32] byte tiles with masks and shifts alone into four K-contiguous code
tiles (no interleaving). K-contiguous rows (not N-contiguous as in `int`) because int8 tensor cores want the
weight tile K-major in shared memory: the unpacked bytes are then stored 16 at a time, not one by one (the
N-contiguous variant of this layout measured 3.4x slower than cuBLAS bf16 at M = 4096 on an H200 for that
reason: 64 byte-wide shared stores per thread and block).
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats import clip
from quantkit.formats.base import Params, TensorSpec, WeightFormat, register_format

SCALE_DTYPE = torch.float16
QMAX = 31
ZERO = 32  # offset of the codes: c = q + 32
BLOCK = 128  # K values per packing block
BLOCK_BYTES = 96  # bytes per block and column

def pack_int6(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in [0, 64) → `uint8 [N, ceil(K/128)·96]` (K zero-padded to whole 128-blocks)."""
    n, k = codes.shape
    if codes.numel() and (codes.min() < 0 or codes.max() > 63):
        raise ValueError("int6 codes must be in [0, 64)")
    blocks = -(-k // BLOCK)
    c = torch.zeros(n, blocks * BLOCK, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    c = c.view(n, blocks, 4, 32)
    hi = c[:, :, 3]  # plane 3, spread over the top bits of planes 0..2
    rows = [c[:, :, r] | (((hi >> (2 * r)) & 3) << 6) for r in range(3)]
    out = torch.stack(rows, dim=2).reshape(n, blocks * BLOCK_BYTES)  # [N, blocks·96]
    return out.to(torch.uint8).contiguous()


def unpack_int6(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_int6`: `uint8 [N, ceil(K/128)·96]` → codes `uint8 [N, k]`."""
    n, cols = qweight.shape
    blocks = cols // BLOCK_BYTES
    if cols != blocks * BLOCK_BYTES or blocks * BLOCK < k:
        raise ValueError(f"int6 qweight of {cols} bytes per row does not hold K={k} codes")
    b = qweight.to(torch.int32).view(n, blocks, 3, 32)
    lo = b & 63
    hi = ((b[:, :, 0] >> 6) | ((b[:, :, 1] >> 6) << 2) | ((b[:, :, 2] >> 6) << 4)).unsqueeze(2)
    c = torch.cat([lo, hi], dim=2).reshape(n, blocks * BLOCK)
    return c[:, :k].to(torch.uint8)


@register_format
class Int6(WeightFormat):
    """INT6 symmetric (always: `symmetric` is accepted for the recipe interface and ignored)."""

    name = "int6"
    bits_range = (6, 6)
    min_group_size = 16
    recipe_keys = clip.RECIPE_KEYS

    def __init__(self, bits: int = 6, group_size: int | None = 128, symmetric: bool = True,
                 clip_search: str = "none", clip_min: float = 0.7, clip_steps: int = 31):
        if bits != 6:
            raise QuantkitError(f"format 'int6' needs bits = 6, got {bits}")
        if group_size is not None and group_size < 16:
            raise QuantkitError(f"format 'int6' needs group_size >= 16 or per-channel, got {group_size}")
        clip.check_options({"clip_search": clip_search, "clip_min": clip_min, "clip_steps": clip_steps})
        super().__init__(6, group_size)
        self.symmetric = True
        self.clip_search = clip_search
        self.clip_grid = clip.grid(clip_min, clip_steps)
        # GPTQ hands `fit` its Hessian diagonal as `importance` when this is set (see methods/gptq.py)
        self.fit_uses_importance = clip_search == "mse_h"

    @classmethod
    def check_options(cls, options: dict, where: str) -> None:
        clip.check_options(options, where)

    @classmethod
    def example_specs(cls) -> tuple:
        from quantkit.recipe import WeightSpec

        return (WeightSpec("int6", 6, 128, True), WeightSpec("int6", 6, 32, True, (("clip_search", "mse"),)),
                WeightSpec("int6", 6, None, True))

    def packed_tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        n, blocks = out_features, -(-self.padded_k(in_features) // BLOCK)
        return {"qweight": TensorSpec((n, blocks * BLOCK_BYTES), torch.uint8),
                "scales": TensorSpec((self.groups(in_features), n), SCALE_DTYPE)}

    @staticmethod
    def _scale(amax: torch.Tensor) -> torch.Tensor:
        """amax [...] → scale = amax / 31 rounded to fp16 (zero groups 1.0, fp16 underflow 2^-24)."""
        scale = amax / QMAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        fmax = torch.finfo(SCALE_DTYPE).max
        scale = scale.clamp(max=fmax).to(SCALE_DTYPE).float()
        return torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow guard

    def group_error(self, w: torch.Tensor, scale: torch.Tensor,
                    importance: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_j h_j (w_j − ŵ_j)² over the last dim of w [..., g] quantized with scale [...] (h_j = 1 when
        `importance` [g] or [..., g] is None)."""
        s = scale.unsqueeze(-1)
        d = w - torch.clamp(torch.round(w / s), -QMAX, QMAX) * s
        d = d * d
        return (d * importance if importance is not None else d).sum(dim=-1)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        """w [..., g] → {"scale": [...]} fp16-exact; `importance` [g] or [..., g] weights the clip search."""
        w = w.float()
        amax = w.abs().amax(dim=-1)
        scale = self._scale(amax)
        if self.clip_search == "none" or w.shape[-1] == 0 or len(self.clip_grid) < 2:
            return {"scale": scale}
        if importance is not None and self.fit_uses_importance:
            importance = importance.to(w.device, torch.float32)
        else:
            importance = None
        return clip.search(self.clip_grid, lambda c: {"scale": self._scale(amax * c)},
                           lambda p: self.group_error(w, p["scale"], importance))

    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        s = params["scale"].unsqueeze(-1)
        return (torch.clamp(torch.round(w.float() / s), -QMAX, QMAX) + ZERO).to(torch.int64)

    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return (codes.float() - ZERO) * params["scale"].unsqueeze(-1)

    def pack(self, codes: torch.Tensor, params: Params, k: int) -> dict[str, torch.Tensor]:
        return {
            "qweight": pack_int6(self.pad_codes(codes, k)),
            "scales": params["scale"].t().to(SCALE_DTYPE).contiguous(),
        }

    def unpack(self, packed: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, Params]:
        codes = unpack_int6(packed["qweight"], k).to(torch.int64)
        return codes, {"scale": packed["scales"].float().t()}
