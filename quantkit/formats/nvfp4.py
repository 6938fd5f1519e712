"""NVFP4: e2m1 elements, one e4m3 scale per block of 16 along K, one fp32 scale per tensor. Exact, pure torch.

Numerics (what every function here, the Triton kernels and docs/format.md agree on, bit for bit):

- e2m1 code (4 bits, sign in bit 3): magnitudes by code 0..7 = {0, 0.5, 1, 1.5, 2, 3, 4, 6}; codes 8..15 are
  the negatives (code 8 = −0 decodes to 0; the quantizer never emits it).
- tensor scale  S = amax(|x|) / 2688  (2688 = 448·6, one fp32 division; S = 1.0 when amax = 0). |x|, not the
  signed max (the reference repo's bug, see METHODS.md).
- block scale   bs = e4m3(min(block_amax / 6 / S, 448))  (two correctly rounded fp32 divisions, in that order;
  e4m3 rounding is round-to-nearest-even, subnormal e4m3 values 2^-9·{1..7} are legal; stored as
  float8_e4m3fn). A block whose scale rounds to 0 gets all-zero codes.
- element code  q = e2m1_rne(x / (bs·S))  with the product bs·S rounded to fp32 once, then one correctly
  rounded division, then round-to-nearest with **ties to even code** (the e2m1 value whose mantissa bit is
  0): 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4; |v| > 6 saturates to ±6. Values that round to 0
  get code 0 (+0), whatever their sign.
- dequantization  x̂ = (e2m1(q) · bs) · S  in fp32: the first product is exact (≤ 6 significant bits), the
  second is one rounding. Fake quantization casts x̂ to the input dtype.

Layout: codes pack two per byte along K, the even element in the LOW nibble (compressed-tensors
convention): packed uint8 [..., Kp/2], block scales float8_e4m3fn [..., Kp/16], tensor scale fp32. K that is
not a multiple of 16 is zero-padded to Kp = ceil(K/16)·16; padding codes are 0 and never contribute.
NaN/Inf input raises ValueError.

Weight format `nvfp4` (`NVFP4Format`, for RTN / GPTQ weight-only use, `nvfp4-w4a16`): group size fixed at
16, bits 4. The tensor scale is a whole-matrix quantity but the WeightFormat API fits per group, so a
format object is *bound* to a tensor scale: `fmt.prepare(w)` returns a copy bound to S = amax(|w|)/2688 of
the whole matrix. `quantize_rtn` binds itself automatically; GPTQ needs the caller to pass a bound format
(`gptq_quantize(w, H, fmt.prepare(w))`): groups are then fitted against exactly the stored S and e4m3 scales
(GPTQ's updated weights may exceed the original amax; their block scales saturate at 448 and codes at ±6).
`fmt.bind([w_q, w_k, w_v])` binds one S to several matrices (S = their largest amax / 2688): the pipeline
binds the Linears of one sub-block (those that read one input, which serving engines fuse into one matrix
with one global scale) this way, so q/k/v and gate/up share a tensor scale.
An unbound format fits S from whatever tensor `fit` is given (used only for shape probes); `pack` refuses
groups fitted with different tensor scales. With `scale_search: mse` the weight format picks each block scale
by search instead of the block-scale rule above (any e4m3 value is a legal scale; everything else, including
the element rounding, is as above).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import Params, RecipeKey, TensorSpec, WeightFormat, register_format

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SCALE_DTYPE = torch.float8_e4m3fn
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# RNE decision points between consecutive magnitudes; ">" where the lower code is even, ">=" where odd
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

SCALE_SEARCHES = ("none", "mse")  # weights' block-scale rule: the plain amax/6 rule, or the searched one
# e4m3 steps from the plain block scale tried by the search: −2 (≈ ×0.8) to +6 (≈ ×1.5..1.75, which puts the
# block max on e2m1 4 instead of 6; one e4m3 step is ×1.07..1.125). On Gaussian and on the demo model's weights
# a ±8 search never picked anything outside this range.
SEARCH_OFFSETS = (-2, -1, 1, 2, 3, 4, 5, 6)


class NVFP4Tensor(NamedTuple):
    """A packed NVFP4 tensor: packed uint8 [..., Kp/2], block_scales float8_e4m3fn [..., Kp/16],
    tensor_scale fp32 scalar (0-dim) tensor."""

    packed: torch.Tensor
    block_scales: torch.Tensor
    tensor_scale: torch.Tensor


def e2m1_table(device: torch.device | str | None = None) -> torch.Tensor:
    """float32 [16]: value of each e2m1 code."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def _check_finite(x: torch.Tensor, what: str = "input") -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"NVFP4 {what} holds NaN or Inf values; quantize finite tensors only")


