"""NVFP4 numerics (quantkit/formats/nvfp4.py), the `nvfp4` weight format, and the ARCQuant reference
(quantkit/arc_numerics.py): exact values, rounding rules, packing, and the RTN / GPTQ pipeline hooks."""

from __future__ import annotations

import pytest
import torch

from quantkit.arc_numerics import (
    arc_dequantize,
    arc_fake_quant_activation,
    arc_linear_ref,
    arc_padded_k,
    arc_quantize_activation,
    arc_weight,
)
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, make_format
from quantkit.formats.nvfp4 import (
    E2M1_MAGNITUDES,
    NVFP4Format,
    compute_tensor_scale,
    e2m1_decode,
    e2m1_encode,
    nvfp4_dequantize,
    nvfp4_fake_quant,
    nvfp4_quantize,
    pack_e2m1,
    round_to_e4m3,
    unpack_e2m1,
)
from quantkit.methods import HessianAccumulator, gptq_quantize, rtn_quantize
from quantkit.recipe import WeightSpec

E4M3_VALUES = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # all finite ≥ 0


def _x(shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def test_pack_unpack_round_trip_low_nibble_first():
    codes = torch.arange(16).repeat(3, 2)  # [3, 32]
    p = pack_e2m1(codes)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert p[0, 0].item() == 0x10 and p[0, 1].item() == 0x32  # element 0 in the low nibble
    assert torch.equal(unpack_e2m1(p), codes)
    with pytest.raises(ValueError, match="even"):
        pack_e2m1(torch.zeros(2, 3, dtype=torch.int64))


def test_all_e2m1_values_exact():
    vals = e2m1_decode(torch.arange(16))
    mags = torch.tensor(E2M1_MAGNITUDES)
    assert torch.equal(vals[:8], mags) and torch.equal(vals[8:], -mags)
    # every representable value is reproduced exactly (15 distinct values; code 8 = -0 never emitted)
    codes = e2m1_encode(vals)
    assert torch.equal(e2m1_decode(codes), vals)
    assert (codes != 8).all() and len(set(e2m1_decode(codes).tolist())) == 15
    # through the whole quantizer: a block holding every value, with bs·S = 1 (amax 6, S chosen so bs = 1)
    x = torch.cat([mags, -mags[1:], torch.zeros(1)]).reshape(1, 16)
    q = nvfp4_quantize(x, tensor_scale=1.0)
    assert q.block_scales.float().item() == 1.0
    assert torch.equal(nvfp4_dequantize(q.packed, q.block_scales, q.tensor_scale), x)


def test_ties_to_even_and_saturation():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_decode(e2m1_encode(mids)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_decode(e2m1_encode(-mids)).tolist() == [0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    eps = 1e-6
    assert e2m1_decode(e2m1_encode(mids + eps)).tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert e2m1_decode(e2m1_encode(torch.tensor([6.0, 6.5, 100.0, -7.0, -1e30]))).tolist() == [6, 6, 6, -6, -6]
    assert e2m1_encode(torch.tensor([-0.1, -0.0])).tolist() == [0, 0]  # rounds to zero: code 0 (+0)


def test_e4m3_rounding_ties_subnormals_saturation():
    v = E4M3_VALUES.unique().sort().values
    mids = (v[1:] + v[:-1]) / 2
    even = v[:-1].to(torch.float8_e4m3fn).view(torch.uint8) % 2 == 0
    assert torch.equal(round_to_e4m3(mids), torch.where(even, v[:-1], v[1:]))
    assert torch.equal(round_to_e4m3(v), v)
    assert round_to_e4m3(torch.tensor([2.0**-9, 3 * 2.0**-9, 2.0**-11, 500.0, 1e9])).tolist() == [
        2.0**-9, 3 * 2.0**-9, 0.0, 448.0, 448.0]


def test_subnormal_block_scales_are_kept():
    # one large block sets S; a tiny block gets a subnormal e4m3 scale (< 2^-6) and still dequantizes well
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0  # S = 1
    x[0, 16:] = torch.linspace(-0.06, 0.06, 16)  # block amax/6 = 0.01 → e4m3 subnormal 5·2^-9
    q = nvfp4_quantize(x)
    assert q.tensor_scale.item() == 1.0
    bs = q.block_scales.float()[0]
    assert bs[0].item() == 448.0 and bs[1].item() == 5 * 2.0**-9
    d = nvfp4_dequantize(q.packed, q.block_scales, q.tensor_scale)[0, 16:]
    assert (d - x[0, 16:]).abs().max() <= 0.5 * 5 * 2.0**-9 * 2 + 1e-9  # within half a grid step (≤ 2)


def test_zeros_and_tiny_blocks():
    q = nvfp4_quantize(torch.zeros(2, 40))
    assert q.tensor_scale.item() == 1.0 and (q.packed == 0).all() and (q.block_scales.float() == 0).all()
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    x[0, 16] = 1e-7  # block scale rounds to 0 → all-zero codes, no NaN
    d = nvfp4_fake_quant(x)
    assert torch.isfinite(d).all() and d[0, 16] == 0 and d[0, 0] == 1.0


def test_round_trip_exact_on_representable_values():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, 64), generator=g)
    codes[codes == 8] = 0
    scales = E4M3_VALUES[torch.randint(1, 127, (4, 4), generator=g)]
    s = torch.tensor(0.37)
    x = (e2m1_decode(codes).reshape(4, 4, 16) * scales.unsqueeze(-1)).reshape(4, 64) * s
    q = nvfp4_quantize(x, s)
    d = nvfp4_dequantize(q.packed, q.block_scales, q.tensor_scale)
    assert torch.equal(d, nvfp4_fake_quant(x, s))
    # re-quantizing the dequantized tensor is a fixed point (same codes, scales and values)
    q2 = nvfp4_quantize(d, s)
    assert torch.equal(q2.packed, q.packed) and torch.equal(q2.block_scales.float(), q.block_scales.float())


def test_default_tensor_scale_and_error_bound():
    x = _x((8, 64), 1, 0.1)
    q = nvfp4_quantize(x)
    assert q.tensor_scale.item() == pytest.approx(x.abs().max().item() / 2688, rel=1e-6)
    assert q.tensor_scale.dtype == torch.float32 and q.tensor_scale.dim() == 0
    d = nvfp4_dequantize(q.packed, q.block_scales, q.tensor_scale)
    bs = q.block_scales.float().repeat_interleave(16, dim=1) * q.tensor_scale
    assert ((d - x).abs() <= bs * 1.0 + 1e-7).all()  # e2m1 step ≤ 2 units: error ≤ 1 unit of the scale
    assert ((d - x).norm() / x.norm()).item() < 0.15
    assert compute_tensor_scale(-x).item() == compute_tensor_scale(x).item()  # |x|, not the signed max


def test_odd_k_pads_with_zero_codes():
    x = _x((3, 37), 2)
    q = nvfp4_quantize(x)
    assert q.packed.shape == (3, 24) and q.block_scales.shape == (3, 3)
    assert (unpack_e2m1(q.packed)[:, 37:] == 0).all()
    d = nvfp4_dequantize(q.packed, q.block_scales, q.tensor_scale, k=37)
    assert d.shape == (3, 37)
    ref = nvfp4_quantize(torch.nn.functional.pad(x, (0, 11)))
    assert torch.equal(ref.packed, q.packed)


def test_fake_quant_keeps_dtype():
    x = _x((2, 32), 4).to(torch.bfloat16)
    y = nvfp4_fake_quant(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(bad):
    x = _x((2, 32), 5)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        nvfp4_quantize(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        arc_quantize_activation(x, torch.arange(32), 16)


# ---- weight format ----


def _spec(**kw):
    return WeightSpec(format="nvfp4", bits=4, group_size=16, symmetric=False, options=kw)


def test_format_registered_and_validated():
    assert FORMATS["nvfp4"] is NVFP4Format
    fmt = make_format(_spec())
    assert isinstance(fmt, NVFP4Format) and fmt.group_size == 16 and fmt.tensor_scale is None
    with pytest.raises(QuantkitError, match="4-bit"):
        NVFP4Format(bits=3)
    with pytest.raises(QuantkitError, match="group size of 16"):
        NVFP4Format(group_size=32)


def test_rtn_matches_nvfp4_quantize_and_packs():
    w = _x((24, 72), 6, 0.02)  # K = 72: a short last group of 8
    fmt = make_format(_spec())
    codes, params = rtn_quantize(w, fmt)
    packed = fmt.pack(codes, params, 72)
    ref = nvfp4_quantize(w)
    assert packed["qweight"].shape == (24, 40) and packed["qweight"].dtype == torch.uint8
    assert packed["block_scales"].dtype == torch.float8_e4m3fn and packed["block_scales"].shape == (24, 5)
    assert packed["tensor_scale"].dtype == torch.float32 and packed["tensor_scale"].shape == (1,)
    assert torch.equal(packed["qweight"], ref.packed)
    assert torch.equal(packed["block_scales"].float(), ref.block_scales.float())
    assert packed["tensor_scale"].item() == ref.tensor_scale.item()
    c2, p2 = fmt.unpack(packed, fmt.padded_k(72))
    wd = fmt.dequantize_grouped(c2, p2)[:, :72]
    assert torch.equal(wd, nvfp4_dequantize(ref.packed, ref.block_scales, ref.tensor_scale, 72))
    assert torch.equal(wd, fmt.dequantize_grouped(codes, params))  # what RTN quantized against = stored
    assert fmt.bits_per_weight(4096, 4096) == pytest.approx(4.5, abs=1e-3)


def test_gptq_with_bound_format_stores_exact_values():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 64, generator=g) * 0.05
    acc = HessianAccumulator(64, "cpu")
    acc.add(torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3, 64))
    fmt = make_format(_spec()).prepare(w)
    assert fmt.tensor_scale == pytest.approx(w.abs().max().item() / 2688, rel=1e-6)
    codes, params = gptq_quantize(w, acc.h, fmt, block_size=32)
    packed = fmt.pack(codes, params, 64)
    c2, p2 = fmt.unpack(packed, 64)
    wq = fmt.dequantize_grouped(c2, p2)
    assert torch.equal(wq, fmt.dequantize_grouped(codes, params))
    # GPTQ lowers the Hessian-weighted error compared with RTN under the same tensor scale
    cr, pr = rtn_quantize(w, fmt)
    wr = fmt.dequantize_grouped(cr, pr)

    def err(q):
        d = q - w
        return torch.trace(d @ acc.h @ d.t()).item()

    assert err(wq) < err(wr)
    # an unbound format cannot pack groups fitted with different tensor scales
    unbound = make_format(_spec())
    _c, p3 = gptq_quantize(w * torch.linspace(0.1, 1, 64), acc.h, unbound, block_size=32)
    with pytest.raises(QuantkitError, match="prepare"):
        unbound.pack(_c, p3, 64)


def _block_errors(fmt, w):
    codes, params = rtn_quantize(w, fmt)
    d = fmt.dequantize_grouped(codes, params) - w
    return codes, params, torch.nn.functional.pad(d, (0, fmt.padded_k(w.shape[1]) - w.shape[1])).reshape(
        w.shape[0], -1, 16).square().sum(-1)


@pytest.mark.parametrize("k", [96, 72])  # 72: a short last group of 8
def test_scale_search_never_worse_per_block_and_stores_exactly(k):
    w = _x((40, k), 11, 0.03)
    w[3, 5] = 0.9  # an outlier row sets the tensor scale: the other blocks' scales are small e4m3 values
    w[7, :16] = 0.0  # an all-zero block keeps scale 0
    w[8, 16:32] = 1e-9  # a block below the smallest e4m3 scale
    plain = make_format(_spec()).prepare(w)
    searched = make_format(_spec(scale_search="mse")).prepare(w)
    assert searched.scale_search == "mse" and searched.tensor_scale == plain.tensor_scale
    _c0, p0, e0 = _block_errors(plain, w)
    codes, params, e1 = _block_errors(searched, w)
    assert (e1 <= e0).all()  # block by block, never a larger squared error than amax/6
    assert e1.sum() < 0.9 * e0.sum()
    assert (params["block_scale"] != p0["block_scale"]).any()  # some blocks did pick a neighbour
    assert params["block_scale"][7, 0] == 0
    # every searched scale is an e4m3 value, so packing stores exactly what was quantized against
    assert torch.equal(params["block_scale"].to(torch.float8_e4m3fn).float(), params["block_scale"])
    packed = searched.pack(codes, params, k)
    c2, p2 = searched.unpack(packed, k)
    assert torch.equal(c2, codes) and torch.equal(p2["block_scale"], params["block_scale"])
    assert torch.equal(searched.dequantize_grouped(c2, p2), searched.dequantize_grouped(codes, params))
    # and the stored tensor decodes through the plain NVFP4 reader (the kernels' layout is unchanged)
    ref = nvfp4_dequantize(packed["qweight"], packed["block_scales"], packed["tensor_scale"][0], k)
    assert torch.equal(ref, searched.dequantize_grouped(codes, params))


def test_search_error_matches_the_stored_rounding():
    from quantkit.formats.nvfp4 import _block_sq_error, _e2m1_magnitude, _encode_blocks

    v = torch.cat([torch.linspace(0, 8, 2**16), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 1e30])])
    assert torch.equal(_e2m1_magnitude(v), e2m1_decode(e2m1_encode(v)).abs())
    blocks = _x((30, 4, 16), 12, 0.05)
    s = compute_tensor_scale(blocks)
    bs = E4M3_VALUES[torch.randint(1, 127, (30, 4), generator=torch.Generator().manual_seed(1))]
    deq = (e2m1_decode(_encode_blocks(blocks, bs, s)) * bs.unsqueeze(-1)) * s
    assert torch.equal(_block_sq_error(blocks, bs, s), (deq - blocks).square().sum(-1))


