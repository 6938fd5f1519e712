"""transformers, natively: after `import quantkit`, AutoModelForCausalLM.from_pretrained(<quantkit checkpoint>)
is the model quantkit.load returns (quantkit.integrations.transformers); without quantkit it refuses to load."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import quantkit as qk
from conftest import tiny_llama
from quantkit.nn import QuantLinear
from quantkit.pipeline import kv_cache_context, quantize_model
from quantkit.recipe import load_recipe, shipped_recipes

RECIPES = sorted(shipped_recipes())


def _calib():
    return torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))


def _checkpoint(out, recipe, **model_kw):
    m = tiny_llama(**model_kw)
    rec = load_recipe(recipe)
    quantize_model(m, rec, _calib(), progress=False)
    m.quantkit_recipe = rec.to_dict()
    return qk.save(m, out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(recipe, **model_kw):
        key = (recipe, tuple(sorted(model_kw.items())))
        if key not in made:
            made[key] = _checkpoint(tmp_path_factory.mktemp("ckpt") / recipe, recipe, **model_kw)
        return made[key]

    return get


def _from_pretrained(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


def _same_model(hf, ref):
    hs, rs = hf.state_dict(), ref.state_dict()
    assert list(hs) == list(rs)
    for k in rs:
        assert hs[k].dtype == rs[k].dtype and hs[k].device == rs[k].device and torch.equal(hs[k], rs[k]), k
    q = {n: type(m) for n, m in hf.named_modules() if isinstance(m, QuantLinear)}
    assert q and q == {n: type(m) for n, m in ref.named_modules() if isinstance(m, QuantLinear)}
    assert hf.quantkit_recipe == ref.quantkit_recipe and hf.quantkit_kv_cache == ref.quantkit_kv_cache


@pytest.mark.parametrize("recipe", RECIPES)
def test_from_pretrained_is_quantkit_load(recipe, checkpoints):
    # a KV4 recipe rotates K/V along head_dim, which must be a power of two: 128 / 4 heads, not 96 / 4
    path = checkpoints(recipe, hidden=128) if load_recipe(recipe).kv_cache else checkpoints(recipe)
    ref, hf = qk.load(path), _from_pretrained(path)
    _same_model(hf, ref)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ref(x).logits)


def _accelerate_for_device_map() -> bool:
    """transformers takes `device_map` only with accelerate at or above its minimum (5.0: 1.1; accelerate 1.0,
    the lowest pyproject.toml admits, is below it)."""
    from transformers.utils import is_accelerate_available

    return is_accelerate_available()


@pytest.mark.parametrize("device_map", [None, "cpu"])
@pytest.mark.parametrize("recipe", ["gptq-w4g128", "nvfp4-w4a16", "flexq-w6a6"])
def test_dtype_and_device_map_honoured(recipe, device_map, checkpoints):
    if device_map is not None and not _accelerate_for_device_map():
        pytest.skip("this transformers takes device_map only with a newer accelerate")
    path = checkpoints(recipe)
    hf = _from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)
    ref = qk.load(path, dtype=torch.bfloat16)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16 and hf.model.norm.weight.dtype == torch.bfloat16
    q = hf.model.layers[0].mlp.down_proj
    assert all(t.dtype == ref.model.layers[0].mlp.down_proj.packed()[n].dtype for n, t in q.packed().items())
    assert {t.device.type for t in hf.state_dict().values()} == {"cpu"}
    _same_model(hf, ref)
    x = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = hf(x).logits
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref(x).logits)


def test_generate_uses_the_kv4_cache(checkpoints):
    from quantkit.kvcache import KV4Cache

    path = checkpoints("comet-w4a4kv4", hidden=128)  # head_dim 32: the recipe rotates K/V (a power of two)
    hf, ref = _from_pretrained(path), qk.load(path)
    assert hf.quantkit_kv_cache["format"] == "int4"
    x = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(7))
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    out = hf.generate(x, return_dict_in_generate=True, **kw)
    cache = getattr(out, "past_key_values", None)
    assert isinstance(cache, KV4Cache) and cache.rotate
    with kv_cache_context(ref):
        want = ref.generate(x, **kw)
    assert torch.equal(out.sequences, want)


def test_checkpoint_written_before_loads_too(checkpoints, tmp_path):
    """A checkpoint without the transformers guard key (format_version 1, as written before) loads both ways."""
    import shutil

    src = checkpoints("rtn-w4g128")
    old = tmp_path / "old"
    shutil.copytree(src, old)
    cfg = json.loads((old / "config.json").read_text())
    assert cfg.pop("transformers_weights")
    (old / "config.json").write_text(json.dumps(cfg, indent=2))
    ref, hf = qk.load(old), _from_pretrained(old)
    _same_model(hf, ref)
    assert not hasattr(hf.config, "transformers_weights") and not hasattr(ref.config, "transformers_weights")


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    """A fresh interpreter outside the repository (quantkit from its installation): with the repository root on
    sys.path, transformers' `import kernels` would find the repo's kernels/ folder, which imports quantkit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**env, "TRANSFORMERS_VERBOSITY": "error"}, cwd=str(cwd), timeout=300)


def test_plain_transformers_refuses_with_the_message(checkpoints, tmp_path):
    path = checkpoints("rtn-w4g128")
    r = _run(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(path)!r})
        except ValueError as e:
            assert "quantkit" not in sys.modules
            print("REFUSED:", e)
        else:
            print("LOADED")
        """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "REFUSED:" in r.stdout and "`import quantkit`" in r.stdout, r.stdout + r.stderr


def test_import_quantkit_first_then_transformers(checkpoints, tmp_path):
    """What users write: `import quantkit` (no torch yet), then transformers' from_pretrained."""
    path = checkpoints("w4a8-rtn")
    r = _run(f"""
        import sys
        import quantkit
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(path)!r})
        ref = quantkit.load({str(path)!r})
        x = torch.arange(12).view(1, 12)
        with torch.no_grad():
            print("EQUAL", torch.equal(m(x).logits, ref(x).logits), type(m.model.layers[0].mlp.up_proj).__name__)
        """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "EQUAL True QuantLinear" in r.stdout, r.stdout + r.stderr


def test_register_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from quantkit.integrations import transformers as integration

    integration.register()
    integration.register()
    assert integration.is_registered() and AUTO_QUANTIZER_MAPPING["quantkit"] is integration.QuantkitHfQuantizer


def test_transformers_first_then_quantkit(checkpoints, tmp_path):
    """transformers' quantizer table already imported when quantkit is: registered at `import quantkit`."""
    path = checkpoints("rtn-w4g128")
    r = _run(f"""
        import transformers.quantizers.auto
        from transformers import AutoModelForCausalLM
        import quantkit
        m = AutoModelForCausalLM.from_pretrained({str(path)!r})
        print("LOADED", type(m.model.layers[0].self_attn.o_proj).__name__)
        """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "LOADED QuantLinear" in r.stdout, r.stdout + r.stderr


def test_quantkit_save_of_a_transformers_loaded_model(checkpoints, tmp_path):
    path = checkpoints("comet-w4ax")
    hf = _from_pretrained(path)
    out = qk.save(hf, tmp_path / "again")
    x = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(qk.load(out)(x).logits, qk.load(path)(x).logits)
        assert torch.equal(_from_pretrained(out)(x).logits, hf(x).logits)
