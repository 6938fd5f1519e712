import json

import pytest
import torch

import quantkit as qk
from conftest import tiny_llama
from quantkit.checkpoint import load, save
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.errors import QuantkitError
from quantkit.nn import QuantLinear
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe, recipe_from_dict


def _quantized(recipe, calib, **kw):
    m = tiny_llama(**kw)
    quantize_model(m, load_recipe(recipe), calib, progress=False)
    m.quantkit_recipe = load_recipe(recipe).to_dict()
    return m


def _quant_modules(m):
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "gptq-w3g128", "gptq-w2g64"])
def test_every_decoder_linear_is_swapped_and_output_stays_close(recipe, calib):
    ref = tiny_llama()
    m = _quantized(recipe, calib)
    mods = _quant_modules(m)
    assert len(mods) == 2 * 7  # q k v o gate up down, two layers; lm_head and embeddings untouched
    assert not isinstance(m.lm_head, QuantLinear)
    x = calib[:1]
    with torch.no_grad():
        y, y_ref = m(x).logits, ref(x).logits
    assert torch.isfinite(y).all()
    rel = (y - y_ref).norm() / y_ref.norm()
    assert rel < {"rtn-w4g128": 0.2, "gptq-w3g128": 0.4, "gptq-w2g64": 0.9}[recipe]


def test_quantlinear_forward_equals_dequantized_matmul(calib):
    m = _quantized("rtn-w3g128", calib)
    q = m.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, q.in_features)
    w = q.dequantize_weight()
    assert w.shape == (q.out_features, q.in_features)
    assert torch.equal(q(x), torch.nn.functional.linear(x, w))


def test_gptq_beats_rtn_on_the_layer_outputs(calib):
    ref = tiny_llama()
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y = ref(x).logits
        errs = {r: float((_quantized(r, torch.cat([calib] * 4)).__call__(x).logits - y).norm())
                for r in ("rtn-w2g64", "gptq-w2g64")}
    assert errs["gptq-w2g64"] < errs["rtn-w2g64"]


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "gptq-w3g128"])
def test_save_load_gives_bit_identical_logits(recipe, calib, tmp_path):
    m = _quantized(recipe, calib)
    out = save(m, tmp_path / "ck", max_shard_bytes=200_000)  # force several shards
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and all("-of-" in s for s in shards)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "quantkit" and qc["format_version"] == 1
    assert qc["modules"]["model.layers.1.mlp.down_proj"]["bits"] == load_recipe(recipe).weights.bits
    loaded = load(out)
    x = calib[:2]
    with torch.no_grad():
        assert torch.equal(m(x).logits, loaded(x).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert not list(tmp_path.glob("*.partial"))


def test_untied_model_round_trip(calib, tmp_path):
    m = tiny_llama(tie=False)
    quantize_model(m, load_recipe("rtn-w4g128"), None, progress=False)
    loaded = load(save(m, tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(m(calib).logits, loaded(calib).logits)


def test_nonempty_out_needs_overwrite(calib, tmp_path):
    m = _quantized("rtn-w4g128", calib)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("x")
    with pytest.raises(QuantkitError, match="not empty; pass --overwrite"):
        save(m, tmp_path / "ck")
    save(m, tmp_path / "ck", overwrite=True)
    assert not (tmp_path / "ck" / "keep.txt").exists()
    assert (tmp_path / "ck" / "config.json").exists()


def test_corrupt_and_truncated_checkpoints_give_clear_errors(calib, tmp_path):
    out = save(_quantized("rtn-w4g128", calib), tmp_path / "ck")
    shard = next(out.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantkitError, match="truncated or corrupt"):
        load(out)
    shard.unlink()
    with pytest.raises(QuantkitError, match="missing"):
        load(out)


def test_version_and_shape_mismatch(calib, tmp_path):
    out = save(_quantized("rtn-w4g128", calib), tmp_path / "ck")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="format_version 99"):
        load(out)
    cfg["quantization_config"]["format_version"] = 1
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["bits"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="does not match its quantization_config"):
        load(out)


def test_nan_weight_names_the_layer(calib):
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(QuantkitError, match=r"'model\.layers\.1\.mlp\.up_proj' holds 1 NaN/Inf"):
        quantize_model(m, load_recipe("rtn-w4g128"), None, progress=False)


def test_ignore_and_override_reach_the_checkpoint(calib, tmp_path):
    rec = recipe_from_dict({"name": "mixed", "weights": {"bits": 4, "group_size": 32},
                            "ignore": ["*.self_attn.o_proj"],
                            "overrides": [{"match": ["down_proj"], "weights": {"bits": 8}}]})
    m = tiny_llama()
    quantize_model(m, rec, None, progress=False)
    assert not isinstance(m.model.layers[0].self_attn.o_proj, QuantLinear)
    out = save(m, tmp_path / "ck")
    info = inspect_checkpoint(out)
    rows = {r["name"]: r for r in info["modules"]}
    assert "model.layers.0.self_attn.o_proj" not in rows
    down = rows["model.layers.0.mlp.down_proj"]
    groups = -(-200 // 32)  # in_features 200 pads to 7 groups of 32: padding codes are stored too
    assert down["bits_per_weight"] == pytest.approx((groups * 32 * 8 + groups * 24) / 200)
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["bits_per_weight"] == pytest.approx(4 + 24 / 32, rel=0.05)
    assert info["totals"]["disk_bytes"] < info["totals"]["bf16_bytes"]
    loaded = load(out)
    with torch.no_grad():
        assert torch.equal(m(calib).logits, loaded(calib).logits)


def test_api_quantize_requires_tokenizer_for_calibration():
    with pytest.raises(QuantkitError, match="needs a tokenizer"):
        qk.quantize(tiny_llama(), "gptq-w4g128", nsamples=2, seq_len=32, progress=False)


def test_layer_kwargs_are_captured_per_layer():
    """Gemma-3 passes sliding-window layers another mask and RoPE base than full-attention layers: replaying
    the layers with the kwargs captured for each one reproduces the model's own hidden states."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from quantkit.pipeline import _run_layer, capture_layer_inputs

    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                        "full_attention"], max_position_embeddings=128)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        xs, per_layer = capture_layer_inputs(model, ids, torch.device("cpu"), torch.device("cpu"))
        assert len(per_layer) == 4 and per_layer[0]["attention_mask"] is not per_layer[1]["attention_mask"]
        h = xs[0]
        assert torch.equal(h, ref[0])
        for i, layer in enumerate(model.model.layers):
            h = _run_layer(layer, h, per_layer[i])
            if i < 3:
                assert torch.allclose(h, ref[i + 1], atol=1e-5), i
    assert all(type(m).__name__ != "_KwargsRecorder" for m in model.model.layers)


def test_model_dtype_cast_keeps_packed_dtypes(tiny_model):
    """model.to(torch.bfloat16) casts activations and biases, never the stored scales (fp16, e4m3)."""
    from quantkit.nn import QuantLinear

    quantize_model(tiny_model, load_recipe({"name": "t", "weights": {"format": "int", "bits": 4,
                                                                     "group_size": 32}}), progress=False)
    q = tiny_model.model.layers[0].mlp.down_proj
    before = {n: t.clone() for n, t in q.packed().items()}
    w = q.dequantize_weight()
    tiny_model.to(torch.bfloat16)
    assert isinstance(q, QuantLinear)
    for n, t in q.packed().items():
        assert t.dtype == before[n].dtype and torch.equal(t, before[n]), n
    assert torch.equal(q.dequantize_weight(torch.float32), w)