def test_scale_search_keeps_exact_blocks():
    # a block already on the e2m1 grid with scale amax/6 has zero error: the search keeps that scale
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (6, 32), generator=g)
    codes[codes == 8] = 0
    codes[:, 0] = 7  # every block holds a ±6, so amax/6 is the scale it was built with
    codes[:, 16] = 15
    scales = E4M3_VALUES[torch.randint(20, 100, (6, 2), generator=g)]
    w = (e2m1_decode(codes).reshape(6, 2, 16) * scales.unsqueeze(-1)).reshape(6, 32)
    fmt = NVFP4Format(scale_search="mse", tensor_scale=1.0)
    c, p = rtn_quantize(w, fmt)
    assert torch.equal(p["block_scale"], scales) and torch.equal(c, codes)


def test_scale_search_bad_value_errors_clearly():
    from quantkit.recipe import recipe_from_dict

    with pytest.raises(QuantkitError, match=r"weights.scale_search = 'msee' is unknown .*none, mse"):
        recipe_from_dict({"weights": {"format": "nvfp4", "bits": 4, "group_size": 16, "scale_search": "msee"}})
    with pytest.raises(QuantkitError, match="scale_search"):
        recipe_from_dict({"weights": {"format": "nvfp4", "group_size": 16},
                          "overrides": [{"match": ["*.q_proj"], "weights": {"scale_search": True}}]})
    with pytest.raises(QuantkitError, match="unknown recipe key 'scale_serch'.*scale_search"):
        recipe_from_dict({"weights": {"format": "nvfp4", "group_size": 16, "scale_serch": "mse"}})
    with pytest.raises(QuantkitError, match="scale_search"):
        NVFP4Format(scale_search="l1")
    r = recipe_from_dict({"weights": {"format": "nvfp4", "group_size": 16, "scale_search": "mse"}})
    assert r.weights.option("scale_search") == "mse" and make_format(r.weights).scale_search == "mse"
    assert make_format(_spec()).scale_search == "none"


