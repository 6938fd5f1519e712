"""`quantkit export`: compressed-tensors folders and dequantized 16-bit folders (quantkit/export, docs/serving.md).

Every exported scheme is checked against compressed-tensors' own decompression (its compressor classes on the
stored tensors) and, where transformers' compressed-tensors route supports it, against the logits of the model
`AutoModelForCausalLM.from_pretrained` builds from the folder. Tiny random Llamas with hidden 128 and
intermediate 256, so that groups of 128 divide every K.
"""

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from quantkit.checkpoint import load, save
from quantkit.errors import QuantkitError
from quantkit.export import export
from quantkit.nn import QuantLinear
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe

pytest.importorskip("compressed_tensors")

CALIB = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
W4_SYM = {"name": "w4-sym-g128", "weights": {"format": "int", "bits": 4, "group_size": 128, "symmetric": True}}
W8_CHANNEL = {"name": "w8-channel", "weights": {"format": "int", "bits": 8, "group_size": None, "symmetric": True}}
W8A8 = {"name": "w8a8", "weights": {"format": "int", "bits": 8, "group_size": None, "symmetric": True},
        "activations": {"format": "int", "bits": 8, "group_size": "token"}}
W6A8 = {"name": "w6a8", "weights": {"format": "int6", "bits": 6, "group_size": 128},
        "activations": {"format": "int", "bits": 8, "group_size": "token"}}
QKV_MIXED = {"name": "qkv-mixed", "weights": {"bits": 4, "group_size": 64},
             "overrides": [{"match": ["*.k_proj"], "weights": {"bits": 8}}]}
_CACHE: dict = {}


def _ckpt(root: Path, recipe, hidden=128, inter=256, bf16=False, legacy=False) -> Path:
    """A saved quantkit checkpoint of a tiny Llama quantized with `recipe` (cached per test module).
    `legacy`: as quantkit wrote NVFP4 checkpoints before it shared tensor scales and recorded activation amaxes
    (k_proj with its own tensor scale, no `input_amax`)."""
    key = (json.dumps(recipe, sort_keys=True), hidden, inter, bf16, legacy)
    if key in _CACHE:
        return _CACHE[key]
    m = tiny_llama(hidden=hidden, inter=inter)
    if bf16:
        m = m.to(torch.bfloat16)
    rec = load_recipe(recipe)
    quantize_model(m, rec, CALIB, progress=False)
    m.quantkit_recipe = rec.to_dict()
    if legacy:
        for layer in m.model.layers:
            layer.self_attn.k_proj.tensor_scale.mul_(2.0)
    out = save(m, root / f"ck{len(_CACHE)}")
    if legacy:
        cfg = json.loads((out / "config.json").read_text())
        for e in cfg["quantization_config"]["modules"].values():
            e.get("act", {}).pop("input_amax", None)
        (out / "config.json").write_text(json.dumps(cfg))
    _CACHE[key] = out
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    _CACHE.clear()
    return tmp_path_factory.mktemp("export")


def _qconfig(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def _ct_decompress(folder: Path, names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (weight from compressed-tensors' compressor on the stored tensors, the same with the stored
    fp16 scales widened to fp32 first)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    cfg = QuantizationConfig.model_validate(_qconfig(folder))
    sd = {}
    for f in folder.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    out = {}
    for name in names:
        scheme = next(s for s in cfg.config_groups.values() if "Linear" in s.targets or name in s.targets)
        comp = BaseCompressor.get_value_from_registry(scheme.format)
        local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".") and k != name + ".bias"}
        wide = {k: v.float() if k == "weight_scale" and v.dtype == torch.float16 else v for k, v in local.items()}
        out[name] = (comp.decompress(local, scheme)["weight"], comp.decompress(wide, scheme)["weight"])
    return out


