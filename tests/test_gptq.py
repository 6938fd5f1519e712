import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats import UniformInt
from quantkit.methods import HessianAccumulator, gptq_quantize, rtn_quantize


def _problem(k=192, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.2 + torch.eye(k))
    w = torch.randn(n, k, generator=g)
    acc = HessianAccumulator(k, "cpu")
    for chunk in x.split(500):
        acc.add(chunk)
    return x, w, acc.h


def test_hessian_accumulator_matches_closed_form():
    x, _, h = _problem()
    assert torch.allclose(h, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)


def _out_err(x, w, fmt, codes, params):
    return float(((x @ (w - fmt.dequantize_grouped(codes, params)).t()) ** 2).mean())


def test_gptq_beats_rtn_on_output_error():
    x, w, h = _problem()
    for bits, group in [(4, 64), (3, 64), (2, 32), (3, None)]:
        fmt = UniformInt(bits, group)
        rtn = _out_err(x, w, fmt, *rtn_quantize(w, fmt))
        for act_order in (False, True):
            gptq = _out_err(x, w, fmt, *gptq_quantize(w, h, fmt, act_order=act_order, block_size=32))
            assert gptq < 0.8 * rtn, (bits, group, act_order, gptq, rtn)


def test_diagonal_hessian_reduces_to_rtn():
    # with uncorrelated inputs there is nothing to compensate: GPTQ must pick exactly the RTN codes
    w = _problem()[1]
    h = torch.diag(torch.rand(w.shape[1]) + 0.5)
    fmt = UniformInt(3, 64)
    c_rtn, p_rtn = rtn_quantize(w, fmt)
    c_gptq, p_gptq = gptq_quantize(w, h, fmt, damping=0.0)
    assert torch.equal(c_rtn, c_gptq)
    assert torch.equal(p_rtn["scale"], p_gptq["scale"])


def test_block_size_does_not_change_the_result_much():
    _, w, h = _problem()
    fmt = UniformInt(4, 64)
    a = gptq_quantize(w, h, fmt, block_size=128)
    b = gptq_quantize(w, h, fmt, block_size=17)  # blocks that cut groups in the middle
    diff = (fmt.dequantize_grouped(*a) - fmt.dequantize_grouped(*b)).abs().max()
    assert diff < 1e-3 or (a[0] != b[0]).float().mean() < 0.01


def test_singular_hessian_is_damped_not_nan():
    _, w, _ = _problem(k=64)
    x = torch.randn(10, 64)  # rank 10 < 64
    h = 2 * x.t() @ x / 10
    h[:, 5] = 0
    h[5, :] = 0  # a dead input
    fmt = UniformInt(2, 32)
    codes, params = gptq_quantize(w, h, fmt, damping=0.0)
    deq = fmt.dequantize_grouped(codes, params)
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, 5].abs() <= params["scale"][:, 0] * 0.5 + 1e-6)  # dead column quantizes 0