# ---- ARCQuant reference ----


def _arc_inputs(m=5, k=96, seed=8):
    g = torch.Generator().manual_seed(seed)
    chan = torch.rand(k, generator=g) * 2 + 0.05
    chan[torch.randperm(k, generator=g)[:5]] *= 40  # outlier channels
    x = torch.randn(m, k, generator=g) * chan
    reorder = torch.argsort(x.abs().amax(dim=0))  # ascending channel max: outliers last
    return x, reorder


# ------------------------------------------------------------------------------ one tensor scale per fused group


def test_bind_shares_the_largest_amax_and_equals_prepare_for_one_matrix():
    fmt = make_format(_spec())
    w1, w2, w3 = _x((8, 32), 1), _x((4, 32), 2, 3.0), _x((8, 48), 3, 0.5)
    bound = fmt.bind([w1, w2, w3])
    assert bound.tensor_scale == float(compute_tensor_scale(torch.cat([w.flatten() for w in (w1, w2, w3)])))
    assert fmt.bind([w1]).tensor_scale == fmt.prepare(w1).tensor_scale == float(compute_tensor_scale(w1))
    # every member quantizes against the shared scale and stores it: one global scale for the fused matrix
    for w in (w1, w3):
        codes, params = rtn_quantize(w, bound)
        assert float(bound.pack(codes, params, w.shape[1])["tensor_scale"]) == bound.tensor_scale
    with pytest.raises(ValueError, match="NaN or Inf"):
        fmt.bind([w1, torch.full((2, 16), float("nan"))])


