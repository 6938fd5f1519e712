"""Activation quantization framework: recipes, the int (FlexQ) quantizer, the A8 search, checkpoints."""

import json

import pytest
import torch

from quantkit.checkpoint import load, save
from quantkit.errors import QuantkitError
from quantkit.formats.act_int import dequantize_act_int, fake_quant_act_int, quantize_act_int
from quantkit.methods.flexq import budget_count
from quantkit.nn import QuantLinear
from quantkit.pipeline import needs_calibration, quantize_model
from quantkit.recipe import load_recipe


def _recipe(**acts):
    return {"name": "t", "method": {"name": "rtn"},
            "weights": {"format": "int", "bits": 6, "group_size": 32, "symmetric": True},
            "activations": {"format": "int", "bits": 6, "group_size": 32, **acts}}


def test_act_int_reference_values():
    x = torch.tensor([[3.5, -7.0, 2.5, 0.0, 3.0, -0.1]])
    q, s = quantize_act_int(x, 4, group_size=4)  # groups: 4 channels, then a short group of 2
    assert s[0].tolist() == pytest.approx([1.0, 3.0 / 7])
    assert q.tolist() == [[4, -7, 2, 0, 7, 0]]  # ties round half to even: 3.5 -> 4, 2.5 -> 2
    assert torch.allclose(dequantize_act_int(q, s, 4), q.float() * s.repeat_interleave(4, -1)[:, :6])
    # an all-zero group is exact and gets scale 1
    q0, s0 = quantize_act_int(torch.zeros(2, 8), 8, group_size=8)
    assert (q0 == 0).all() and (s0 == 1).all()


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_act_int_error_bound(bits):
    x = torch.randn(5, 7, 200)
    y = fake_quant_act_int(x, bits, 64)
    _, s = quantize_act_int(x, bits, 64)
    step = s.repeat_interleave(64, -1)[..., :200]
    assert ((y - x).abs() <= step / 2 + 1e-6).all()


def test_mixed_bits_per_group():
    x = torch.randn(3, 256)
    y = fake_quant_act_int(x, torch.tensor([4, 8]), 128)
    assert torch.equal(y[:, :128], fake_quant_act_int(x[:, :128], 4, 128))
    assert torch.equal(y[:, 128:], fake_quant_act_int(x[:, 128:], 8, 128))


def test_recipe_activation_validation():
    with pytest.raises(QuantkitError, match=r"activations.bits = 9 is out of range .* use 2..8"):
        load_recipe(_recipe(bits=9))
    with pytest.raises(QuantkitError, match=r"unknown recipe key 'a8_budgt'.*did you mean 'a8_budget'"):
        load_recipe(_recipe(a8_budgt=0.1))
    with pytest.raises(QuantkitError, match=r"an activation format"):
        load_recipe({**_recipe(), "activations": {"format": "fp3"}})
    with pytest.raises(QuantkitError, match="needs a recipe-level 'activations'"):
        load_recipe({"name": "t", "overrides": [{"match": ["*"], "activations": {"bits": 8}}]})
    r = load_recipe({**_recipe(), "overrides": [{"match": ["*.down_proj"], "activations": {"bits": 8}}]})
    assert r.act_scheme_for("model.layers.0.mlp.down_proj").bits == 8
    assert r.act_scheme_for("model.layers.0.mlp.up_proj").bits == 6
    assert not needs_calibration(r)
    assert needs_calibration(load_recipe(_recipe(a8_budget="1/7")))


def test_budget_count():
    assert budget_count("1/7", 210) == 30
    assert budget_count(0.5, 7) == 3
    assert budget_count(4, 100) == 4
    with pytest.raises(QuantkitError, match="a8_budget"):
        budget_count("x", 3)


def test_forward_applies_activation_quantization(tiny_model):
    ids = torch.randint(0, 512, (1, 40))
    quantize_model(tiny_model, load_recipe(_recipe()), progress=False)
    q = tiny_model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.act is not None and q.act.enabled
    x = torch.randn(2, 5, q.in_features)
    w = q.dequantize_weight()
    assert torch.allclose(q(x), fake_quant_act_int(x, 6, 32) @ w.t())
    assert not torch.allclose(q(x), x @ w.t())
    tiny_model(ids)


