"""ARCQuant on the pipeline: calibration rules, the augmented input/weight, checkpoints."""

import json

import pytest
import torch

from quantkit.arc_numerics import arc_fake_quant_activation, arc_weight
from quantkit.checkpoint import load, save
from quantkit.errors import QuantkitError
from quantkit.formats.nvfp4 import nvfp4_dequantize
from quantkit.methods import HessianAccumulator, gptq_quantize
from quantkit.methods.arcquant import ARCActQuantizer, ARCCollector
from quantkit.nn import QuantLinear
from quantkit.pipeline import quantize_model
from quantkit.recipe import ActSpec, load_recipe

SPEC = ActSpec(format="nvfp4", bits=4, group_size=16)


def test_collector_rules():
    c = ARCCollector(64)
    x = torch.full((2, 64), 0.001)
    x[0, 3] = 1.0    # token 0: one entry above its own max/8
    x[1, :8] = 0.05  # token 1: 8 entries at its max (above its max/8) but below the layer max/8
    c.add(x)
    assert c.ratio("per_token") == pytest.approx(9 / 128)
    assert c.ratio("layer_max") == pytest.approx(1 / 128)
    assert c.residual_channels("per_token") == 16  # ceil(64 * 9/128 / 16) * 16
    assert c.residual_channels("per_token", multiple=64) == 64
    assert c.residual_channels("per_token", cap=0.1) == 0
    assert torch.equal(torch.argsort(c.chan_max, stable=True)[-1], torch.tensor(3))


@pytest.mark.parametrize("k,s", [(64, 16), (72, 32), (48, 0)])
def test_augmented_input_and_weight_match_reference(k, s):
    reorder = torch.randperm(k)
    q = ARCActQuantizer(SPEC, k, reorder, s)
    x, w = torch.randn(5, k), torch.randn(7, k)
    xa = q(x)
    assert xa.shape[-1] == q.weight_in_features == -(-k // 16) * 16 + s
    ref = arc_fake_quant_activation(x, reorder, s)
    assert torch.equal(torch.cat([xa[:, :k], xa[:, q.kp:]], -1), ref)
    assert (xa[:, k:q.kp] == 0).all()
    wt = q.transform_weight(w)  # the float W' that the nvfp4 weight format then quantizes
    wq = arc_weight(w, reorder, s)
    wd = nvfp4_dequantize(wq.packed, wq.block_scales, wq.tensor_scale)
    from quantkit.formats.nvfp4 import nvfp4_fake_quant

    assert torch.equal(nvfp4_fake_quant(wt), wd)
    # without quantization, the augmented product is x·Wᵀ plus the duplicated tail once more
    xt = q.transform_input(x)
    tail = reorder[k - s:]
    assert torch.allclose(xt @ wt.t(), x @ w.t() + x[:, tail] @ w[:, tail].t(), atol=1e-4)


def test_bad_settings():
    with pytest.raises(QuantkitError, match="group_size: 16"):
        ARCActQuantizer(ActSpec(format="nvfp4", bits=4, group_size=32), 64)
    with pytest.raises(QuantkitError, match="multiple of 16"):
        ARCActQuantizer(SPEC, 64, None, 8)
    with pytest.raises(QuantkitError, match="residual_rule"):
        load_recipe({"name": "x", "weights": {"format": "nvfp4", "bits": 4, "group_size": 16},
                     "activations": {"format": "nvfp4", "bits": 4, "group_size": 16, "residual_rule": "tok"}}) \
            and ARCActQuantizer.collector(ActSpec(format="nvfp4", bits=4, group_size=16,
                                                  options=(("residual_rule", "tok"),)), torch.nn.Linear(4, 4))


@pytest.mark.parametrize("recipe", ["arcquant-nvfp4", "arcquant-nvfp4-gptq", "nvfp4-rtn", "nvfp4-w4a16"])
def test_arcquant_pipeline_round_trip(recipe, tiny_model, calib, tmp_path):
    ids = torch.randint(0, 512, (1, 40))
    ref = tiny_model(ids).logits
    quantize_model(tiny_model, load_recipe(recipe), calib, progress=False)
    y = tiny_model(ids).logits
    assert torch.isfinite(y).all() and (y - ref).square().mean() < 0.1 * ref.square().mean()
    q = tiny_model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear)
    if recipe.startswith("arcquant"):
        assert q.act.residual > 0 and q.weight_in_features == 208 + q.act.residual
    out = save(tiny_model, tmp_path / "ck")
    entries = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    e = entries["model.layers.0.mlp.down_proj"]
    if recipe != "nvfp4-w4a16":
        assert e["act"]["residual_channels"] == q.act.residual
        assert e["act"]["bits_per_activation"] == pytest.approx(4.5 * q.weight_in_features / 200, abs=1e-4)
    assert torch.equal(load(out)(ids).logits, y)