@pytest.mark.parametrize("k", [5, 130, 700])
def test_inplace_inverse_cholesky_matches(k):
    """The in-place factorization used for wide Hessians on GPUs gives the same U (H⁻¹ = UᵀU)."""
    from quantkit.methods.gptq import _inverse_cholesky, _inverse_cholesky_inplace

    g = torch.Generator().manual_seed(k)
    x = torch.randn(2 * k, k, generator=g, dtype=torch.float64)
    h = (x.t() @ x).float()
    a = _inverse_cholesky(h.clone(), 0.01)
    b = _inverse_cholesky_inplace(h.clone(), 0.01, block=64)
    assert torch.equal(torch.triu(b), b)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    dead = torch.zeros(k, k)  # a singular Hessian is damped, never NaN
    dead[: k // 2, : k // 2] = torch.eye(k // 2)
    assert torch.isfinite(_inverse_cholesky_inplace(dead + 0 * h, 0.01, block=64)).all()


def test_inplace_inverse_cholesky_retries_with_more_damping():
    """An indefinite H fails the first Cholesky; the in-place path restores H from its upper triangle and
    lands on the same damping (and so the same U) as the reference path."""
    from quantkit.methods.gptq import _inverse_cholesky, _inverse_cholesky_inplace

    k = 300
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    ev = torch.linspace(1.0, 2.0, k, dtype=torch.float64)
    ev[7] = -0.05  # needs λ·mean(diag) > 0.05: 0.01 fails, 0.1 succeeds
    h = (q * ev) @ q.t()
    h = ((h + h.t()) / 2).float()
    a = _inverse_cholesky(h.clone(), 0.01)
    b = _inverse_cholesky_inplace(h.clone(), 0.01, block=64)
    assert torch.equal(torch.triu(b), b)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4
    u = b.double()
    hd = h.double() + torch.eye(k, dtype=torch.float64) * 0.1 * h.double().diagonal().mean()
    assert float((u.t() @ u @ hd - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-3


def test_sink_weight_counts_the_first_token_of_each_sequence():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    acc = HessianAccumulator(5, "cpu", sink_weight=9.0)
    acc.add(x)
    weighted = torch.cat([x[:, :1] * 3.0, x[:, 1:]], dim=1).reshape(-1, 5)  # sqrt(9) on position 0
    torch.testing.assert_close(acc.h, 2.0 / 21 * weighted.t() @ weighted)
    flat = HessianAccumulator(5, "cpu", sink_weight=9.0)
    flat.add(x.reshape(-1, 5))  # no sequence dimension: nothing to weight
    torch.testing.assert_close(flat.h, 2.0 / 21 * x.reshape(-1, 5).t() @ x.reshape(-1, 5))


def test_sink_weight_reaches_the_pipeline_and_protects_the_first_token():
    """Through quantize_model the Hessian hook sees [batch, seq, K] inputs: a large sink weight changes the
    GPTQ codes and lowers the first token's output error."""
    import dataclasses

    from conftest import tiny_llama
    from quantkit.pipeline import quantize_model
    from quantkit.recipe import load_recipe, recipe_from_dict

    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    base = load_recipe("gptq-w4g128")
    errs = {}
    for w in (1.0, 1e4):
        ref, m = tiny_llama(), tiny_llama()
        method = dataclasses.replace(base.method, settings=dataclasses.replace(base.method.settings, sink_weight=w))
        quantize_model(m, dataclasses.replace(base, method=method), calib, progress=False)
        with torch.no_grad():
            a, b = ref(calib).logits, m(calib).logits
        errs[w] = float((a[:, 0] - b[:, 0]).norm() / a[:, 0].norm())
    assert errs[1e4] < errs[1.0], errs
    with pytest.raises(QuantkitError, match=r"method.sink_weight = 0.0 must be > 0"):
        recipe_from_dict({"name": "x", "method": {"name": "gptq", "sink_weight": 0}})


def test_act_order_fits_every_group_on_the_original_weights():
    # K = 160 with groups of 64: two full groups and a short last one of 32 columns. With act-order the
    # columns are visited by descending diag(H), the groups stay contiguous and are fitted up front on the
    # weights as given (what RTN fits); plain order fits each group on the error-updated weights
    x, w, h = _problem(k=160)
    fmt = UniformInt(4, 64)
    _, p_rtn = rtn_quantize(w, fmt)
    codes, p_act = gptq_quantize(w, h, fmt, act_order=True, block_size=48)
    assert p_act["scale"].shape == (w.shape[0], 3)
    assert torch.equal(p_act["scale"], p_rtn["scale"]) and torch.equal(p_act["zero"], p_rtn["zero"])
    _, p_plain = gptq_quantize(w, h, fmt, act_order=False, block_size=48)
    assert torch.equal(p_plain["scale"][:, 0], p_rtn["scale"][:, 0])
    assert not torch.equal(p_plain["scale"][:, 1:], p_rtn["scale"][:, 1:])
    # the codes come back in the original column order: they decode under the contiguous groups
    assert _out_err(x, w, fmt, codes, p_act) < 0.8 * _out_err(x, w, fmt, *rtn_quantize(w, fmt))
