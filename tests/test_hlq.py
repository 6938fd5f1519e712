"""HLQ format: exact storage round trip, nearest-value quantization, fitting, GPTQ, recipes, runtime module."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, HLQ, UniformInt, make_format
from quantkit.methods import HessianAccumulator, gptq_quantize
from quantkit.nn import QuantLinear
from quantkit.recipe import WeightSpec, load_recipe, recipe_from_dict


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


def _brute_nearest_err(w: torch.Tensor, params) -> torch.Tensor:
    """|w − nearest representable value| by enumerating all 2^n bit combinations explicitly."""
    s, z = params["scale"], params["offset"]
    n = s.shape[-1]
    vals = []
    for combo in itertools.product((0, 1), repeat=n):
        v = z.clone()
        for b, beta in enumerate(combo):
            v = v + s[..., b] * beta
        vals.append(v)
    vals = torch.stack(vals, dim=-1)  # [..., 2^n]
    return (w.unsqueeze(-1) - vals.unsqueeze(-2)).abs().amin(dim=-1)


def test_registered_and_made_from_spec():
    assert FORMATS["hlq"] is HLQ
    fmt = make_format(WeightSpec(format="hlq", bits=3, group_size=64, options=(("fit", "adam"),
                                                                                 ("iterations", 7))))
    assert isinstance(fmt, HLQ) and fmt.bits == 3 and fmt.fit_method == "adam" and fmt.iterations == 7
    assert make_format(WeightSpec(format="hlq", bits=2, group_size=128)).iterations == 15
    with pytest.raises(QuantkitError, match="fit"):
        make_format(WeightSpec(format="hlq", bits=2, group_size=128, options=(("fit", "sgd"),)))


@pytest.mark.parametrize("bits,group,k", [(2, 64, 256), (3, 128, 576), (4, 16, 200), (3, None, 96)])
def test_pack_unpack_round_trip_exact(bits, group, k):
    fmt = HLQ(bits, group, iterations=3)
    w = _weights(24, k)
    codes, params = fmt.quantize_rtn(w)
    packed = fmt.pack(codes, params, k)
    groups = fmt.groups(k)
    assert packed["qweight"].dtype == torch.int32
    assert packed["qweight"].shape == (-(-fmt.padded_k(k) // 32) * bits, 24)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (groups, bits, 24)
    assert packed["offsets"].dtype == torch.float16 and packed["offsets"].shape == (groups, 24)
    codes2, params2 = fmt.unpack(packed, k)
    assert torch.equal(codes2, codes)
    for key in params:
        assert torch.equal(params2[key], params[key])  # fit already rounded to fp16: storage is exact
    # plane b's scale at [g, b, :]
    assert torch.equal(packed["scales"][-1, bits - 1].float(), params["scale"][:, -1, bits - 1])
    assert torch.equal(fmt.dequantize_grouped(codes2, params2), fmt.dequantize_grouped(codes, params))


def test_code_bit_order():
    fmt = HLQ(3, 16, iterations=0)
    params = {"scale": torch.tensor([[1.0, 10.0, 100.0]]), "offset": torch.tensor([0.5])}
    codes = torch.arange(8).unsqueeze(0)
    expect = torch.tensor([[0.5, 1.5, 10.5, 11.5, 100.5, 101.5, 110.5, 111.5]])
    assert torch.equal(fmt.dequantize(codes, params), expect)
    assert torch.equal(fmt.quantize(expect + 0.2, params), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_is_nearest_representable(bits):
    fmt = HLQ(bits, 32, iterations=5)
    w = _weights(16, 8 * 32, seed=bits).reshape(16, 8, 32)
    params = fmt.fit(w)
    codes = fmt.quantize(w, params)
    err = (w - fmt.dequantize(codes, params)).abs()
    assert torch.equal(err, _brute_nearest_err(w, params))


def test_negative_unsorted_scales_and_ties():
    fmt = HLQ(2, 16)
    params = {"scale": torch.tensor([[0.5, -1.0], [0.0, 0.25]]), "offset": torch.tensor([0.25, -0.5])}
    # row 0 values by code: 0.25, 0.75, -0.75, -0.25; row 1: -0.5, -0.5, -0.25, -0.25 (duplicates)
    w = torch.tensor([[0.0, 0.5, -1.0, -0.5, 2.0], [-0.375, -0.5, -0.2, 0.0, -9.0]])
    codes = fmt.quantize(w, params)
    err = (w - fmt.dequantize(codes, params)).abs()
    assert torch.equal(err, _brute_nearest_err(w, params))
    # exact ties go to the lowest code: 0.0 is equidistant from 0.25 (code 0) and −0.25 (code 3)
    assert codes[0, 0] == 0 and codes[0, 3] == 2 and codes[0, 4] == 1
    assert codes[1, 0] == 0 and codes[1, 1] == 0  # −0.375: tie between −0.5 (codes 0,1) and −0.25 (2,3)


@pytest.mark.parametrize("fit", ["als", "adam"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fit_never_worse_than_uniform_init(fit, bits):
    w = _weights(64, 4 * 64, seed=10 + bits).reshape(64, 4, 64)
    fmt = HLQ(bits, 64, fit=fit, iterations=10)
    init = fmt.init_params(w)

    def sq_err(p):
        return (w - fmt.dequantize(fmt.quantize(w, p), p)).square().sum(dim=-1)

    e_fit, e_init = sq_err(fmt.fit(w)), sq_err(init)
    assert (e_fit <= e_init).all()  # best iterate kept per group
    assert e_fit.sum() < 0.95 * e_init.sum()


def test_code_sums_ordered_form_matches_scatter_add():
    # the fixed-order per-code sums (used on GPUs, where scatter-add's atomics make the fit differ run to run)
    from quantkit.formats.hlq import _code_sums

    w = _weights(96, 64, seed=4)
    codes = torch.randint(0, 8, (96, 64), generator=torch.Generator().manual_seed(5))
    c0, t0 = _code_sums(codes, w, 8, ordered=False)
    c1, t1 = _code_sums(codes, w, 8, ordered=True)
    assert torch.equal(c0, c1) and torch.equal(c0.sum(1), torch.full((96,), 64.0))
    assert torch.allclose(t0, t1, rtol=0, atol=1e-5) and torch.allclose(t1.sum(1), w.sum(1), atol=1e-4)
    for c in (0, 5):
        assert torch.allclose(t1[:, c], (w * (codes == c)).sum(1), atol=1e-6)


def test_params_are_fp16_exact():
    fmt = HLQ(3, 64)
    p = fmt.fit(_weights(8, 64) + 0.1234567)
    for t in p.values():
        assert t.dtype == torch.float32 and torch.equal(t.half().float(), t)


@pytest.mark.parametrize("fit", ["als", "adam"])
def test_degenerate_groups_no_nan(fit):
    fmt = HLQ(3, 16, fit=fit, iterations=5)
    w = torch.zeros(6, 16)
    w[1] = 0.75  # all equal, fp16-exact
    w[2] = 1e-9  # below fp16 resolution
    w[3, 0] = 1.0  # one spike: most planes all-0 or all-1
    w[4] = torch.tensor([0.0, 1.0] * 8)  # two values
    w[5] = 3e4  # large (fp16 max is 65504)
    p = fmt.fit(w)
    assert all(torch.isfinite(t).all() for t in p.values())
    wh = fmt.dequantize(fmt.quantize(w, p), p)
    assert torch.isfinite(wh).all()
    assert torch.equal(wh[:2], w[:2])  # constant groups are exact
    assert torch.allclose(wh[3:5], w[3:5], rtol=0, atol=5e-4)  # within fp16 resolution of the planes
    assert torch.allclose(wh[5], w[5], rtol=1e-3)


def test_short_last_group():
    k, g = 576, 128
    fmt = HLQ(2, g, iterations=5)
    w = _weights(32, k, seed=3)
    w[:, 512:] *= 10  # the short group has its own range
    codes, params = fmt.quantize_rtn(w)
    assert codes.shape == (32, k) and params["scale"].shape == (32, 5, 2) and params["offset"].shape == (32, 5)
    # the short group is fitted on its 64 real columns only
    p_last = fmt.fit(w[:, 512:])
    assert torch.equal(params["scale"][:, 4], p_last["scale"]) and torch.equal(params["offset"][:, 4],
                                                                                p_last["offset"])
    packed = fmt.pack(codes, params, k)
    assert packed["qweight"].shape == (fmt.padded_k(k) // 32 * 2, 32)  # K padded to 640
    codes2, params2 = fmt.unpack(packed, fmt.padded_k(k))
    assert torch.equal(codes2[:, :k], codes) and not codes2[:, k:].any()
    wh = fmt.dequantize_grouped(codes, params)
    assert wh.shape == (32, k)
    assert torch.equal(wh, fmt.dequantize_grouped(codes2, params2)[:, :k])


@pytest.mark.parametrize("bits,group", [(2, 64), (2, 128), (3, 128), (4, 128), (4, 32)])
def test_bits_per_weight(bits, group):
    fmt = HLQ(bits, group)
    expect = bits + 16 * (bits + 1) / group
    assert fmt.bits_per_weight(4 * group, 8) == pytest.approx(expect)
    assert expect < fmt.bits_per_weight(4 * group + 8, 8) < expect + 1.5  # a short group pads to a whole one


def test_quant_linear_forward_matches_dequantized():
    torch.manual_seed(0)
    lin = nn.Linear(576, 48)
    spec = WeightSpec(format="hlq", bits=3, group_size=128, options=(("iterations", 4),))
    fmt = make_format(spec)
    codes, params = fmt.quantize_rtn(lin.weight.detach())
    q = QuantLinear.from_codes(lin, spec, codes, params)
    x = torch.randn(5, 576)
    w_hat = fmt.dequantize_grouped(codes, params)
    assert torch.equal(q.dequantize_weight(), w_hat)
    # F.linear (fused bias add), not `x @ w.t() + b`: the two round differently on some BLAS builds
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, w_hat, lin.bias), rtol=0, atol=0)


def test_recipe_limits_and_shipped_recipes():
    with pytest.raises(QuantkitError, match=r"bits = 5 .*'hlq'.*2\.\.4"):
        recipe_from_dict({"weights": {"format": "hlq", "bits": 5, "group_size": 128}})
    with pytest.raises(QuantkitError, match=r"group_size = 8 .*'hlq'.*>= 16"):
        recipe_from_dict({"weights": {"format": "hlq", "bits": 2, "group_size": 8}})
    with pytest.raises(QuantkitError, match="unknown recipe key 'iters'"):
        recipe_from_dict({"weights": {"format": "hlq", "bits": 2, "iters": 3}})
    r = recipe_from_dict({"weights": {"format": "hlq", "bits": 2, "group_size": 64, "fit": "adam",
                                      "iterations": 20}})
    assert r.weights.option("fit") == "adam" and r.weights.option("iterations") == 20
    for name, method, bits, group in [("hlq-w2g64", "gptq", 2, 64), ("hlq-w2g128", "gptq", 2, 128),
                                      ("hlq-w3g128", "gptq", 3, 128), ("hlq-w4g128", "gptq", 4, 128),
                                      ("hlq-rtn-w2g64", "rtn", 2, 64), ("hlq-rtn-w3g128", "rtn", 3, 128)]:
        r = load_recipe(name)
        assert (r.method.name, r.weights.format, r.weights.bits, r.weights.group_size) == (
            method, "hlq", bits, group)


def test_bcq_export_matches():
    fmt = HLQ(3, 64, iterations=3)
    w = _weights(16, 256, seed=5).reshape(16, 4, 64)
    p = fmt.fit(w)
    codes = fmt.quantize(w, p)
    bcq = HLQ.to_bcq(p)
    torch.testing.assert_close(HLQ.dequantize_bcq(codes, bcq), fmt.dequantize(codes, p), rtol=0, atol=1e-6)
    torch.testing.assert_close(bcq["alpha"], p["scale"] / 2, rtol=0, atol=0)


# ---- quality: measured comparisons (numbers printed with `pytest -s`) ----

def _mse(a, b):
    return (a - b).square().mean().item()


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128)])
def test_hlq_rtn_beats_uniform_rtn(bits, group):
    w = _weights(128, 512, seed=7)
    hlq, uni = HLQ(bits, group), UniformInt(bits, group)
    e_hlq = _mse(w, hlq.dequantize_grouped(*hlq.quantize_rtn(w)))
    e_uni = _mse(w, uni.dequantize_grouped(*uni.quantize_rtn(w)))
    print(f"\nRTN weight MSE w{bits}g{group}: hlq {e_hlq:.3e}  int-asym {e_uni:.3e}  ratio {e_hlq / e_uni:.3f}")
    assert e_hlq < 0.9 * e_uni


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128)])
def test_hlq_gptq_beats_hlq_rtn_on_output_error(bits, group):
    n, k, m = 64, 256, 2048
    g = torch.Generator().manual_seed(11)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(m, k, generator=g) @ mixing  # correlated inputs
    w = torch.randn(n, k, generator=g) * 0.02
    acc = HessianAccumulator(k, "cpu")
    acc.add(x)
    fmt = HLQ(bits, group, iterations=8)
    w_rtn = fmt.dequantize_grouped(*fmt.quantize_rtn(w))
    w_gptq = fmt.dequantize_grouped(*gptq_quantize(w, acc.h, fmt))
    e_rtn = torch.linalg.norm(x @ (w - w_rtn).t()).item()
    e_gptq = torch.linalg.norm(x @ (w - w_gptq).t()).item()
    uni = UniformInt(bits, group)
    e_uni = torch.linalg.norm(x @ (w - uni.dequantize_grouped(*gptq_quantize(w, acc.h, uni))).t()).item()
    print(f"\noutput error ||X(W-Wq)^T|| w{bits}g{group}: hlq-rtn {e_rtn:.3f}  hlq-gptq {e_gptq:.3f}  "
          f"int-gptq {e_uni:.3f}")
    assert e_gptq < 0.9 * e_rtn


def test_zero_exact_represents_zero():
    """zero_exact shifts the offset so one representable value is 0 (up to the fp16 rounding of z)."""
    from quantkit.formats.hlq import HLQ, value_table

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    free, snapped = HLQ(3, 128), HLQ(3, 128, zero_exact=True)
    pf, ps = free.fit(w), snapped.fit(w)
    near_free = value_table(pf["scale"], pf["offset"]).abs().amin(-1)
    near_snap = value_table(ps["scale"], ps["offset"]).abs().amin(-1)
    ulp = ps["offset"].abs() * 2.0**-10 + 2.0**-24
    assert (near_snap <= ulp).all() and near_free.median() > 10 * near_snap.median()
    assert torch.equal(ps["scale"], pf["scale"])