def compute_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """fp32 0-dim tensor S = amax(|x|) / (448·6), or 1.0 when x is all zero (or empty)."""
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    return torch.where(amax > 0, amax / (E4M3_MAX * E2M1_MAX), torch.ones_like(amax))


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """float32 ≥ 0 → nearest e4m3 value (ties to even, saturating at 448), as float32."""
    return v.float().clamp(max=E4M3_MAX).to(SCALE_DTYPE).float()


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """float32 (already divided by the scale) → int64 e2m1 codes, round-to-nearest ties-to-even, saturating."""
    a = v.abs()
    mag = torch.zeros(v.shape, dtype=torch.int64, device=v.device)
    for t, inclusive in _THRESHOLDS:
        mag += (a >= t) if inclusive else (a > t)
    return torch.where((v < 0) & (mag > 0), mag + 8, mag)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """int codes in [0, 16) → float32 values."""
    return e2m1_table(codes.device)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] (K even) in [0, 16) → uint8 [..., K/2], element 2j in the low nibble of byte j."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even number of codes along the last dim, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] → int64 codes [..., K]."""
    p = packed.to(torch.int64)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _pad_blocks(x: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    kp = -(-k // BLOCK) * BLOCK
    return torch.nn.functional.pad(x, (0, kp - k)) if kp > k else x


def _block_scales(blocks: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """blocks [..., 16] float32, s fp32 scalar → e4m3-exact block scales float32 [...]."""
    amax = blocks.abs().amax(dim=-1)
    return round_to_e4m3(amax / E2M1_MAX / s)


def _encode_blocks(blocks: torch.Tensor, bs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """blocks [..., 16], bs [...] (e4m3-exact, float32), s scalar → codes int64 [..., 16]."""
    denom = (bs * s).unsqueeze(-1)
    v = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
    return e2m1_encode(v)


def _e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """|v| float32 → the magnitude e2m1_encode rounds it to, as float32: the search's fast path (no int64
    codes, no table gather, ~2.5× faster). The e2m1 grid is uniform within [0, 2), [2, 4), [4, 6] (steps 0.5,
    1, 2), so rounding to the step with torch.round (ties to even) is the same ties-to-even-code rule: the
    even multiples of each step are the codes with mantissa bit 0. Powers of two keep a/step exact."""
    step = torch.where(a < 2, 0.5, 1.0)
    step = torch.where(a >= 4, 2.0, step)
    return (a / step).round_().mul_(step).clamp_(max=E2M1_MAX)


def _block_sq_error(blocks: torch.Tensor, bs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction error [...] of each block quantized with scales bs, computed with exactly the
    arithmetic of quantize / dequantize ((e2m1 · bs) · S, sign apart), so the error compared is the error that
    gets stored."""
    denom = (bs * s).unsqueeze(-1)
    a = blocks.abs()
    mag = _e2m1_magnitude(torch.where(denom > 0, a / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0))
    return ((mag * bs.unsqueeze(-1)) * s - a).square().sum(dim=-1)


def _search_block_scales(blocks: torch.Tensor, s: torch.Tensor, offsets=SEARCH_OFFSETS) -> torch.Tensor:
    """blocks [..., g] float32, s fp32 scalar → e4m3-exact block scales float32 [...] that minimize each block's
    squared reconstruction error among the plain rule's scale and its e4m3 neighbours `offsets` steps away.

    Why: amax/6 maps the block's largest entry exactly onto ±6, the right choice for that entry but not for
    the other 15, which e2m1 leaves a coarse grid (the gap from 4 to 6 is a third of the range). A scale about
    1.5× larger puts the maximum on 4 instead (still exact when it is a multiple of the scale, else slightly
    off) and the grid 0..4 spans the rest more evenly; a slightly smaller one clips the maximum a little and
    refines the rest. Which wins depends on the block, so for weights (fixed, quantized once) the best of a
    few candidates is picked; activations keep the plain rule (the runtime kernels compute it). Ties keep the
    plain scale, so the result is never worse than it, block by block. Neighbours step through the e4m3 bit
    patterns (codes 1..126 are the values 2^-9..448 in increasing order), so every candidate is
    representable by construction. All blocks at once, one candidate at a time."""
    best = _block_scales(blocks, s)
    best_err = _block_sq_error(blocks, best, s)
    code = best.to(SCALE_DTYPE).view(torch.uint8).int()
    for d in (o for o in offsets if o):
        cand = (code + d).clamp(1, 126).to(torch.uint8).view(SCALE_DTYPE).float()
        err = _block_sq_error(blocks, cand, s)
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return best


def nvfp4_quantize(x: torch.Tensor, tensor_scale: torch.Tensor | float | None = None) -> NVFP4Tensor:
    """x [..., K] float → NVFP4Tensor(packed uint8 [..., Kp/2], block_scales e4m3 [..., Kp/16], S fp32 []).

    tensor_scale: None = computed from x (amax(|x|)/2688); otherwise used as given (rounded to fp32)."""
    _check_finite(x)
    xf = x.detach().float()
    s = compute_tensor_scale(xf) if tensor_scale is None else torch.as_tensor(
        tensor_scale, dtype=torch.float32, device=x.device).reshape(())
    if not (torch.isfinite(s) and s > 0):
        raise ValueError(f"NVFP4 tensor scale must be finite and > 0, got {float(s)}")
    blocks = _pad_blocks(xf).reshape(*xf.shape[:-1], -1, BLOCK)
    bs = _block_scales(blocks, s)
    codes = _encode_blocks(blocks, bs, s).reshape(*xf.shape[:-1], -1)
    return NVFP4Tensor(pack_e2m1(codes), bs.to(SCALE_DTYPE), s)


def nvfp4_dequantize(packed: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor | float,
                     k: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `nvfp4_quantize`: → [..., k] in `dtype` (k = None: all Kp columns), computed in fp32 as
    (e2m1 · e4m3) · S and then cast."""
    codes = unpack_e2m1(packed)
    vals = e2m1_decode(codes).reshape(*codes.shape[:-1], -1, BLOCK)
    s = torch.as_tensor(tensor_scale, dtype=torch.float32, device=packed.device)
    out = ((vals * block_scales.float().unsqueeze(-1)) * s).reshape(codes.shape)
    return (out if k is None else out[..., :k]).to(dtype)


def nvfp4_fake_quant(x: torch.Tensor, tensor_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Quantize-dequantize: same shape and dtype as x."""
    q = nvfp4_quantize(x, tensor_scale)
    return nvfp4_dequantize(q.packed, q.block_scales, q.tensor_scale, x.shape[-1], x.dtype)


# ----------------------------------------------------------------------------------------------------------
# weight format


@register_format
class NVFP4Format(WeightFormat):
    """`nvfp4` weights for the RTN / GPTQ pipeline. Codes are e2m1 codes in [0, 16); params per group of 16:
    {"block_scale": e4m3-exact float32, "tensor_scale": float32, the same value in every group}.

    `scale_search` (recipe key): "none" = the plain rule bs = e4m3(amax/6/S) of the module docstring; "mse" =
    per block the e4m3 scale near it with the smallest squared error (`_search_block_scales`). Only how the
    scales are chosen differs: the stored layout and the element rounding are the same, so kernels and
    checkpoints are unaffected.

    Stored: `qweight uint8 [N, Kp/2]` (low nibble = even column), `block_scales float8_e4m3fn [N, Kp/16]`,
    `tensor_scale float32 [1]`."""

    name = "nvfp4"
    bits_range = (4, 4)
    min_group_size = BLOCK
    recipe_keys = (RecipeKey("scale_search", "none", choices=SCALE_SEARCHES,
                             doc="block-scale rule: none = e4m3(amax/6/S), mse = searched"),)

    def __init__(self, bits: int = 4, group_size: int | None = BLOCK, symmetric: bool = True,
                 tensor_scale: float | None = None, scale_search: str = "none"):
        if bits != 4:
            raise QuantkitError(f"format 'nvfp4' is 4-bit (e2m1), got bits = {bits}")
        if group_size != BLOCK:
            raise QuantkitError(f"format 'nvfp4' has a fixed group size of 16, got {group_size}")
        if scale_search not in SCALE_SEARCHES:
            raise QuantkitError(f"format 'nvfp4': scale_search = {scale_search!r} is unknown; use one of "
                                f"{', '.join(SCALE_SEARCHES)}")
        super().__init__(bits, group_size)
        self.symmetric = True  # e2m1 is sign-magnitude; accepted for interface symmetry
        self.tensor_scale = None if tensor_scale is None else float(tensor_scale)
        self.scale_search = scale_search

    @classmethod
    def example_specs(cls) -> tuple:
        from quantkit.recipe import WeightSpec

        return (WeightSpec("nvfp4", 4, BLOCK, True), WeightSpec("nvfp4", 4, BLOCK, True, (("scale_search", "mse"),)))

    def packed_tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        n, kp = out_features, self.padded_k(in_features)
        return {"qweight": TensorSpec((n, kp // 2), torch.uint8),
                "block_scales": TensorSpec((n, self.groups(in_features)), SCALE_DTYPE),
                "tensor_scale": TensorSpec((1,), torch.float32)}

    def prepare(self, w: torch.Tensor) -> NVFP4Format:
        """A copy bound to the tensor scale of the whole weight matrix w [N, K] (S = amax(|w|)/2688)."""
        return self.bind([w])

    def bind(self, weights) -> NVFP4Format:
        """A copy bound to one tensor scale shared by `weights` (the matrices a serving engine fuses into one,
        e.g. q/k/v): S = max over them of amax(|w|) / 2688, so the fused matrix has the S of its own amax.
        One matrix gives `prepare`'s S bit for bit."""
        amax = None
        for w in weights:
            _check_finite(w, "weight")
            a = w.detach().abs().amax().float() if w.numel() else torch.zeros((), device=w.device)
            amax = a if amax is None else torch.maximum(amax, a.to(amax.device))
        if amax is None:
            raise ValueError("NVFP4Format.bind needs at least one weight matrix")
        return type(self)(self.bits, self.group_size, tensor_scale=float(compute_tensor_scale(amax)),
                          scale_search=self.scale_search)

    def _scale(self, w: torch.Tensor) -> torch.Tensor:
        if self.tensor_scale is not None:
            return torch.tensor(self.tensor_scale, dtype=torch.float32, device=w.device)
        return compute_tensor_scale(w.float())

    def fit(self, w: torch.Tensor) -> Params:
        w = w.float()
        s = self._scale(w)
        bs = _search_block_scales(w, s) if self.scale_search == "mse" else _block_scales(w, s)
        return {"block_scale": bs, "tensor_scale": torch.full_like(bs, float(s))}

    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        s = params["tensor_scale"].unsqueeze(-1)
        denom = params["block_scale"].unsqueeze(-1) * s
        v = torch.where(denom > 0, w.float() / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
        return e2m1_encode(v)

    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return (e2m1_decode(codes) * params["block_scale"].unsqueeze(-1)) * params["tensor_scale"].unsqueeze(-1)

    def quantize_rtn(self, w: torch.Tensor) -> tuple[torch.Tensor, Params]:
        fmt = self if self.tensor_scale is not None else self.prepare(w)
        return WeightFormat.quantize_rtn(fmt, w)

    def pack(self, codes: torch.Tensor, params: Params, k: int) -> dict[str, torch.Tensor]:
        ts = params["tensor_scale"]
        if ts.numel() and not bool((ts == ts.reshape(-1)[0]).all()):
            raise QuantkitError("format 'nvfp4': groups were fitted with different tensor scales; quantize with "
                                "a format bound to the whole matrix (fmt.prepare(weight)) before GPTQ")
        s = ts.reshape(-1)[0] if ts.numel() else torch.ones((), device=codes.device)
        return {
            "qweight": pack_e2m1(self.pad_codes(codes, k)),
            "block_scales": params["block_scale"].to(SCALE_DTYPE).contiguous(),
            "tensor_scale": s.reshape(1).float().clone(),
        }

    def unpack(self, packed: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, Params]:
        codes = unpack_e2m1(packed["qweight"])[:, :k]
        bs = packed["block_scales"].float()
        return codes, {"block_scale": bs, "tensor_scale": packed["tensor_scale"].float().reshape(1, 1).expand_as(bs)}


__all__ = ["BLOCK", "E2M1_MAGNITUDES", "SCALE_SEARCHES", "NVFP4Format", "NVFP4Tensor", "compute_tensor_scale",
           "e2m1_decode", "e2m1_encode", "e2m1_table", "nvfp4_dequantize", "nvfp4_fake_quant", "nvfp4_quantize",
           "pack_e2m1", "round_to_e4m3", "unpack_e2m1"]