GPTQ_NVFP4 = {"name": "gptq-nvfp4", "method": {"name": "gptq"}, "weights": {"format": "nvfp4", "bits": 4,
                                                                           "group_size": 16}}
LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _check_shared_scales(model, floats: dict) -> None:
    """Each group of Linears that reads one input stores S = (largest amax of the group's float weights)/2688."""
    for i in range(len(model.model.layers)):
        for group in LLAMA_GROUPS:
            names = [f"model.layers.{i}.{n}" for n in group]
            amax = max(floats[n].abs().amax() for n in names)
            for n in names:
                assert float(model.get_submodule(n).tensor_scale) == float(compute_tensor_scale(amax)), n


@pytest.mark.parametrize("recipe", ["nvfp4-w4a16", "nvfp4-rtn", "arcquant-nvfp4", GPTQ_NVFP4],
                         ids=["rtn-no-data", "w4a4", "arcquant", "gptq"])
def test_pipeline_binds_one_tensor_scale_per_fused_group(recipe):
    """q/k/v and gate/up share one NVFP4 tensor scale (serving engines fuse them under one global scale), with
    calibration data (traced sub-blocks) and without (the adapter's declared ones); o and down keep their own."""
    from conftest import tiny_llama
    from quantkit.pipeline import quantize_model
    from quantkit.recipe import load_recipe

    m = tiny_llama()
    floats = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(m, load_recipe(recipe), calib, progress=False)
    _check_shared_scales(m, floats)


