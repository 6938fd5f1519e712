"""Fusion of shared-input projections (q/k/v, gate/up) for inference: same weights, same outputs, one
product per group."""

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from quantkit.nn import QuantLinear
from quantkit.nn.fused import FusedLinear, LinearSlice, concat_linears, fuse_shared_input_linears
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe


def _count_fused_calls(model):
    calls = []
    for m in model.modules():
        if isinstance(m, FusedLinear):
            m.linear.register_forward_hook(lambda mod, i, o: calls.append(mod))
    return calls


@pytest.mark.parametrize("recipe", [None, "rtn-w4g128", "hlq-rtn-w3g128", "int6-w6a16"])
def test_fused_model_matches_unfused(recipe, calib):
    ref = tiny_llama()
    if recipe is not None:
        quantize_model(ref, load_recipe(recipe), calib, progress=False)
    fused = tiny_llama()
    if recipe is not None:
        quantize_model(fused, load_recipe(recipe), calib, progress=False)
    names = fuse_shared_input_linears(fused)
    assert names == ["model.layers.0.self_attn.{q_proj,k_proj,v_proj}", "model.layers.0.mlp.{gate_proj,up_proj}",
                     "model.layers.1.self_attn.{q_proj,k_proj,v_proj}", "model.layers.1.mlp.{gate_proj,up_proj}"]
    assert fuse_shared_input_linears(fused) == []  # idempotent
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.k_proj, LinearSlice) and attn.k_proj.out_features == 2 * 24
    inner = attn.fused_q_k_v.linear
    assert isinstance(inner, QuantLinear if recipe else nn.Linear) and inner.out_features == 96 + 2 * 48
    # the fused weight's rows are the members' dequantized rows, exactly
    r = ref.model.layers[0].self_attn
    if recipe is not None:
        w = torch.cat([m.dequantize_weight() for m in (r.q_proj, r.k_proj, r.v_proj)])
        assert torch.equal(inner.dequantize_weight(), w)
    calls = _count_fused_calls(fused)
    with torch.no_grad():
        a, b = ref(calib).logits, fused(calib).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # one product per group and forward, not one per member


@pytest.mark.parametrize("recipe", ["comet-w4ax", "flexq-w6a8", "arcquant-nvfp4"])
def test_activation_quantized_groups(recipe, calib):
    """Identical activation quantizers (calibrated on the shared input) fuse, the input is then quantized once
    per group; NVFP4 members share one tensor scale (the pipeline binds it per group), so they fuse too."""
    ref, fused = tiny_llama(), tiny_llama()
    for m in (ref, fused):
        quantize_model(m, load_recipe(recipe), calib, progress=False)
    names = fuse_shared_input_linears(fused)
    assert len(names) == 4
    inner = fused.model.layers[0].self_attn.fused_q_k_v.linear
    assert inner.act is not None and inner.out_features == 96 + 2 * 48
    acts = []
    inner.act.register_forward_hook(lambda mod, i, o: acts.append(mod))
    with torch.no_grad():
        a, b = ref(calib).logits, fused(calib).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert len(acts) == 1  # one activation quantization for q/k/v


def test_generate_through_fused_model(calib):
    ref, fused = tiny_llama(), tiny_llama()
    for m in (ref, fused):
        quantize_model(m, load_recipe("rtn-w4g128"), calib, progress=False)
    fuse_shared_input_linears(fused)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(calib[:2, :16], **kw), fused.generate(calib[:2, :16], **kw))


def test_other_input_recomputes_and_cache_is_released():
    torch.manual_seed(0)
    mods = [nn.Linear(8, n) for n in (4, 6)]
    group = FusedLinear(concat_linears(mods), [4, 6])
    a, b = LinearSlice(group, 0, 8), LinearSlice(group, 1, 8)
    x, x2 = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), mods[0](x))
        assert group._y is not None
        torch.testing.assert_close(b(x2), mods[1](x2))  # another input: not the pending product
        torch.testing.assert_close(b(x), mods[1](x))
        torch.testing.assert_close(a(x), mods[0](x))
        assert group._y is None and group._x is None  # both members served: nothing kept
        ya = a(x)
        x.mul_(2)  # modified in place: the pending product is stale
        torch.testing.assert_close(b(x), mods[1](x))
        del ya


def test_incompatible_groups_are_left_alone(calib):
    m = tiny_llama()
    quantize_model(m, load_recipe("rtn-w4g128"), calib, progress=False)
    mlp = m.model.layers[0].mlp
    mlp.up_proj = nn.Linear(96, 200, bias=False)  # mixed quantized / float: not fused
    names = fuse_shared_input_linears(m)
    assert "model.layers.0.mlp.{gate_proj,up_proj}" not in names and len(names) == 3
    assert isinstance(mlp.gate_proj, QuantLinear)


def test_compiled_fused_model_traces_one_product_per_group(calib):
    """torch.compile traces the slices (one graph, no breaks) and the graph holds one linear per group."""
    m = tiny_llama()
    quantize_model(m, load_recipe("rtn-w4g128"), calib, progress=False)
    with torch.no_grad():
        ref = m(calib).logits
    fuse_shared_input_linears(m)
    torch._dynamo.reset()  # earlier compiled tests in the same process must not leave cached frames behind
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(m, backend=backend)
    with torch.no_grad():
        out = compiled(calib).logits
        again = compiled(calib).logits  # no recompilation: the cache state is back to empty after a forward
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, again) and len(graphs) == 1
    linears = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.linear]
    assert len(linears) == 2 * 4 + 1  # per layer: q/k/v, o, gate/up, down; then the lm_head