def _quant_modules(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _hf(folder: Path, dequantize: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # newer transformers: `dequantize=True`; older 5.x releases (5.0, the lower bound) call it `run_compressed=False`
    flag = {"dequantize": True} if "dequantize" in inspect.signature(CompressedTensorsConfig).parameters \
        else {"run_compressed": False}
    kw = {"quantization_config": CompressedTensorsConfig(**flag)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(folder), **kw).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(CALIB).logits.float()


def _bf16_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Within bf16 rounding of the logits: one bf16 step (2^-8 relative) of the largest logit."""
    tol = 2.0**-8 * float(a.abs().max())
    assert float((a - b).abs().max()) <= tol, (float((a - b).abs().max()), tol)


def _weights_only(model):
    for m in _quant_modules(model).values():
        if m.act is not None:
            m.act.enabled = False
    return model


# ------------------------------------------------------------------------------------------- int weights


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "rtn-w3g128", "rtn-w2g64", W4_SYM, W8_CHANNEL, "int6-w6a16"],
                         ids=["rtn-w4g128", "rtn-w3g128", "rtn-w2g64", "w4-sym-g128", "w8-channel", "int6-w6a16"])
def test_int_weight_only_exports_exactly(root, recipe):
    ck = _ckpt(root, recipe)
    out = export(ck, root / f"ct-{ck.name}", to="compressed-tensors")
    qc = _qconfig(out)
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    q = load(ck)
    spec = next(iter(_quant_modules(q).values())).spec
    w = group["weights"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert (w["num_bits"], w["type"], w["symmetric"]) == (spec.bits, "int", spec.symmetric or spec.format == "int6")
    assert w["strategy"] == ("group" if spec.group_size else "channel") and w.get("group_size") == spec.group_size

    # compressed-tensors' own decompression gives quantkit's weights: bit for bit in fp16 (its arithmetic with
    # the stored fp16 scales) and in fp32 once the scales are widened (quantkit's fp32 dequantization)
    dec = _ct_decompress(out, _quant_modules(q))
    for name, m in _quant_modules(q).items():
        w16, w32 = dec[name]
        assert w16.dtype == torch.float16 and torch.equal(w16, m.dequantize_weight(torch.float16)), name
        assert torch.equal(w32.float(), m.dequantize_weight(torch.float32)), name

    ref = _logits(q)
    if spec.symmetric or spec.format == "int6":
        # transformers' default route (compressed modules, decompressed on the first forward): the fp32
        # model holds the scales exactly, so the logits are quantkit's
        torch.testing.assert_close(_logits(_hf(out)), ref, rtol=0, atol=1e-5)
    # Asymmetric packed zero points: transformers' default route sizes weight_zero_point [N, groups] int8 while
    # compressed-tensors stores it packed [ceil(N*b/32), groups] int32 (what vLLM reads), so from_pretrained
    # stops on a size mismatch (compressed-tensors 0.20.1, transformers 5.25). The `dequantize=True` route
    # unpacks it: weights in the fp16 of the stored scales, logits within bf16 rounding.
    _bf16_close(ref, _logits(_hf(out, dequantize=True)))


# ------------------------------------------------------------------------------------- 8-bit activations


@pytest.mark.parametrize("recipe,strategy", [(W8A8, "token"), ("w4a8-rtn", "token"), (W6A8, "token"),
                                             ("flexq-w6a8", "group")],
                         ids=["w8a8", "w4a8-rtn", "w6a8", "flexq-w6a8"])
def test_int8_activation_schemes_export(root, recipe, strategy):
    ck = _ckpt(root, recipe)
    out = export(ck, root / f"ct-{ck.name}", to="compressed-tensors")
    qc = _qconfig(out)
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "int-quantized" and group["format"] == "int-quantized"
    a = group["input_activations"]
    assert (a["num_bits"], a["type"], a["symmetric"], a["dynamic"], a["strategy"]) == (8, "int", True, True, strategy)
    q = load(ck)
    dec = _ct_decompress(out, _quant_modules(q))
    for name, m in _quant_modules(q).items():
        assert torch.equal(dec[name][0], m.dequantize_weight(torch.float16)), name
        assert torch.equal(dec[name][1].float(), m.dequantize_weight(torch.float32)), name
    # The dequantize route builds a dense model (no activation quantization): quantkit's weights-only logits
    _bf16_close(_logits(_weights_only(load(ck))), _logits(_hf(out, dequantize=True)))
    # The default route runs compressed-tensors' reference activation quantizer, whose int8 scale is
    # absmax/127.5 over [-128, 127] (quantkit and vLLM's int8 kernels: absmax/127 over ±127), so its logits are
    # close to quantkit's, not equal; its weights are quantkit's exactly (unpacked zero points load here).
    hf = _hf(out)
    logits = _logits(hf)
    for name, m in _quant_modules(q).items():
        assert torch.equal(hf.get_submodule(name).weight.float(), m.dequantize_weight()), name
    ref = _logits(q)
    assert float((logits - ref).abs().max()) < 0.02 * float(ref.abs().max())


# ------------------------------------------------------------------------------------------------ NVFP4


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in folder.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    return sd


def test_nvfp4_weight_only_exports_exactly(root):
    ck = _ckpt(root, "nvfp4-w4a16", bf16=True)
    out = export(ck, root / "ct-nvfp4", to="compressed-tensors")
    qc = _qconfig(out)
    (group,) = qc["config_groups"].values()
    w = group["weights"]
    assert qc["format"] == "nvfp4-pack-quantized" and group["input_activations"] is None
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"]) == (4, "float", "tensor_group", 16)
    sd = _tensors(out)
    q = load(ck)
    dec = _ct_decompress(out, _quant_modules(q))
    for name, m in _quant_modules(q).items():
        assert torch.equal(sd[f"{name}.weight_packed"], m.qweight)
        assert sd[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert torch.equal(sd[f"{name}.weight_scale"].view(torch.uint8), m.block_scales.view(torch.uint8))
        assert float(sd[f"{name}.weight_global_scale"]) == pytest.approx(1 / float(m.tensor_scale), rel=1e-7)
        # compressed-tensors decompresses NVFP4 in bf16 and divides by the global scale: quantkit's weight
        # within bf16 rounding (here bit-equal to quantkit's weight cast to bf16)
        w16 = dec[name][0]
        assert w16.dtype == torch.bfloat16 and torch.equal(w16, m.dequantize_weight(torch.bfloat16)), name
    ref = _logits(q)
    _bf16_close(ref, _logits(_hf(out)))
    _bf16_close(ref, _logits(_hf(out, dequantize=True)))


def test_nvfp4_fused_groups_share_one_global_scale(root):
    """quantkit fits one tensor scale per group that reads one input, so q/k/v and gate/up export one
    weight_global_scale each, as vLLM fuses them (it takes the largest, which would saturate the others)."""
    out = export(_ckpt(root, "nvfp4-w4a16", bf16=True), root / "ct-nvfp4-fused", to="compressed-tensors")
    sd = _tensors(out)
    for i in range(2):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            assert len({float(sd[f"model.layers.{i}.{n}.weight_global_scale"]) for n in group}) == 1, group


def test_nvfp4_w4a4_exports_recorded_input_global_scale(root):
    """nvfp4-rtn: the weights as nvfp4-w4a16, plus input_global_scale = 448·6 / amax, amax = the largest |x| the
    Linear saw at calibration, one value per fused group; compressed-tensors' activation quantization with it is
    quantkit's NVFP4 reference under that static tensor scale."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from quantkit.formats.nvfp4 import nvfp4_fake_quant

    ck = _ckpt(root, "nvfp4-rtn", bf16=True)
    out = export(ck, root / "ct-nvfp4-w4a4", to="compressed-tensors")
    cfg = QuantizationConfig.model_validate(_qconfig(out))  # compressed-tensors' own parser
    (scheme,) = cfg.config_groups.values()
    a = scheme.input_activations
    assert cfg.format == scheme.format == "nvfp4-pack-quantized"
    assert (a.num_bits, a.type, a.strategy, a.group_size, a.symmetric, a.dynamic) == \
        (4, "float", "tensor_group", 16, True, "local")
    sd = _tensors(out)
    q = _weights_only(load(ck))
    mods = _quant_modules(q)
    # what each Linear sees at calibration: weights quantized, activations in float, one window at a time
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0].detach().float()))
             for n, m in mods.items()]
    with torch.no_grad():
        for i in range(CALIB.shape[0]):
            q(CALIB[i : i + 1])
    for h in hooks:
        h.remove()
    dec = _ct_decompress(out, mods)
    for name, m in mods.items():
        amax = max(float(x.abs().max()) for x in seen[name])
        assert m.act.input_amax == amax, name
        igs = sd[f"{name}.input_global_scale"]
        assert igs.dtype == torch.float32 and igs.shape == (1,)
        assert float(igs) == float(torch.tensor(448.0 * 6.0) / torch.tensor(amax)), name
        assert torch.equal(dec[name][0], m.dequantize_weight(torch.bfloat16)), name
    for i in range(2):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            for key in ("input_global_scale", "weight_global_scale"):
                assert len({float(sd[f"model.layers.{i}.{n}.{key}"]) for n in group}) == 1, (group, key)

    # activation quantization: compressed-tensors' (dynamic block scales under the static global scale) on the
    # calibration inputs, and on inputs 1.5x larger than anything calibrated (block scales saturate at 448), is
    # quantkit's NVFP4 reference with tensor scale 1 / input_global_scale: the same codes and scales, values
    # within one fp32 rounding (the two multiply the scales in another order). In fp32: compressed-tensors
    # computes in the input's dtype, and in bf16 it rounds block_amax / 6 to bf16 before the e4m3 rounding.
    name = "model.layers.1.mlp.gate_proj"
    igs = sd[f"{name}.input_global_scale"]
    for x in (torch.cat(seen[name]), 1.5 * torch.cat(seen[name])):
        scale, zp = compute_dynamic_scales_and_zp(value=x, args=a, module=torch.nn.Module(), global_scale=igs)
        ct = fake_quantize(x=x, scale=scale, zero_point=zp, args=a, global_scale=igs)
        torch.testing.assert_close(ct, nvfp4_fake_quant(x, 1.0 / igs), rtol=2.0**-22, atol=0)

    # transformers' dequantize route: a dense model of quantkit's weights (no activation quantization)
    _bf16_close(_logits(q), _logits(_hf(out, dequantize=True)))


