"""The model-adapter contract (quantkit/adapters.py) on tiny random-weight models of each supported family.

Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma 3 text (q/k norms, four norms per layer,
scaled embeddings, sliding-window layers) and Phi-3 (q/k/v and gate/up stored fused as qkv_proj and
gate_up_proj): the adapter's declarations hold, each quantizes through the public API, saves and loads back
to the same logits, streams to the same checkpoint as the in-memory pipeline, fuses (or has nothing to fuse),
and gets its KV layout right. Gemma 3 image-text (Gemma3ForConditionalGeneration) quantizes its language model
in memory; streaming refuses its renamed shard layout with one line. An unsupported architecture is refused
with one line naming what is missing.
Everything is built from transformers configs (no download): hidden 128, 2 layers, head_dim 32.
"""

import pytest
import torch
import transformers as T
from test_offload import word_tokenizer
from torch import nn

import quantkit as qk
from quantkit.adapters import GEMMA3, GEMMA3_VLM, GENERIC, LLAMA, PHI3, QWEN3, adapter_for
from quantkit.errors import QuantkitError
from quantkit.kvcache import KV4Cache, KV4Error, head_dim_of, kv4_enabled
from quantkit.models import decoder_layers
from quantkit.nn import QuantLinear
from quantkit.nn.fused import fuse_shared_input_linears
from quantkit.pipeline import group_by_input, quantize_model
from quantkit.recipe import load_recipe

COMMON = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHS = {
    "llama": (lambda: T.LlamaConfig(**COMMON, head_dim=32), T.LlamaForCausalLM, LLAMA),
    "mistral": (lambda: T.MistralConfig(**COMMON, head_dim=32), T.MistralForCausalLM, LLAMA),
    "qwen2": (lambda: T.Qwen2Config(**COMMON), T.Qwen2ForCausalLM, LLAMA),
    "qwen3": (lambda: T.Qwen3Config(**COMMON, head_dim=32), T.Qwen3ForCausalLM, QWEN3),
    "gemma3": (lambda: T.Gemma3TextConfig(**COMMON, head_dim=32, sliding_window=16,
                                          layer_types=["sliding_attention", "full_attention"]),
               T.Gemma3ForCausalLM, GEMMA3),
    "phi3": (lambda: T.Phi3Config(**COMMON), T.Phi3ForCausalLM, PHI3),
}


def build(arch: str, tie: bool | None = None, seed: int = 0):
    make_cfg, cls, _ = ARCHS[arch]
    cfg = make_cfg()
    if tie is not None:
        cfg.tie_word_embeddings = tie
    torch.manual_seed(seed)
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def tok_text(tmp_path_factory):
    """A word-level tokenizer (ids < 512) and a text file to calibrate on (as tests/test_offload.py)."""
    folder = tmp_path_factory.mktemp("tok") / "tok"
    folder.mkdir()
    text = word_tokenizer(folder)
    return T.AutoTokenizer.from_pretrained(str(folder)), text


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(3))


