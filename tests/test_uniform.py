import pytest
import torch

from quantkit.formats import UniformInt


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 128), (8, 32), (4, None), (3, 48)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_within_half_step_and_round_trip(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(33, 200)  # 200 is a multiple of none of the group sizes but 8
    fmt = UniformInt(bits, group, symmetric)
    codes, params = fmt.quantize_rtn(w)
    assert codes.shape == w.shape and codes.min() >= 0 and codes.max() < 2**bits
    deq = fmt.dequantize_grouped(codes, params)
    # symmetric: within half a step; asymmetric: the integer zero point may shift the grid by another half
    scale = params["scale"].repeat_interleave(group or 200, dim=1)[:, :200]
    bound = scale * (0.5 if symmetric else 1.0) * (1 + 1e-3) + 1e-6
    assert torch.all((deq - w).abs() <= bound)
    packed = fmt.pack(codes, params, 200)
    c2, p2 = fmt.unpack(packed, fmt.padded_k(200))
    assert torch.equal(fmt.dequantize_grouped(c2[:, :200], p2), deq)


def test_asymmetric_reproduces_min_and_max_exactly_on_a_grid():
    # weights already on a 4-bit grid (like the demo GGUF) are reproduced exactly by int4 asym
    scale, lo = 0.25, -1.0
    q = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(3))
    q[:, 0], q[:, 1] = 0, 15
    w = lo + scale * q.float()
    fmt = UniformInt(4, 64)
    codes, params = fmt.quantize_rtn(w)
    assert torch.equal(fmt.dequantize_grouped(codes, params), w)


def test_short_last_group_fitted_on_real_columns_only():
    w = torch.randn(4, 130)
    w[:, 128:] *= 0.001  # the short last group has a tiny range of its own
    fmt = UniformInt(4, 128)
    codes, params = fmt.quantize_rtn(w)
    assert params["scale"].shape == (4, 2)
    deq = fmt.dequantize_grouped(codes, params)
    assert (deq[:, 128:] - w[:, 128:]).abs().max() < 0.001


def test_constant_and_zero_groups_are_exact_and_finite():
    w = torch.zeros(3, 64)
    w[1] = 0.37
    w[2] = -2.5
    fmt = UniformInt(3, 64)
    codes, params = fmt.quantize_rtn(w)
    deq = fmt.dequantize_grouped(codes, params)
    assert torch.isfinite(deq).all()
    assert torch.allclose(deq, w, atol=1e-3)


def test_scales_are_stored_values():
    w = torch.randn(16, 128)
    fmt = UniformInt(4, 128)
    _, params = fmt.quantize_rtn(w)
    assert torch.equal(params["scale"], params["scale"].half().float())


def test_bits_per_weight_counts_scales_and_zeros():
    assert UniformInt(4, 128).bits_per_weight(4096, 16) == pytest.approx(4 + 24 / 128)
    assert UniformInt(4, 128, symmetric=True).bits_per_weight(4096, 16) == pytest.approx(4 + 16 / 128)


# ---- clip search (`clip_search: mse` / `mse_h`, shared with int6) ----

@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_int_clip_search_never_worse_than_min_max(symmetric, weighted):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3, 64, generator=g) * (1 + 4 * (torch.rand(64, 3, 64, generator=g) < 0.03))
    w[0, 0] = 0.0  # an all-zero group
    imp = torch.rand(64, generator=g) * 10 if weighted else None
    plain = UniformInt(4, 64, symmetric)
    mse = UniformInt(4, 64, symmetric, clip_search="mse_h" if weighted else "mse")
    p0, p1 = plain.fit(w), mse.fit(w, importance=imp)
    e0, e1 = mse._group_error(w, p0, imp), mse._group_error(w, p1, imp)
    assert torch.all(e1 <= e0)  # per group: c = 1 is in the grid and wins ties
    assert float(e1.sum()) < 0.95 * float(e0.sum())  # and some groups do clip
    assert torch.equal(p1["scale"], p1["scale"].half().float())
    assert torch.all(p1["zero"] == p1["zero"].round()) and p1["zero"].min() >= 0 and p1["zero"].max() <= 15
    # the grid's c = 1 is exactly the plain rule (a one-point grid gives min/max bit for bit)
    one = UniformInt(4, 64, symmetric, clip_search="mse", clip_steps=1).fit(w)
    assert all(torch.equal(one[k], p0[k]) for k in p0)
    # codes and parameters survive packing
    codes = mse.quantize(w.reshape(64, 192).reshape(64, 3, 64), p1).reshape(64, 192)
    packed = mse.pack(codes, {k: v for k, v in p1.items()}, 192)
    c2, q2 = mse.unpack(packed, mse.padded_k(192))
    assert torch.equal(c2[:, :192], codes) and torch.equal(q2["scale"], p1["scale"])


def test_int_clip_options_are_checked_and_reach_the_format():
    from quantkit.errors import QuantkitError
    from quantkit.formats import make_format
    from quantkit.recipe import recipe_from_dict, weights_from_dict

    with pytest.raises(QuantkitError, match=r"weights\.clip_search = 'l1' is unknown for format 'int': use none, "
                                            r"mse, mse_h") as e:
        recipe_from_dict({"weights": {"format": "int", "bits": 4, "clip_search": "l1"}})
    assert "\n" not in str(e.value)
    spec = weights_from_dict({"format": "int", "bits": 4, "group_size": 64, "clip_search": "mse_h", "clip_steps": 3})
    fmt = make_format(spec)
    assert fmt.fit_uses_importance and fmt.clip_grid == pytest.approx([1.0, 0.85, 0.7])
    assert weights_from_dict(spec.to_dict()) == spec
