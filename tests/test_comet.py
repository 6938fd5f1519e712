"""COMET FMPQ: outlier statistic, channel permutation, per-block INT4/INT8 activations, checkpoints."""

import json

import pytest
import torch

from quantkit.checkpoint import load, save
from quantkit.errors import QuantkitError
from quantkit.formats.act_int import fake_quant_act_int
from quantkit.methods.comet import ChannelScoreCollector, FMPQActQuantizer, plan_blocks
from quantkit.nn import QuantLinear
from quantkit.pipeline import quantize_model
from quantkit.recipe import ActSpec, load_recipe


def test_score_is_relative_to_the_token():
    c = ChannelScoreCollector(4)
    c.add(torch.tensor([[1.0, 1.0, 1.0, 1.0], [100.0, 100.0, 100.0, 100.0], [1.0, 1.0, 1.0, 9.0]]))
    # the loud token is loud everywhere (score 1); channel 3 spikes above its own token's rms
    rms = (torch.tensor([1.0, 1.0, 1.0, 81.0]).mean()).sqrt()
    assert torch.allclose(c.score, torch.tensor([1.0, 1.0, 1.0, 9.0 / rms]))


def test_plan_blocks_gathers_outliers_first():
    score = torch.ones(300)
    score[[7, 150, 299]] = torch.tensor([20.0, 30.0, 10.0])
    perm, bits = plan_blocks(score, threshold=8.0)
    assert perm[:3].tolist() == [150, 7, 299] and sorted(perm.tolist()) == list(range(300))
    assert bits.tolist() == [8, 4, 4]  # 3 blocks (128, 128, short 44); the outliers fit in the first
    _, capped = plan_blocks(torch.full((1024,), 50.0), threshold=8.0, max_int8_share=0.2)
    assert capped.tolist() == [8] + [4] * 7  # floor(0.2 * 8) = 1


def test_quantizer_permutes_then_quantizes_blocks():
    spec = ActSpec(format="fmpq", bits=4, group_size=16)
    perm = torch.randperm(40)
    q = FMPQActQuantizer(spec, 40, perm, torch.tensor([8, 4, 4], dtype=torch.int8))
    x, w = torch.randn(3, 40), torch.randn(5, 40)
    assert torch.allclose(q.transform_input(x) @ q.transform_weight(w).t(), x @ w.t(), atol=1e-5)
    xp = x[:, perm]
    expect = torch.cat([fake_quant_act_int(xp[:, :16], 8, 16), fake_quant_act_int(xp[:, 16:], 4, 16)], 1)
    assert torch.equal(q(x), expect)


def _recipe(bits=4, method="gptq", share=0.5):
    return load_recipe({"name": "c", "method": {"name": method},
                        "weights": {"format": "int", "bits": 4, "group_size": 32},
                        "activations": {"format": "fmpq", "bits": bits, "group_size": 32, "outlier_threshold": 4.0,
                                        "max_int8_share": share}})


def test_comet_pipeline_round_trip_and_shared_weights(tiny_model, calib, tmp_path):
    from conftest import tiny_llama
    from quantkit.eval.act_variants import apply_variant

    ids = torch.randint(0, 512, (1, 40))
    ref = tiny_model(ids).logits
    quantize_model(tiny_model, _recipe(), calib, progress=False)
    mods = {n: m for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)}
    shares = [m.act.int8_share() for m in mods.values()]
    assert all(s <= 0.5 for s in shares) and any(s > 0 for s in shares)
    assert any(not torch.equal(m.act.perm, torch.arange(m.in_features, dtype=torch.int32)) for m in mods.values())
    y = tiny_model(ids).logits
    assert (y - ref).abs().max() < 0.5 * ref.abs().max()
    out = save(tiny_model, tmp_path / "ck")
    entry = json.loads((out / "config.json").read_text())["quantization_config"]["modules"][
        "model.layers.0.mlp.down_proj"]
    assert entry["act"]["format"] == "fmpq" and entry["act"]["blocks"] == 7  # K = 200 -> 7 blocks of 32
    m2 = load(out)
    assert torch.equal(m2(ids).logits, y)
    # the all-INT8 recipe (w4a8-gptq's construction) quantizes the same weights: one quantization serves both
    a8 = tiny_llama()
    quantize_model(a8, _recipe(bits=8), calib, progress=False)
    for n, m in a8.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.qweight, mods[n].qweight) and torch.equal(m.act.perm, mods[n].act.perm)
            assert int(m.act.block_bits.min()) == 8
    apply_variant(tiny_model, _recipe(bits=8))
    assert torch.equal(tiny_model(ids).logits, a8(ids).logits)


def test_kv4_recipe_applies_in_evaluation_and_checkpoint(tiny_model, tmp_path):
    import quantkit as qk

    r = load_recipe({"name": "kv", "weights": {"format": "int", "bits": 8, "group_size": 32},
                     "kv_cache": {"format": "int4", "group_size": 8}})
    ids = torch.randint(0, 512, (1, 48))
    ref = tiny_model(ids, use_cache=False).logits
    quantize_model(tiny_model, r, progress=False)
    assert tiny_model.quantkit_kv_cache == {"format": "int4", "group_size": 8}
    from quantkit.pipeline import kv_cache_context

    plain = tiny_model(ids, use_cache=False).logits
    with kv_cache_context(tiny_model):
        kv = tiny_model(ids, use_cache=False).logits
    assert not torch.equal(kv, plain) and (kv - ref).abs().max() < 0.5 * ref.abs().max()
    m2 = qk.load(save(tiny_model, tmp_path / "ck"))
    assert m2.quantkit_kv_cache == {"format": "int4", "group_size": 8}
    with kv_cache_context(m2):
        assert torch.equal(m2(ids, use_cache=False).logits, kv)
    with pytest.raises(QuantkitError, match="kv_cache.format"):
        load_recipe({"name": "kv", "kv_cache": {"format": "int2"}})