# ------------------------------------------------------------------------------------------------ refusals


REFUSALS = [
    ("rtn-w4g128", {"hidden": 96, "inter": 200}, "group_size 128 does not divide its 96 input features"),
    (QKV_MIXED, {}, "serving engines fuse q_proj/k_proj/v_proj into one matrix with one scheme"),
    ("nvfp4-w4a16", {"legacy": True}, "different NVFP4 tensor scales"),
    ("hlq-rtn-w2g64", {}, "nearest exportable recipe is 'rtn-w2g64'"),
    ("arcquant-nvfp4", {}, "ARCQuant's residual activation channels"),
    ("nvfp4-rtn", {"legacy": True}, "this checkpoint has none"),
    ("comet-w4ax", {}, "nearest exportable recipe is 'w4a8-rtn'"),
    ("flexq-w6a6-noa8", {}, "nearest exportable recipe is 'flexq-w6a8'"),
    ("w4a4-rtn", {}, "nearest exportable recipe is 'w4a8-rtn'"),
    ("comet-w4a4kv4", {}, "the KV4 cache"),
]


@pytest.mark.parametrize("recipe,shape,words", REFUSALS,
                         ids=["group-not-dividing-k", "qkv-schemes-differ", "nvfp4-tensor-scales-differ", "hlq",
                              "arcquant", "nvfp4-w4a4", "comet", "w6a6", "w4a4-int", "kv4"])
