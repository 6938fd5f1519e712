"""KV4 cache: numerics, packing, generate() vs the full-window evaluation path, bytes, errors."""

import pytest
import torch

from conftest import tiny_llama
from quantkit.kvcache import (
    KV4Cache,
    KV4Error,
    cache_argument,
    dequantize_kv,
    fake_quant_kv,
    kv4_bytes_per_token,
    kv4_enabled,
    pack_int4,
    quantize_kv,
    unpack_int4,
)


def sharp_llama(seed: int = 0, std: float = 0.2, **kw):
    """tiny_llama with larger random weights: peaked attention and varied greedy tokens, so that KV4 visibly
    changes generation (with the default 0.02 init the greedy output is one token repeated)."""
    model = tiny_llama(seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (3, 2, 5, 24), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 2, 5, 12) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [8, 12, 24])
def test_fake_quant_equals_dequant_of_quant(dtype, group):
    t = (torch.randn(2, 3, 7, 24) * 3 + 1).to(dtype)
    packed, scale, zero = quantize_kv(t, group)
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == (2, 3, 7, 24 // group)
    fq = fake_quant_kv(t, group)
    assert fq.dtype == dtype and torch.equal(fq, dequantize_kv(packed, scale, zero, group, dtype))
    # asymmetric 4-bit: error at most half a step (+ fp16 rounding of scale/zero)
    step = scale.float().repeat_interleave(group, dim=-1)
    err = (fq.float() - t.float()).abs()
    assert bool((err <= 0.5 * step + 2e-3 * t.float().abs().amax() + 1e-2 * step).all())
    # quantizing the dequantized values again returns the same codes (the grid is reproducible)
    assert torch.equal(unpack_int4(quantize_kv(fq.float(), group)[0]), unpack_int4(packed))


def test_constant_and_zero_groups():
    t = torch.zeros(1, 1, 2, 16)
    t[0, 0, 1] = 3.25
    assert torch.equal(fake_quant_kv(t, 8), t)


def test_generate_matches_full_recompute_eval_path():
    """generate() with a KV4Cache == a greedy loop that recomputes the whole sequence every step under
    kv4_enabled (no cache carried between steps): same 16 tokens, and the same stored codes."""
    model = sharp_llama()
    prompt = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    cache = KV4Cache(model.config, group=12)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                         **{cache_argument(model): cache})
    assert out.shape == (2, 24) and cache.get_seq_length() == 23

    seq = prompt
    with torch.no_grad(), kv4_enabled(model, group=12):
        for _ in range(16):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(seq, out)

    # the eval path stores what the cache stored (per-token groups: nothing depends on the chunking)
    fresh = KV4Cache(model.config, group=12)
    with torch.no_grad():
        model(out[:, :-1], **{cache_argument(model): fresh})
    for a, b in zip(cache.layers, fresh.layers, strict=True):
        for key in ("k", "v"):
            codes_a, codes_b = unpack_int4(a.stored()[key][0]), unpack_int4(b.stored()[key][0])
            assert (codes_a == codes_b).float().mean() >= 0.999

    # KV4 matters here: the unquantized greedy output differs
    plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert not torch.equal(plain, out)
    with kv4_enabled(model, group=12):  # generate() inside the context gets a KV4Cache by itself
        again = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert torch.equal(again, out)


def test_kv4_enabled_changes_logits_and_restores():
    model = sharp_llama(seed=1)
    x = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        with kv4_enabled(model):  # default group: whole head_dim (24) here
            kv4 = model(x, use_cache=False).logits
        after = model(x, use_cache=False).logits
    assert not torch.allclose(ref, kv4)
    assert torch.equal(ref, after) and "generate" not in model.__dict__
    with torch.no_grad(), kv4_enabled(model, group=24), pytest.raises(KV4Error, match="DynamicCache"):
        from transformers import DynamicCache

        model(x, **{cache_argument(model): DynamicCache(config=model.config)})


def test_bytes_per_token_at_most_0_3_of_bf16():
    model = tiny_llama(hidden=256, layers=2)  # head_dim 64 as SmolLM2; default group 64
    cache = KV4Cache(model.config)
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 40)), **{cache_argument(model): cache})
    rep = cache.memory_report()
    assert rep["group"] == 64 and rep["tokens"] == 40 and rep["batch"] == 2
    assert rep["bf16_bytes"] == 2 * 2 * 2 * 2 * 40 * 64 * 2  # layers·(K,V)·batch·kv_heads·tokens·hd·2 B
    assert rep["kv4_bytes"] == 2 * 2 * 40 * kv4_bytes_per_token(2, 64, 64)
    assert rep["ratio"] <= 0.3 and rep["ratio"] == pytest.approx(36 / 128)
    assert kv4_bytes_per_token(8, 128, 128) / (2 * 8 * 128 * 2) <= 0.3