def calib(n=4, seq=32):
    return torch.randint(3, 512, (n, seq), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------------
# the declarations


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_declares_the_structure(arch):
    model = build(arch)
    ad = adapter_for(model)
    assert ad is ARCHS[arch][2]
    layers = decoder_layers(model)
    assert layers is model.get_submodule(ad.layers_path) and len(layers) == 2
    for layer in layers:
        for n in ad.linear_names:
            assert type(layer.get_submodule(n)) is nn.Linear, n
        for n in ad.norm_names:
            layer.get_submodule(n)
        # the declared Linears are all the Linears a layer has
        assert {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)} == set(ad.linear_names)
    before = dict(ad.before_layers(model))
    assert before[ad.embed_path] is model.get_input_embeddings()
    assert ad.final_norm_path not in before and ad.layers_path not in before
    assert [n for n, _ in ad.after_layers(model)] == [ad.final_norm_path, ad.lm_head]
    assert ad.tied(model.config) == (model.lm_head.weight is model.get_input_embeddings().weight)
    lay = ad.attention_layout(model.config)
    assert (lay.num_heads, lay.num_kv_heads, lay.head_dim) == (4, 2, 32) == \
        (lay.num_heads, lay.num_kv_heads, head_dim_of(model.config))
    assert len(lay.layer_types) == 2
    if arch == "gemma3":
        assert lay.layer_types == ("sliding_attention", "full_attention") and lay.sliding_layers == (0,)
    if arch == "phi3":
        assert ad.fusable_groups == () and ad.fused_in_checkpoint == ("qkv_proj", "gate_up_proj")
    else:
        assert ad.fusable_groups == (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_declared_sub_blocks_are_what_the_forward_does(arch, ids):
    """Each declared sub-block's Linears read one input tensor, distinct from the other blocks', in the
    declared order: what the pipeline's traced grouping (GPTQ's shared Hessians) finds."""
    model = build(arch)
    ad = adapter_for(model)
    layer = decoder_layers(model)[0]
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.append((n, a[0])))
             for n in ad.linear_names]
    try:
        model(ids[:1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    seen = seen[: len(ad.linear_names)]  # layer 0 only ran once
    blocks = group_by_input(seen)
    assert [tuple(b) for b in blocks] == list(ad.sub_blocks)


# ------------------------------------------------------------------------------------------------------------
# quantize -> save -> load


@pytest.mark.parametrize("arch,recipe", [(a, "rtn-w4g128") for a in ARCHS] +
                         [(a, "gptq-w4g128") for a in ("llama", "gemma3", "phi3")])
def test_quantize_save_load_same_logits(arch, recipe, tok_text, ids, tmp_path):
    tok, text = tok_text
    model = build(arch)
    with torch.no_grad():
        ref = model(ids).logits
    q = qk.quantize(model, recipe, tokenizer=tok, dataset=str(text), nsamples=4, seq_len=32, progress=False)
    ad = adapter_for(q)
    want = {f"{ad.layers_path}.{i}.{n}" for i in range(2) for n in ad.linear_names}
    assert set(q.quantkit_report.modules) == want
    assert all(isinstance(q.get_submodule(n), QuantLinear) for n in want)
    out = qk.save(q, tmp_path / "q")
    loaded = qk.load(out)
    assert type(loaded) is type(model)
    with torch.no_grad():
        a, b = q(ids).logits, loaded(ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, ref) and torch.isfinite(a).all()


# ------------------------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("arch,tie,dtype,recipe", [
    ("qwen3", True, torch.float32, "gptq-w4g128"),
    ("gemma3", True, torch.bfloat16, "gptq-w4g128"),  # bf16 shards: the scaled embedding computes in fp32
    ("phi3", False, torch.float32, "rtn-w4g128"),
])
def test_streaming_equals_in_memory(arch, tie, dtype, recipe, tmp_path):
    src = tmp_path / "src"
    build(arch, tie=tie).to(dtype).save_pretrained(str(src), max_shard_size="300KB")
    word_tokenizer(src)
    x = calib()
    ref, _ = qk.load_model(src)  # fp32 on CPU, as the streaming path computes
    quantize_model(ref, load_recipe(recipe), x, progress=False)
    out = qk.quantize_streaming(src, recipe, tmp_path / "q", calibration=x, progress=False, log=lambda s: None)
    q = qk.load(out)
    ref_sd, sd = ref.state_dict(), q.state_dict()
    assert ref_sd.keys() == sd.keys()
    for k in ref_sd:  # packed tensors equal; the others as stored in the source (bf16: ref holds them upcast)
        assert torch.equal(ref_sd[k].to(sd[k].dtype), sd[k]), k
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.equal(ref(x).logits, q(x).logits)
    assert len(list(out.glob("model-*-of-00004.safetensors"))) == 4  # embeddings, 2 layers, head