def test_refusals_say_what_would_work_and_write_nothing(root, recipe, shape, words):
    ck = _ckpt(root, recipe, **shape)
    out = root / f"refused-{ck.name}"
    with pytest.raises(QuantkitError) as e:
        export(ck, out, to="compressed-tensors")
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_missing_extra_is_one_line(root, monkeypatch):
    ck = _ckpt(root, W4_SYM)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    out = root / "no-extra"
    with pytest.raises(QuantkitError, match=r"pip install 'quantkit\[export\]'"):
        export(ck, out, to="compressed-tensors")
    assert not out.exists()


def test_cli_export_and_bad_target(root, monkeypatch, capsys):
    from quantkit.cli import main

    ck = _ckpt(root, W4_SYM)
    out = root / "cli-ct"
    monkeypatch.setattr(sys, "argv", ["quantkit", "export", str(ck), "--to", "compressed-tensors", "--out", str(out)])
    main()
    assert _qconfig(out)["quant_method"] == "compressed-tensors"
    bad = root / "cli-bad"
    monkeypatch.setattr(sys, "argv", ["quantkit", "export", str(ck), "--to", "gguf", "--out", str(bad)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown export target '--to gguf'") and "\n" not in err
    assert not bad.exists()
    monkeypatch.setattr(sys, "argv", ["quantkit", "export", str(ck), "--out", str(bad)])
    with pytest.raises(SystemExit):
        main()
    assert not bad.exists()


# ------------------------------------------------------------------------------------------- --dequantize


def test_dequantize_writes_a_plain_folder(root):
    from transformers import AutoModelForCausalLM

    ck = _ckpt(root, "rtn-w4g128")
    out = export(ck, root / "dq-int", dequantize=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.dtype == torch.bfloat16
    q = load(ck)
    for name, m in _quant_modules(q).items():
        assert torch.equal(hf.get_submodule(name).weight, m.dequantize_weight(torch.bfloat16)), name
    _bf16_close(_logits(q), _logits(hf))
    out16 = export(ck, root / "dq-int-fp16", dequantize=True, dtype="float16")
    assert AutoModelForCausalLM.from_pretrained(str(out16)).dtype == torch.float16
    with pytest.raises(QuantkitError, match="--dtype float32"):
        export(ck, root / "dq-bad", dequantize=True, dtype="float32")
    assert not (root / "dq-bad").exists()


def test_dequantize_maps_permuted_weights_back(root):
    """COMET stores the weight for permuted input channels; the plain folder holds it in the model's own order."""
    from transformers import AutoModelForCausalLM

    ck = _ckpt(root, "comet-w4ax")
    hf = AutoModelForCausalLM.from_pretrained(str(export(ck, root / "dq-comet", dequantize=True)))
    for name, m in _quant_modules(load(ck)).items():
        plain = hf.get_submodule(name).weight
        assert torch.equal(m.act.transform_weight(plain), m.dequantize_weight(torch.bfloat16)), name


def test_mixed_schemes_ignored_linears_and_untied_head(root):
    """Several schemes become one config group each (targets = module names), unquantized Linears are listed in
    `ignore`, and an untied lm_head is stored as is."""
    rec = {"name": "mixed", "weights": {"bits": 4, "group_size": 64, "symmetric": True},
           "ignore": ["*.self_attn.o_proj"], "overrides": [{"match": ["*.down_proj"], "weights": {"bits": 8}}]}
    m = tiny_llama(hidden=128, inter=256, tie=False)
    recipe = load_recipe(rec)
    quantize_model(m, recipe, None, progress=False)
    m.quantkit_recipe = recipe.to_dict()
    ck = save(m, root / "ck-mixed")
    out = export(ck, root / "ct-mixed", to="compressed-tensors")
    qc = _qconfig(out)
    assert qc["format"] == "pack-quantized"
    assert sorted(qc["ignore"]) == ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    bits = {g["weights"]["num_bits"]: g["targets"] for g in qc["config_groups"].values()}
    assert bits[8] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "model.layers.1.self_attn.q_proj" in bits[4]
    torch.testing.assert_close(_logits(_hf(out)), _logits(load(ck)), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ the demo model

W4_SYM_G64 = {"name": "w4-sym-g64", "weights": {"format": "int", "bits": 4, "group_size": 64, "symmetric": True}}


@pytest.mark.slow
@pytest.mark.parametrize("recipe,dtype", [(W4_SYM_G64, torch.float32), ("nvfp4-w4a16", torch.bfloat16)],
                         ids=["w4-sym-g64", "nvfp4-w4a16"])
def test_demo_model_exports(demo_dir, tmp_path, recipe, dtype):
    """The demo model (SmolLM2-135M: K = 576 and 1536, so g64 rather than g128): compressed-tensors'
    decompression of the exported folder gives quantkit's weights, and transformers' compressed-tensors route
    gives quantkit's logits within bf16 rounding."""
    from quantkit.api import load_model

    m, _ = load_model(demo_dir, dtype=dtype)
    rec = load_recipe(recipe)
    quantize_model(m, rec, CALIB[:1, :32], progress=False)
    m.quantkit_recipe = rec.to_dict()
    ck = save(m, tmp_path / "q")
    out = export(ck, tmp_path / "ct", to="compressed-tensors")
    q = load(ck)
    mods = _quant_modules(q)
    assert len(mods) == 7 * q.config.num_hidden_layers
    for name, (w, _) in _ct_decompress(out, mods).items():
        if dtype == torch.float32:  # int: exact in the fp16 of the stored scales
            assert torch.equal(w, mods[name].dequantize_weight(torch.float16)), name
        else:  # nvfp4: compressed-tensors computes in bf16 (scale quotient, then product): two bf16 roundings
            ref = mods[name].dequantize_weight(torch.float32)
            assert w.dtype == torch.bfloat16 and bool(((w.float() - ref).abs() <= ref.abs() * 2.0**-7).all()), name
    ids = CALIB[:1, :32]
    with torch.no_grad():
        ref = q(ids).logits.float()
        got = _hf(out).to(dtype)(ids).logits.float()
        if dtype == torch.float32:
            _bf16_close(ref, got)
        else:  # 30 bf16 layers: within what bf16 itself does to quantkit's model (its fp32 run as the yardstick)
            noise = float((q.float()(ids).logits.float() - ref).abs().max())
            assert float((got - ref).abs().max()) <= 2 * noise, (float((got - ref).abs().max()), noise)