def test_arcquant_scale_search_round_trip(tiny_model, calib, tmp_path):
    """Searched weight block scales: same layout, exact save/load, and the appended residual columns (copies of
    the outlier columns) get the same scales as those columns where the outlier range is whole blocks."""
    rec = load_recipe("arcquant-nvfp4").to_dict()
    rec["weights"]["scale_search"] = "mse"
    ids = torch.randint(0, 512, (1, 40))
    quantize_model(tiny_model, load_recipe(rec), calib, progress=False)
    y = tiny_model(ids).logits
    q = tiny_model.model.layers[0].self_attn.q_proj  # K = 96: the outlier channels fill whole 16-blocks
    k, s = q.in_features, q.act.residual
    assert q.spec.option("scale_search") == "mse" and s > 0 and (k - s) % 16 == 0
    bs = q.block_scales.float()
    assert torch.equal(bs[:, k // 16:], bs[:, (k - s) // 16: k // 16])
    out = save(tiny_model, tmp_path / "ck")
    e = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert e["model.layers.0.self_attn.q_proj"]["scale_search"] == "mse"
    assert torch.equal(load(out)(ids).logits, y)


def test_calibrated_activations_need_data_even_with_rtn_weights(tiny_model):
    from quantkit.pipeline import needs_calibration

    rec = load_recipe("arcquant-nvfp4")
    assert rec.method.name == "rtn" and needs_calibration(rec) and needs_calibration(load_recipe("nvfp4-rtn"))
    assert not needs_calibration(load_recipe("nvfp4-w4a16"))
    with pytest.raises(QuantkitError, match="recipe 'arcquant-nvfp4' needs calibration data"):
        quantize_model(tiny_model, rec, None, progress=False)


@pytest.mark.parametrize("k,s", [(64, 16), (40, 16)])
def test_gptq_solves_main_columns_and_copies_outliers(k, s):
    """GPTQ's Hessian input is X̃ = Q1 + Q2 on the outlier channels (Kp wide), and the completed weight's
    appended columns carry the quantized outlier columns (exact copies when they are whole blocks)."""
    from quantkit.formats.nvfp4 import NVFP4Format

    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 5, k, generator=g)
    x[..., :4] *= 30
    q = ARCActQuantizer(SPEC, k, torch.argsort(x.abs().amax((0, 1))), s)
    xt = q.transform_input(x)
    full = q.quantize_input(xt)
    h = q.hessian_input(x)
    assert h.shape[-1] == q.gptq_in_features == q.kp
    expect = full[..., : q.kp].clone()
    expect[..., k - s : k] += full[..., q.kp :]
    assert torch.equal(h, expect)

    # gptq_hessian: float takes the Hessian over the plain reordered input (as weight-only GPTQ does)
    spec_f = ActSpec(format="nvfp4", bits=4, group_size=16, options=(("gptq_hessian", "float"),))
    qf = ARCActQuantizer(spec_f, k, q.reorder.long(), s)
    hf = qf.hessian_input(x)
    assert hf.shape[-1] == q.kp and torch.equal(hf[..., :k], x[..., q.reorder.long()])
    assert not hf[..., k:].any()
    with pytest.raises(QuantkitError, match="gptq_hessian = 'exact' is unknown"):
        ARCActQuantizer(ActSpec(format="nvfp4", bits=4, group_size=16, options=(("gptq_hessian", "exact"),)),
                        k, q.reorder.long(), s)

    w = torch.randn(24, k, generator=g)
    solve = q.gptq_weight(q.transform_weight(w))
    assert torch.equal(solve, q.transform_weight(w)[:, : q.kp])
    fmt = NVFP4Format(4, 16).prepare(q.transform_weight(w))
    acc = HessianAccumulator(q.kp, "cpu")
    acc.add(h)
    codes, params = gptq_quantize(solve, acc.h, fmt, block_size=16)
    c2, p2 = q.complete_gptq(codes, params, fmt)
    assert c2.shape == (24, q.weight_in_features) and p2["block_scale"].shape[1] == q.weight_in_features // 16
    deq = fmt.dequantize_grouped(c2, p2)
    main = fmt.dequantize_grouped(codes, params)
    assert torch.equal(deq[:, : q.kp], main)
    if (k - s) % 16 == 0:
        assert torch.equal(deq[:, q.kp :], main[:, k - s : k])
    else:  # re-blocked: on the NVFP4 grid of its own block scales, within half a step of the copy
        step = (p2["block_scale"] * p2["tensor_scale"])[:, q.kp // 16 :].repeat_interleave(16, 1)[:, :s]
        assert ((deq[:, q.kp :] - main[:, k - s : k]).abs() <= step + 1e-7).all()