def gemma3_image_text():
    """Gemma3ForConditionalGeneration (what AutoModelForCausalLM builds for a 'gemma3' config): the language
    model of the text tests plus a one-layer SigLIP tower."""
    text = ARCHS["gemma3"][0]()
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    cfg = T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                         image_token_index=511, boi_token_index=509, eoi_token_index=510)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def test_gemma3_image_text_quantizes_its_language_model(ids, tmp_path):
    model = gemma3_image_text()
    ad = adapter_for(model)
    assert ad is GEMMA3_VLM and ad.layers_path == "model.language_model.layers"
    assert ad.attention_layout(model.config).layer_types == ("sliding_attention", "full_attention")
    x = calib()
    quantize_model(model, load_recipe("gptq-w4g128"), x, progress=False)
    assert set(model.quantkit_report.modules) == {f"{ad.layers_path}.{i}.{n}" for i in range(2)
                                                  for n in ad.linear_names}  # the vision tower is left as is
    loaded = qk.load(qk.save(model, tmp_path / "q"))
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    fused = fuse_shared_input_linears(loaded)  # the language model's q/k/v and gate/up, not SigLIP's q/k/v
    assert len(fused) == 4 and all(f.startswith(f"{ad.layers_path}.") for f in fused)
    # its shards keep the 'language_model.model.*' names transformers renames on load: streaming says so
    gemma3_image_text().save_pretrained(str(tmp_path / "src"))
    msg = _one_line_error(lambda: qk.quantize_streaming(tmp_path / "src", "rtn-w4g128", tmp_path / "s",
                                                        progress=False, log=lambda s: None))
    assert "stores the decoder layers under other names" in msg and "without --offload" in msg


# ------------------------------------------------------------------------------------------------------------
# fusion and the KV cache


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "phi3"])
@torch.no_grad()
def test_fusion_follows_the_adapter(arch, ids):
    q = build(arch)
    quantize_model(q, load_recipe("rtn-w4g128"), None, progress=False)
    before = q(ids).logits
    fused = fuse_shared_input_linears(q)
    ad = adapter_for(q)
    assert len(fused) == 2 * len(ad.fusable_groups)  # 2 layers; nothing to fuse on Phi-3
    torch.testing.assert_close(q(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_kv_layout_per_architecture(ids):
    cache = KV4Cache(build("qwen2").config)
    assert (cache.head_dim, cache.kv_heads, cache.group, len(cache.layers)) == (32, 2, 32, 2)
    assert head_dim_of(build("phi3").config) == 32  # no head_dim in the config: hidden / heads
    with pytest.raises(KV4Error, match="sliding_attention"):
        KV4Cache(build("gemma3").config)
    m = build("qwen3")  # q/k norms: K is quantized after them and RoPE, as the attention hands it over
    with torch.no_grad():
        plain = m(ids, use_cache=False).logits
        with kv4_enabled(m):
            kv4 = m(ids, use_cache=False).logits
    assert torch.isfinite(kv4).all() and not torch.equal(kv4, plain)


# ------------------------------------------------------------------------------------------------------------
# unsupported architectures


def _one_line_error(fn) -> str:
    with pytest.raises(QuantkitError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unsupported_architectures_get_one_line(tmp_path):
    bert = T.BertLMHeadModel(T.BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=256, is_decoder=True))
    msg = _one_line_error(lambda: qk.quantize(bert, "rtn-w4g128", progress=False))
    assert msg.startswith("model type 'bert' (BertLMHeadModel) is not supported: no decoder stack at model.model")
    assert "phi3" in msg and "llama" in msg

    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=64))
    msg = _one_line_error(lambda: adapter_for(gpt2))
    assert msg.startswith("model type 'gpt2' (GPT2LMHeadModel) is not supported: no decoder stack at model.model")
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    msg = _one_line_error(lambda: qk.quantize_streaming(tmp_path / "gpt2", "rtn-w4g128", tmp_path / "q",
                                                        progress=False, log=lambda s: None))
    assert "model type 'gpt2'" in msg and not (tmp_path / "q").exists()

    # a registered family whose layer lacks a declared Linear (a renamed projection): named
    m = build("qwen3")
    del m.model.layers[0].self_attn.k_proj
    msg = _one_line_error(lambda: decoder_layers(m))
    assert "model type 'qwen3'" in msg and "has no 'self_attn.k_proj'" in msg


def test_unknown_llama_like_model_type_uses_the_generic_adapter():
    m = build("llama")
    m.config.model_type = "my_llama_variant"
    assert adapter_for(m) is GENERIC and len(decoder_layers(m)) == 2
    assert adapter_for(m.config) is GENERIC