@pytest.mark.parametrize("recipe", ["nvfp4-w4a16", "nvfp4-rtn"])
def test_streamed_checkpoint_shares_the_same_scales(recipe, tmp_path):
    """The streaming pipeline binds the same groups: its checkpoint equals the in-memory one."""
    from test_offload import make_source, stream

    from conftest import tiny_llama
    from quantkit.checkpoint import load
    from quantkit.pipeline import quantize_model
    from quantkit.recipe import load_recipe

    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    make_source(tmp_path / "src")
    q = load(stream(tmp_path / "src", tmp_path / "q", recipe, calib))
    ref = tiny_llama()
    floats = {n: mod.weight.detach().clone() for n, mod in ref.named_modules() if isinstance(mod, torch.nn.Linear)}
    quantize_model(ref, load_recipe(recipe), calib, progress=False)
    _check_shared_scales(q, floats)
    sd, ref_sd = q.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)



@pytest.mark.parametrize("s", [0, 16, 32])
def test_arc_activation_layout_and_fake_quant(s):
    x, reorder = _arc_inputs()
    q = arc_quantize_activation(x, reorder, s)
    assert q.packed.shape == (5, (96 + s) // 2) and q.block_scales.shape == (5, (96 + s) // 16)
    f = arc_fake_quant_activation(x, reorder, s)
    assert f.shape == (5, 96 + s)
    assert torch.equal(f, arc_dequantize(q, 96, s))
    xr = x[:, reorder]
    q1 = nvfp4_quantize(xr)
    assert torch.equal(f[:, :96], nvfp4_dequantize(q1.packed, q1.block_scales, q1.tensor_scale))
    if s:
        r = xr[:, 96 - s:] - f[:, 96 - s:96]
        assert torch.equal(f[:, 96:], nvfp4_fake_quant(r, q.tensor_scale))  # same tensor scale


def test_arc_residual_reduces_error():
    x, reorder = _arc_inputs(m=16, k=128)
    w = _x((24, 128), 9, 0.05)
    y = x @ w.t()
    errs = []
    for s in (0, 16, 32):
        wq = arc_weight(w, reorder, s)
        errs.append(((arc_linear_ref(x, reorder, s, wq, dtype=torch.float32) - y).norm() / y.norm()).item())
    assert errs[1] < errs[0] and errs[2] <= errs[1]
    # activation error of the outlier channels shrinks with the residual
    xr = x[:, reorder]
    e0 = (arc_fake_quant_activation(x, reorder, 0) - xr).norm()
    f = arc_fake_quant_activation(x, reorder, 32)
    e32 = (f[:, :128].clone().index_add_(1, torch.arange(96, 128), f[:, 128:]) - xr).norm()
    assert e32 < 0.5 * e0


def test_arc_weight_duplicates_outlier_columns():
    w = _x((8, 64), 10)
    reorder = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    wq = arc_weight(w, reorder, 32)
    d = arc_dequantize(wq, 64, 32)
    assert torch.equal(d[:, 64:], d[:, 32:64])  # K multiple of 16: the duplicated blocks are identical
    assert wq.tensor_scale.item() == compute_tensor_scale(w).item()


def test_arc_odd_k_and_bad_args():
    x, reorder = _arc_inputs(m=3, k=40)
    q = arc_quantize_activation(x, reorder, 16)
    assert arc_padded_k(40, 16) == 64 and q.packed.shape == (3, 32)
    f = arc_fake_quant_activation(x, reorder, 16)
    assert f.shape == (3, 56) and torch.equal(f, arc_dequantize(q, 40, 16))
    with pytest.raises(ValueError, match="multiple of 16"):
        arc_quantize_activation(x, reorder, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        arc_quantize_activation(x, reorder, 48)
    with pytest.raises(ValueError, match="reorder"):
        arc_quantize_activation(x, reorder[:-1], 16)