@pytest.mark.parametrize("group", [5, 7, 48, 0, 1, 2.0, True])
def test_bad_group_is_one_value_error_line(group, tiny_model):
    with pytest.raises(ValueError) as e:
        KV4Cache(tiny_model.config, group=group)
    msg = str(e.value)
    assert isinstance(e.value, KV4Error) and "\n" not in msg and "head_dim=24" in msg and "12" in msg
    with pytest.raises(KV4Error):
        quantize_kv(torch.randn(2, 24), 5)
    with pytest.raises(KV4Error), kv4_enabled(tiny_model, group=group):
        pass


def test_hadamard_rotation_is_orthogonal_and_tames_outlier_channels():
    from quantkit.kvcache import hadamard

    h = hadamard(32)
    assert torch.equal(h, h.t()) and torch.allclose(h @ h, torch.eye(32), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 50, 32, generator=g)
    t[..., 5] *= 40  # one outlier channel (as K has after RoPE): it sets every token's range unrotated
    err = {rot: float((fake_quant_kv(t, 32, rot) - t).norm() / t.norm()) for rot in (False, True)}
    assert err[True] < 0.5 * err[False]  # measured 0.045 vs 0.119 (group = head_dim)
    # rotated storage is still exactly what dequantize returns (one definition of the numerics)
    packed, scale, zero = quantize_kv(t, 16, rotate=True)
    assert torch.equal(dequantize_kv(packed, scale, zero, 16, torch.float32, rotate=True),
                       fake_quant_kv(t, 16, rotate=True))
    with pytest.raises(KV4Error, match="power-of-two head_dim, got 24"):
        KV4Cache(tiny_llama().config, rotate=True)


def test_rotated_cache_generate_matches_eval_path_and_recipe_round_trip(tmp_path):
    import quantkit as qk
    from quantkit.checkpoint import save
    from quantkit.errors import QuantkitError
    from quantkit.pipeline import kv_cache_context, quantize_model
    from quantkit.recipe import load_recipe

    model = sharp_llama(hidden=128)  # head_dim 32
    prompt = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(2))
    cache = KV4Cache(model.config, group=16, rotate=True)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         **{cache_argument(model): cache})
    assert cache.memory_report()["rotate"] is True
    seq = prompt
    with torch.no_grad(), kv4_enabled(model, group=16, rotate=True):
        for _ in range(12):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out)

    r = load_recipe({"name": "kvr", "weights": {"format": "int", "bits": 8, "group_size": 32},
                     "kv_cache": {"format": "int4", "group_size": 16, "rotate": True}})
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad(), kv4_enabled(model, group=16):
        unrotated = model(ids, use_cache=False).logits
    quantize_model(model, r, progress=False)
    assert model.quantkit_kv_cache == {"format": "int4", "group_size": 16, "rotate": True}
    with torch.no_grad(), kv_cache_context(model):
        a = model(ids, use_cache=False).logits
    m2 = qk.load(save(model, tmp_path / "ck"))
    with torch.no_grad(), kv_cache_context(m2):
        assert torch.equal(m2(ids, use_cache=False).logits, a)
    assert not torch.allclose(a, unrotated)  # the recipe's rotation reached the evaluation path
    with pytest.raises(QuantkitError, match="kv_cache.rotate = 'yes' must be true or false"):
        load_recipe({"name": "kvr", "kv_cache": {"format": "int4", "rotate": "yes"}})


def test_rotation_is_batch_invariant():
    """The KV4 rotation is a fast Walsh-Hadamard transform: equal to x @ H, and bit-identical for a row whether
    it is rotated alone (generate(), one token per step) or inside a window (the evaluation path)."""
    from quantkit.kvcache import hadamard, rotate_rows

    g = torch.Generator().manual_seed(0)
    for d in (8, 64, 128):
        x = torch.randn(50, d, generator=g)
        torch.testing.assert_close(rotate_rows(x), x @ hadamard(d), rtol=1e-6, atol=1e-6)
        assert torch.equal(rotate_rows(x), torch.cat([rotate_rows(x[i:i + 1]) for i in range(50)]))
        torch.testing.assert_close(rotate_rows(rotate_rows(x)), x, rtol=0, atol=1e-5)  # H is its own inverse


def test_rotated_kv_recipe_on_a_non_power_of_two_head_dim_fails_before_quantizing(tmp_path, monkeypatch):
    """comet-w4a4kv4 rotates K/V with a Hadamard matrix, which a head_dim of 24 cannot take: both pipelines
    refuse it at the start, with one line, before any layer is quantized."""
    from conftest import tiny_llama
    from quantkit import pipeline
    from quantkit.offload import quantize_streaming
    from quantkit.recipe import load_recipe

    def no_work(*a, **k):
        raise AssertionError("a layer was quantized")

    monkeypatch.setattr(pipeline, "quantize_layer", no_work)
    monkeypatch.setattr("quantkit.offload.quantize_layer", no_work)
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(KV4Error, match=r"power-of-two head_dim, got 24; set kv_cache.rotate: false"):
        pipeline.quantize_model(tiny_llama(), load_recipe("comet-w4a4kv4"), calib, progress=False)
    tiny_llama().save_pretrained(tmp_path / "src")
    with pytest.raises(KV4Error, match=r"power-of-two head_dim, got 24"):
        quantize_streaming(tmp_path / "src", "comet-w4a4kv4", tmp_path / "out", calibration=calib)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