def test_search_selects_budget_and_round_trips(tiny_model, calib, tmp_path):
    ids = torch.randint(0, 512, (1, 40))
    rep = quantize_model(tiny_model, load_recipe(_recipe(a8_budget=3)), calib, progress=False)
    assert len(rep.high_precision) == 3
    mods = {n: m for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)}
    scores = {n: m.act.sensitivity for n, m in mods.items()}
    assert all(s is not None and s > 0 for s in scores.values())
    top = sorted(scores, key=scores.get, reverse=True)[:3]
    assert sorted(rep.high_precision) == sorted(top)
    assert all((mods[n].act.spec.bits == 8) == (n in top) for n in mods)
    y = tiny_model(ids).logits
    out = save(tiny_model, tmp_path / "ck")
    entries = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert sorted(n for n, e in entries.items() if e["act"]["bits"] == 8) == sorted(top)
    m2 = load(out)
    assert torch.equal(m2(ids).logits, y)
    from quantkit.checkpoint_info import inspect_checkpoint

    rows = inspect_checkpoint(out)["modules"]
    assert sum("act int8" in r["scheme"] for r in rows) == 3


def test_sensitivity_prefers_outlier_inputs():
    """A Linear whose inputs carry a large outlier channel loses more at 6 bits than one with flat inputs."""
    from quantkit.methods.flexq import SensitivityCollector
    from quantkit.recipe import ActSpec

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    spec = ActSpec(bits=6, group_size=128, options=(("a8_budget", 1),))
    flat, spiky = SensitivityCollector(spec, lin), SensitivityCollector(spec, lin)
    x = torch.randn(256, 128)
    flat.add(x)
    xs = x.clone()
    xs[:, 5] *= 60
    spiky.add(xs)
    assert spiky.score() > 3 * flat.score() > 0


def test_activation_variants_share_weights(calib):
    """Recipes differing only in activations quantize identical weights, so eval/act_variants may quantize
    once: applying a variant's activations to the base model equals quantizing with the variant."""
    from conftest import tiny_llama
    from quantkit.eval.act_variants import apply_variant

    def rec(**ov):
        d = _recipe(**ov)
        d["method"] = {"name": "gptq"}
        return d

    base_r = load_recipe(rec(a8_budget=2))
    down_r = load_recipe({**rec(), "overrides": [{"match": ["*.down_proj"], "activations": {"bits": 8}}]})
    base, down = tiny_llama(), tiny_llama()
    quantize_model(base, base_r, calib, progress=False)
    quantize_model(down, down_r, calib, progress=False)
    for (n, a), (_, b) in zip(base.named_modules(), down.named_modules(), strict=True):
        if isinstance(a, QuantLinear):
            assert all(torch.equal(a.packed()[k], b.packed()[k]) for k in a.packed_names), n
    ids = torch.randint(0, 512, (1, 40))
    apply_variant(base, down_r)
    assert torch.equal(base(ids).logits, down(ids).logits)
    assert apply_variant(base, base_r) and base.model.layers[0].mlp.down_proj.act.sensitivity is not None


@pytest.mark.parametrize("recipe", ["flexq-w6a8", "comet-w4ax", "arcquant-nvfp4", "w4a8-rtn"])
def test_every_activation_scheme_gives_kernels_a_typed_layout(recipe):
    """The GPU kernels read a calibrated scheme only through `kernel_layout` (ActKernelLayout): int32
    tensors on the asked device that describe exactly the quantizer's own state."""
    from quantkit.nn import ACT_QUANTIZERS, ActKernelLayout

    spec = load_recipe(recipe).activations
    q = ACT_QUANTIZERS[spec.format].for_speed(spec, 1024, 0.1, generator=torch.Generator().manual_seed(0))
    lay = q.kernel_layout("cpu")
    assert isinstance(lay, ActKernelLayout)
    for t in (lay.block_bits, lay.perm, lay.reorder):
        assert t is None or (t.dtype == torch.int32 and t.device.type == "cpu")
    if spec.format == "fmpq":  # COMET: per-block bits over the permuted input, no uniform bits
        assert lay.bits is None and torch.equal(lay.block_bits, q.block_bits.int()) and torch.equal(lay.perm, q.perm)
        assert sorted(lay.perm.tolist()) == list(range(1024)) and set(lay.block_bits.tolist()) <= {4, 8}
    elif spec.format == "nvfp4":  # ARCQuant: channel order and residual count
        assert torch.equal(lay.reorder, q.reorder) and lay.residual == q.residual > 0
    else:  # FlexQ / plain int: uniform bits per token group
        assert lay.bits == spec.bits and lay.block_bits is None and lay.perm is None
