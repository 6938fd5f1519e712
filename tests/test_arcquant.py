"""ARCQuant on the pipeline: calibration rules, the augmented input/weight, checkpoints."""

import json

import pytest
import torch

from quantkit.arc_numerics import arc_fake_quant_activation, arc_weight
from quantkit.checkpoint import load, save
from quantkit.errors import QuantkitError
from quantkit.formats.nvfp4 import nvfp4_dequantize
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


@pytest.mark.parametrize("recipe", ["arcquant-nvfp4", "nvfp4-rtn", "nvfp4-w4a16"])
def test_arcquant_pipeline_round_trip(recipe, tiny_model, calib, tmp_path):
    ids = torch.randint(0, 512, (1, 40))
    ref = tiny_model(ids).logits
    quantize_model(tiny_model, load_recipe(recipe), calib, progress=False)
    y = tiny_model(ids).logits
    assert torch.isfinite(y).all() and (y - ref).square().mean() < 0.1 * ref.square().mean()
    q = tiny_model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear)
    if recipe == "arcquant-nvfp4":
        assert q.act.residual > 0 and q.weight_in_features == 208 + q.act.residual
    out = save(tiny_model, tmp_path / "ck")
    entries = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    e = entries["model.layers.0.mlp.down_proj"]
    if recipe != "nvfp4-w4a16":
        assert e["act"]["residual_channels"] == q.act.residual
        assert e["act"]["bits_per_activation"] == pytest.approx(4.5 * q.weight_in_features / 200, abs=1e-4)
    assert torch.equal(load(out)(ids).logits, y)


def test_calibrated_activations_need_data_even_with_rtn_weights(tiny_model):
    from quantkit.pipeline import needs_calibration

    rec = load_recipe("arcquant-nvfp4")
    assert rec.method.name == "rtn" and needs_calibration(rec) and not needs_calibration(load_recipe("nvfp4-rtn"))
    with pytest.raises(QuantkitError, match="recipe 'arcquant-nvfp4' needs calibration data"):
        quantize_model(tiny_model, rec, None, progress=False)
