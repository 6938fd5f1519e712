"""HLQ (ELUTQ) weights: per output row and group of K, n bit-planes with one learned scale per plane.

    w ≈ z + Σ_{b=0}^{n-1} s_b · β_b,   β_b ∈ {0, 1},   code c = Σ_b β_b · 2^b ∈ [0, 2^n)

n ∈ {2, 3, 4}; (s_0..s_{n-1}, z) are free floats per group (uniform asymmetric is the special case
s_b = s · 2^b). Stored (see docs/format.md, section HLQ): `qweight int32 [ceil(Kp/32)·n, N]` (packing.py),
`scales fp16 [groups, n, N]` (plane b's scale at [g, b, :]), `offsets fp16 [groups, N]`. Parameters are
rounded to fp16 inside `fit`, so RTN and GPTQ quantize against exactly the stored values.

Quantization picks, per weight, the nearest of the 2^n representable values (all combinations are searched,
so negative or unsorted scales are fine; ties go to the lowest code). Dequantization evaluates the same
value table, in fp32, as `z + s_0·β_0 + s_1·β_1 + ...` summed in increasing b.

Fitting (`fit`, vectorized over every leading dim):
- `als` (default): alternating least squares from the uniform asymmetric init. Each iteration re-picks the
  codes, then solves the (n+1)×(n+1) normal equations of [bits | 1]·[s; z] ≈ w per group, with a tiny ridge
  pulling towards the previous estimate (so a plane that is all 0 or all 1 keeps its scale instead of giving
  NaN). The best iterate by squared error (evaluated with fp16-rounded parameters) is kept, so the result is
  never worse than the init.
- `adam`: Adam (lr 1e-3) on (s, z) in range-normalized units, codes re-picked every step, best kept.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import Params, RecipeKey, TensorSpec, WeightFormat, register_format
from quantkit.formats.packing import pack_codes, packed_rows, unpack_codes

PARAM_DTYPE = torch.float16
FITS = ("als", "adam")
DEFAULT_ITERATIONS = {"als": 15, "adam": 50}
_RIDGE = 1e-4  # in units of "weights per group" on the normal-equation diagonal
_CHUNK_ELEMS = 1 << 24  # bound on [rows, cols, 2^n] temporaries in the nearest-value search


def _plane_bits(bits: int, device: torch.device) -> torch.Tensor:
    """[2^n, n] float32: entry [c, b] is bit b of code c."""
    c = torch.arange(1 << bits, device=device)
    return ((c.unsqueeze(1) >> torch.arange(bits, device=device)) & 1).float()


def value_table(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Representable values: scale [..., n], offset [...] → [..., 2^n] float32, entry c = value of code c.

    Summed as z + s_0·β_0 + s_1·β_1 + ... in fp32, the order docs/format.md specifies."""
    n = scale.shape[-1]
    bits = _plane_bits(n, scale.device)
    vals = offset.float().unsqueeze(-1).expand(*offset.shape, 1 << n)
    for b in range(n):
        vals = vals + scale[..., b : b + 1].float() * bits[:, b]
    return vals


