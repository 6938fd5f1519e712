"""INT6 weight format (quantkit/formats/int6.py): packing, RTN, GPTQ, recipe limits, bits/weight."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, Int6
from quantkit.formats.int6 import pack_int6, unpack_int6
from quantkit.methods import HessianAccumulator, gptq_quantize, rtn_quantize


@pytest.mark.parametrize("k", [1, 31, 128, 200, 333])
def test_pack_unpack_round_trip_exact(k):
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 64, (7, k), generator=g)
    packed = pack_int6(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, -(-k // 128) * 96)
    assert torch.equal(unpack_int6(packed, k).long(), codes)


def test_packed_layout_is_the_documented_one():
    codes = torch.arange(128).remainder(64).unsqueeze(0)  # one column, one block
    b = pack_int6(codes)[0].long()
    for r in range(3):
        for i in range(32):
            assert b[32 * r + i] == codes[0, 32 * r + i] | (((codes[0, 96 + i] >> (2 * r)) & 3) << 6)


@pytest.mark.parametrize("group", [128, 64, 16, None])
def test_rtn_within_half_step_and_save_round_trip(group):
    torch.manual_seed(0)
    k = 200  # not a multiple of any group size here
    w = torch.randn(24, k)
    fmt = Int6(6, group)
    codes, params = fmt.quantize_rtn(w)
    assert codes.min() >= 1 and codes.max() <= 63  # q = c − 32 ∈ [−31, 31]
    assert torch.equal(params["scale"], params["scale"].half().float())  # fp16-exact scales
    deq = fmt.dequantize_grouped(codes, params)
    scale = params["scale"].repeat_interleave(group or k, dim=1)[:, :k]
    assert torch.all((deq - w).abs() <= 0.5 * scale * (1 + 1e-3) + 1e-7)
    # ±31 reaches the group's absmax: the largest |ŵ| of a row equals 31·scale of its group
    assert torch.equal(deq.abs().amax(dim=1), (31 * scale).gather(1, (deq.abs()).argmax(dim=1, keepdim=True))[:, 0])
    packed = fmt.pack(codes, params, k)
    assert set(packed) == {"qweight", "scales"} and packed["scales"].dtype == torch.float16
    c2, p2 = fmt.unpack(packed, fmt.padded_k(k))
    assert torch.equal(c2[:, :k], codes)
    assert torch.equal(fmt.dequantize_grouped(c2[:, :k], p2), deq)


def test_zero_and_tiny_groups():
    w = torch.zeros(2, 256)
    w[1, 128:] = 1e-9  # fp16 underflow of absmax/31
    fmt = Int6(6, 128)
    codes, params = fmt.quantize_rtn(w)
    assert torch.all(params["scale"] > 0)
    assert torch.equal(fmt.dequantize_grouped(codes, params)[0], w[0])


def test_gptq_beats_rtn_and_matches_rtn_on_diagonal_hessian():
    g = torch.Generator().manual_seed(0)
    k, n = 160, 48
    x = torch.randn(1024, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.2 + torch.eye(k))
    w = torch.randn(n, k, generator=g)
    acc = HessianAccumulator(k, "cpu")
    acc.add(x)
    fmt = Int6(6, 64)

    def err(c, p):
        return float(((x @ (w - fmt.dequantize_grouped(c, p)).t()) ** 2).mean())

    rtn = err(*rtn_quantize(w, fmt))
    gq = gptq_quantize(w, acc.h, fmt, block_size=32)
    assert gq[0].min() >= 1 and gq[0].max() <= 63
    assert err(*gq) < 0.8 * rtn
    c_rtn, _ = rtn_quantize(w, fmt)
    c_diag, _ = gptq_quantize(w, torch.diag(torch.rand(k, generator=g) + 0.5), fmt, damping=0.0)
    assert torch.equal(c_rtn, c_diag)


def test_bits_per_weight_and_limits():
    assert FORMATS["int6"] is Int6
    assert Int6(6, 128).bits_per_weight(4096, 64) == pytest.approx(6 + 16 / 128)
    assert Int6(6, None).bits_per_weight(4096, 64) == pytest.approx(6 + 16 / 4096)
    assert Int6(6, 128).bits_per_weight(200, 8) == pytest.approx((256 * 6 + 2 * 16) / 200)
    with pytest.raises(QuantkitError):
        Int6(4, 128)
    with pytest.raises(QuantkitError):
        Int6(6, 8)


def test_recipe_accepts_int6():
    from quantkit.formats import make_format
    from quantkit.recipe import weights_from_dict

    spec = weights_from_dict({"format": "int6", "bits": 6, "group_size": 128})
    fmt = make_format(spec)
    assert isinstance(fmt, Int6) and fmt.group_size == 128
    with pytest.raises(QuantkitError):
        weights_from_dict({"format": "int6", "bits": 4})
    with pytest.raises(QuantkitError):
        weights_from_dict({"format": "int6", "bits": 6, "group_size": 8})


# ---- clip search (`clip_search: mse`) ----

def _heavy_tailed(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return w * (1 + 4 * (torch.rand(n, k, generator=g) < 0.02))  # a few outliers per group


@pytest.mark.parametrize("weighted", [False, True])
def test_clip_search_never_worse_than_plain_rule(weighted):
    w = _heavy_tailed(64, 384, 0).reshape(64, 3, 128)
    w[0, 0] = 0.0  # an all-zero group keeps scale 1.0
    imp = torch.rand(128, generator=torch.Generator().manual_seed(1)) * 10 if weighted else None
    plain, mse = Int6(6, 128), Int6(6, 128, clip_search="mse_h" if weighted else "mse")
    s0, s1 = plain.fit(w)["scale"], mse.fit(w, importance=imp)["scale"]
    e0, e1 = plain.group_error(w, s0, imp), mse.group_error(w, s1, imp)
    assert torch.all(e1 <= e0)  # per group, c = 1 is in the grid and wins ties
    assert float(e1.sum()) < 0.99 * float(e0.sum())  # and some groups do clip
    assert torch.equal(s1, s1.half().float()) and torch.all(s1 <= s0) and torch.all(s1 >= 0.7 * s0 * (1 - 1e-3))
    assert s1[0, 0] == 1.0
    # the grid's c = 1 is exactly the plain rule: a one-point grid gives the plain scales bit for bit
    assert torch.equal(Int6(6, 128, clip_search="mse", clip_steps=1).fit(w)["scale"], s0)


def test_clip_search_codes_round_trip_and_gptq_uses_importance():
    torch.manual_seed(0)
    k, n = 200, 16
    w = _heavy_tailed(n, k, 2)
    fmt = Int6(6, 64, clip_search="mse_h", clip_min=0.8, clip_steps=21)
    codes, params = fmt.quantize_rtn(w)
    assert codes.min() >= 1 and codes.max() <= 63
    packed = fmt.pack(codes, params, k)
    c2, p2 = fmt.unpack(packed, fmt.padded_k(k))
    assert torch.equal(c2[:, :k], codes) and torch.equal(p2["scale"], params["scale"])
    # GPTQ passes diag(H) per group: with a diagonal Hessian GPTQ is RTN under the same importance
    hd = torch.rand(k) + 0.5
    c_g, p_g = gptq_quantize(w, torch.diag(hd), fmt, damping=0.0, act_order=True)
    bounds = fmt.group_bounds(k)
    ref = torch.stack([fmt.fit(w[:, s:e], importance=hd[s:e])["scale"] for s, e in bounds], dim=1)
    assert torch.equal(p_g["scale"], ref)
    c_r = torch.cat([fmt.quantize(w[:, s:e], {"scale": ref[:, i]}) for i, (s, e) in enumerate(bounds)], dim=1)
    assert torch.equal(c_g, c_r)


@pytest.mark.parametrize("opts,msg", [
    ({"clip_search": "l1"}, r"weights\.clip_search = 'l1' is unknown for format 'int6': use none, mse, mse_h"),
    ({"clip_search": True}, r"weights\.clip_search = True is unknown"),
    ({"clip_min": 0}, r"weights\.clip_min = 0 is out of range for format 'int6': use a number in \(0, 1\]"),
    ({"clip_min": 1.2}, r"clip_min = 1\.2 is out of range"),
    ({"clip_min": "0.8"}, r"clip_min = '0\.8' is out of range"),
    ({"clip_steps": 0}, r"weights\.clip_steps = 0 is out of range for format 'int6': use an integer in 1\.\.1000"),
    ({"clip_steps": 2.5}, r"clip_steps = 2\.5 is out of range"),
])
def test_bad_clip_options_fail_when_the_recipe_is_read(opts, msg):
    from quantkit.recipe import recipe_from_dict

    with pytest.raises(QuantkitError, match=msg) as e:
        recipe_from_dict({"weights": {"format": "int6", "bits": 6, **opts}})
    assert "\n" not in str(e.value)
    with pytest.raises(QuantkitError, match=r"unknown recipe key 'clip_serch'.*'clip_search'"):
        recipe_from_dict({"weights": {"format": "int6", "bits": 6, "clip_serch": "mse"}})
    with pytest.raises(QuantkitError, match="unknown recipe key 'clip_search'"):
        recipe_from_dict({"weights": {"format": "hlq", "bits": 4, "clip_search": "mse"}})


def test_clip_options_reach_the_format_and_the_checkpoint_entry():
    from quantkit.formats import make_format
    from quantkit.recipe import weights_from_dict

    spec = weights_from_dict({"format": "int6", "bits": 6, "group_size": 128, "clip_search": "mse_h",
                               "clip_min": 0.8, "clip_steps": 5})
    fmt = make_format(spec)
    assert fmt.clip_search == "mse_h" and fmt.fit_uses_importance
    assert fmt.clip_grid == pytest.approx([1.0, 0.95, 0.9, 0.85, 0.8])
    assert weights_from_dict(spec.to_dict()) == spec  # what a checkpoint records parses back the same
    assert not make_format(weights_from_dict({"format": "int6", "bits": 6})).fit_uses_importance
    plain_mse = make_format(weights_from_dict({"format": "int6", "bits": 6, "clip_search": "mse"}))
    assert not plain_mse.fit_uses_importance  # GPTQ hands it no diag(H), and `fit` ignores one
    w = _heavy_tailed(8, 128, 3)
    assert torch.equal(plain_mse.fit(w, importance=torch.rand(128))["scale"], plain_mse.fit(w)["scale"])