def _code_sums(codes: torch.Tensor, w: torch.Tensor, v: int,
               ordered: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of w [M, g]: how many entries got each of the v codes, and their sum ([M, v] float32 each).
    On CPU a scatter-add (sequential within a row); on a GPU scatter-add sums with atomics in whatever order
    the threads arrive, so the totals' last bits (and the fitted parameters) would change from run to run:
    there, one masked row sum per code, a reduction in a fixed order (`ordered`: default off the CPU)."""
    if not (w.device.type != "cpu" if ordered is None else ordered):
        count = torch.zeros(w.shape[0], v, device=w.device).scatter_add_(1, codes, torch.ones_like(w))
        return count, torch.zeros(w.shape[0], v, device=w.device).scatter_add_(1, codes, w)
    count = torch.empty(w.shape[0], v, device=w.device)
    total = torch.empty_like(count)
    for c in range(v):
        hit = codes == c
        count[:, c] = hit.sum(dim=1)
        total[:, c] = torch.where(hit, w, 0.0).sum(dim=1)
    return count, total


def _nearest(w: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """w [M, c], vals [M, V] → int64 codes [M, c] of the nearest value (first index on ties)."""
    m, c = w.shape
    v = vals.shape[-1]
    step = max(1, _CHUNK_ELEMS // max(1, c * v))
    out = torch.empty(m, c, dtype=torch.int64, device=w.device)
    for i in range(0, m, step):
        d = (w[i : i + step].unsqueeze(-1) - vals[i : i + step].unsqueeze(1)).abs()
        out[i : i + step] = d.argmin(dim=-1)
    return out


def _round_params(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """To the storage dtype and back (values that overflow fp16 are clamped to its finite range)."""
    fmax = torch.finfo(PARAM_DTYPE).max
    scale = scale.clamp(-fmax, fmax).to(PARAM_DTYPE).float()
    offset = offset.clamp(-fmax, fmax).to(PARAM_DTYPE).float()
    return scale, offset


@register_format
class HLQ(WeightFormat):
    name = "hlq"
    bits_range = (2, 4)
    min_group_size = 16
    recipe_keys = (
        RecipeKey("fit", "als", doc="als | adam (checked when the format is built)"),
        RecipeKey("iterations", None, doc="integer >= 0; None = per fit: als 15, adam 50"),
        RecipeKey("zero_exact", False, doc="true: shift the offset so that 0 is representable"),
    )

    def __init__(self, bits: int, group_size: int | None, fit: str = "als", iterations: int | None = None,
                 symmetric: bool = False, zero_exact: bool = False):
        if not 2 <= bits <= 4:
            raise QuantkitError(f"format 'hlq' needs bits in 2..4, got {bits}")
        if group_size is not None and group_size < 16:
            raise QuantkitError(f"format 'hlq' needs group_size >= 16, got {group_size}")
        if fit not in FITS:
            raise QuantkitError(f"format 'hlq': fit = {fit!r} is unknown; use one of {', '.join(FITS)}")
        if iterations is None:
            iterations = DEFAULT_ITERATIONS[fit]
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise QuantkitError(f"format 'hlq': iterations must be an integer >= 0, got {iterations!r}")
        super().__init__(bits, group_size)
        self.fit_method = fit
        self.iterations = iterations
        self.symmetric = symmetric  # accepted for interface symmetry; HLQ has a free offset and ignores it
        if not isinstance(zero_exact, bool):
            raise QuantkitError(f"format 'hlq': zero_exact must be true or false, got {zero_exact!r}")
        self.zero_exact = zero_exact

    @classmethod
    def example_specs(cls) -> tuple:
        from quantkit.recipe import WeightSpec

        return (WeightSpec("hlq", 2, 64, options=(("iterations", 3),)),
                WeightSpec("hlq", 3, 128, options=(("iterations", 3), ("zero_exact", True))),
                WeightSpec("hlq", 4, 32, options=(("fit", "adam"), ("iterations", 3))))

    def packed_tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        n, groups = out_features, self.groups(in_features)
        return {"qweight": TensorSpec((packed_rows(self.padded_k(in_features), self.bits), n), torch.int32),
                "scales": TensorSpec((groups, self.bits, n), PARAM_DTYPE),
                "offsets": TensorSpec((groups, n), PARAM_DTYPE)}

    # ---- per-group primitives (any leading dims) ----

    def init_params(self, w: torch.Tensor) -> Params:
        """Uniform asymmetric init, fp16-rounded: s_b = (max − min)/(2^n − 1)·2^b, z = min."""
        w = w.float()
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        step = (hi - lo) / ((1 << self.bits) - 1)
        pow2 = 2.0 ** torch.arange(self.bits, device=w.device, dtype=torch.float32)
        scale, offset = _round_params(step.unsqueeze(-1) * pow2, lo)
        return {"scale": scale, "offset": offset}

    def fit(self, w: torch.Tensor) -> Params:
        """w [..., g] → {"scale": [..., n], "offset": [...]} float32 holding fp16-exact values."""
        w = w.float()
        lead = w.shape[:-1]
        wf = w.reshape(-1, w.shape[-1])
        if wf.shape[0] == 0 or wf.shape[1] == 0:
            p = self.init_params(w)
            return p
        p0 = self.init_params(wf)
        if self.fit_method == "als":
            scale, offset = self._fit_als(wf, p0["scale"], p0["offset"])
        else:
            scale, offset = self._fit_adam(wf, p0["scale"], p0["offset"])
        if self.zero_exact:
            scale, offset = _snap_zero(scale, offset)
        return {"scale": scale.reshape(*lead, self.bits), "offset": offset.reshape(lead)}

    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        lead, c = w.shape[:-1], w.shape[-1]
        vals = value_table(params["scale"], params["offset"]).reshape(-1, 1 << self.bits)
        return _nearest(w.float().reshape(-1, c), vals).reshape(*lead, c)

    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        vals = value_table(params["scale"], params["offset"])
        return torch.gather(vals, -1, codes.to(torch.int64))

    # ---- fitting ----

    def _sq_error(self, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        """(codes [M, g], squared error [M]) of w [M, g] under (already fp16-rounded) params."""
        vals = value_table(scale, offset)
        codes = _nearest(w, vals)
        err = (w - torch.gather(vals, -1, codes)).square().sum(dim=-1)
        return codes, err

    def _fit_als(self, w, scale, offset):
        _, g = w.shape
        n = self.bits
        v = 1 << n
        aug = torch.cat([_plane_bits(n, w.device), torch.ones(v, 1, device=w.device)], dim=1).double()
        eye = torch.eye(n + 1, device=w.device, dtype=torch.float64)
        lam = _RIDGE * g
        codes, best_err = self._sq_error(w, scale, offset)
        best_s, best_z = scale, offset
        for _ in range(self.iterations):
            # normal equations of [bits | 1] from per-code counts and sums: O(M·2^n) memory, not O(M·g·n)
            count, total = _code_sums(codes, w, v)
            count, total = count.double(), total.double()
            a = torch.einsum("mc,cb,cd->mbd", count, aug, aug) + lam * eye  # [M, n+1, n+1]
            prev = torch.cat([scale, offset.unsqueeze(-1)], dim=-1).double()
            rhs = total @ aug + lam * prev
            chol, info = torch.linalg.cholesky_ex(a)
            x = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
            ok = (info == 0).unsqueeze(-1) & torch.isfinite(x).all(dim=-1, keepdim=True)
            x = torch.where(ok, x, prev).float()
            scale, offset = _round_params(x[:, :n], x[:, n])
            codes, err = self._sq_error(w, scale, offset)
            best_err, best_s, best_z = _keep_best(err, scale, offset, best_err, best_s, best_z)
        return best_s, best_z

    def _fit_adam(self, w, scale, offset, lr: float = 1e-3):
        # optimize in range-normalized units (w − min)/(max − min) so that lr means the same for every group
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        rng = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
        wn = (w - lo) / rng
        v = 1 << self.bits
        _, best_err = self._sq_error(w, scale, offset)
        best_s, best_z = scale, offset
        with torch.enable_grad():
            s = (scale / rng).detach().requires_grad_(True)
            z = ((offset.unsqueeze(-1) - lo) / rng).squeeze(-1).detach().requires_grad_(True)
            opt = torch.optim.Adam([s, z], lr=lr)
            for _ in range(self.iterations):
                with torch.no_grad():
                    codes = _nearest(wn, value_table(s, z))
                    count, total = _code_sums(codes, wn, v)
                vals = value_table(s, z)  # Σ_k (w_k − v_{c_k})² = Σ_c count_c·v_c² − 2·total_c·v_c + const
                loss = (count * vals.square() - 2 * total * vals).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    cs, cz = _round_params(s * rng, z * rng.squeeze(-1) + lo.squeeze(-1))
                    _, err = self._sq_error(w, cs, cz)
                    best_err, best_s, best_z = _keep_best(err, cs, cz, best_err, best_s, best_z)
        return best_s, best_z

    # ---- storage ----

    def pack(self, codes: torch.Tensor, params: Params, k: int) -> dict[str, torch.Tensor]:
        """codes [N, K], params {"scale": [N, groups, n], "offset": [N, groups]} → stored tensors."""
        return {
            "qweight": pack_codes(self.pad_codes(codes, k), self.bits),
            "scales": params["scale"].permute(1, 2, 0).to(PARAM_DTYPE).contiguous(),
            "offsets": params["offset"].t().to(PARAM_DTYPE).contiguous(),
        }

    def unpack(self, packed: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, Params]:
        codes = unpack_codes(packed["qweight"], self.bits, k).to(torch.int64)
        scale = packed["scales"].float().permute(2, 0, 1)
        offset = packed["offsets"].float().t()
        return codes, {"scale": scale, "offset": offset}

    # ---- export ----

    @staticmethod
    def to_bcq(params: Params) -> Params:
        """LUT-GEMM's BCQ form: w = offset + Σ_b α_b·(2β_b − 1), α_b = s_b/2, offset = z + Σ_b s_b/2.

        Returns {"alpha": [..., n], "offset": [...]} float32 (not fp16-rounded)."""
        scale = params["scale"].float()
        return {"alpha": scale / 2, "offset": params["offset"].float() + scale.sum(dim=-1) / 2}

    @staticmethod
    def dequantize_bcq(codes: torch.Tensor, bcq: Params) -> torch.Tensor:
        """codes [..., c] with BCQ params {"alpha": [..., n], "offset": [...]} → float32 [..., c]."""
        alpha = bcq["alpha"]
        n = alpha.shape[-1]
        out = bcq["offset"].unsqueeze(-1).expand(*codes.shape).clone()
        for b in range(n):
            sign = ((codes >> b) & 1).float() * 2 - 1
            out = out + alpha[..., b : b + 1] * sign
        return out


def _snap_zero(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift the offset so that the representable value nearest 0 becomes 0 (to fp16 rounding of z).

    A free float offset rarely represents 0, while uniform asymmetric RTN always does (integer zero point).
    Near-zero weights facing outlier activation channels then carry up to half a step of error times a
    huge activation: measured on the demo model (3-bit, g128) as 1.5-2.6x RTN's output error in v_proj /
    down_proj layers although the weight MSE was 27% lower. `zero_exact` removes that failure mode."""
    vals = value_table(scale, offset)
    v0 = torch.gather(vals, -1, vals.abs().argmin(dim=-1, keepdim=True)).squeeze(-1)
    return _round_params(scale, offset - v0)


def _keep_best(err, scale, offset, best_err, best_s, best_z):
    """Per group, keep (scale, offset) where `err` beats the best squared error so far."""
    better = err < best_err
    return (torch.where(better, err, best_err), torch.where(better.unsqueeze(-1), scale, best_s),
            torch.where(better, offset, best_z))
