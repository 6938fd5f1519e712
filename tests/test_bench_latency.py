"""`quantkit bench latency` end to end on CPU (tiny random Llama; no CUDA graphs there: eager fallback), the
GQA decode attention against SDPA, and the shared reporting helper (eval/report.py)."""

import json
import subprocess
import sys

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.eval.bench_latency import (
    LatencyConfig,
    gqa_decode_attention,
    quantize_on_the_fly,
    random_model,
    run_latency,
)
from quantkit.eval.report import Column, format_table, write_json

QUICK = dict(batches=(1, 2), prompt=8, gen=3, repeats=1, warmup=0, device="cpu", dtype="float32")


def test_cli_random_shape_end_to_end(tmp_path):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    proc = subprocess.run(
        [sys.executable, "-m", "quantkit.cli", "bench", "latency", "--shape", "tiny", "--recipe",
         "rtn-w4g128,rtn-w2g64", "--batch", "1,2", "--prompt", "8", "--gen", "3", "--repeats", "1",
         "--warmup", "0", "--device", "cpu", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode ms/step" in proc.stdout and "rtn-w2g64" in proc.stdout
    res = json.loads(out.read_text())
    assert res["model"]["shape"] == "tiny" and res["model"]["config"]["num_hidden_layers"] == 4
    assert res["baseline"] == "fp32" and res["env"]["device"] == "cpu"
    assert "no CUDA graphs" in res["decode_method"]
    assert [v["name"] for v in res["variants"]] == ["fp32", "rtn-w4g128", "rtn-w2g64"]
    for v in res["variants"]:
        assert v["gqa_decode_attention"] is True
        assert [r["batch"] for r in v["runs"]] == [1, 2]
        for r in v["runs"]:
            for key in ("prefill_ms", "prefill_tok_s", "decode_ms_per_token", "decode_tok_s", "e2e_tok_s",
                        "kv_cache_bytes"):
                assert r[key] > 0, key
            assert r["cuda_graphs"] is False and r["decode_steps"] == 2
            assert r["decode_tok_s"] == pytest.approx(r["batch"] * 1e3 / r["decode_ms_per_token"])
            assert r["check"]["rel_err"] < 1e-4 and r["check"]["argmax_agree"] == 1.0
    mb = {v["name"]: v["model_bytes"] for v in res["variants"]}
    assert mb["fp32"]["linear_bits_per_weight"] == 32
    assert 4 < mb["rtn-w4g128"]["linear_bits_per_weight"] < 5
    assert 2 < mb["rtn-w2g64"]["linear_bits_per_weight"] < 3
    assert mb["rtn-w2g64"]["linear"] < mb["rtn-w4g128"]["linear"] < mb["fp32"]["linear"] / 6
    q = res["variants"][1]["quantization"]
    assert q["modules"] == 4 * 7 and q["fitted_layers"] == 4 and q["cloned_layers"] == 0
    rows = res["summary"]
    assert len(rows) == 6 and {r["variant"] for r in rows} == {"fp32", "rtn-w4g128", "rtn-w2g64"}
    assert all(r["decode_x"] == 1.0 for r in rows if r["variant"] == "fp32")
    assert all(r["decode_x"] > 0 and r["prefill_x"] > 0 for r in rows)
    assert (res["plot"] is None) or png.exists()  # matplotlib optional


def test_checkpoint_folder_and_fit_budget(tmp_path):
    import quantkit as qk
    from quantkit.recipe import load_recipe

    m = random_model("tiny", "cpu", torch.float32, seed=1)
    info = quantize_on_the_fly(m, load_recipe("rtn-w4g128"), fit_budget_s=0.0, log=lambda s: None)
    assert info["fitted_layers"] == 1 and info["cloned_layers"] == 3 and "copies" in info["notes"][0]
    ckpt = qk.save(m, tmp_path / "ck")
    res = run_latency(str(ckpt), None, [], LatencyConfig(**{**QUICK, "batches": (1,)}),
                      json_path=tmp_path / "ck.json", log=lambda s: None)
    names = [v["name"] for v in res["variants"]]
    assert names == ["fp32 (dequantized twin)", "ck"]
    twin, quant = res["variants"]
    assert twin["model_bytes"]["linear_bits_per_weight"] == 32
    assert quant["model_bytes"]["linear_bits_per_weight"] < 5
    # the twin holds the dequantized weights: its first decode logits match the quantized model's
    for v in res["variants"]:
        assert v["runs"][0]["check"]["rel_err"] < 1e-4
    assert json.loads((tmp_path / "ck.json").read_text())["summary"][1]["variant"] == "ck"
    with pytest.raises(QuantkitError, match="quantized checkpoint"):
        run_latency(str(ckpt), None, ["rtn-w4g128"], LatencyConfig(**QUICK), log=lambda s: None)


def test_activation_recipes_on_the_fly_made_up_layout():
    """ARC / COMET / FlexQ recipes quantize on the fly with a made-up calibration layout of the documented
    size; weights are stored in the transformed input space, so each module still approximates its Linear."""
    from quantkit.methods.arcquant import ARCActQuantizer
    from quantkit.methods.comet import FMPQActQuantizer
    from quantkit.nn import QuantLinear
    from quantkit.recipe import load_recipe

    arc_spec = load_recipe("arcquant-nvfp4").activations
    assert ARCActQuantizer.for_speed(arc_spec, 4096).residual == 256  # default share 1/16
    assert ARCActQuantizer.for_speed(arc_spec, 4096, 0.1).residual == 416  # 409.6 rounded up to 16
    q = ARCActQuantizer.for_speed(arc_spec, 1000, 0.05)
    assert q.residual == 64 and sorted(q.reorder.tolist()) == list(range(1000))
    comet_spec = load_recipe("comet-w4ax").activations  # group 128, INT8 share capped at 0.2
    q = FMPQActQuantizer.for_speed(comet_spec, 4096)
    assert int((q.block_bits == 8).sum()) == 6 and int((q.block_bits == 4).sum()) == 26
    assert int((FMPQActQuantizer.for_speed(comet_spec, 4096, 0.05).block_bits == 8).sum()) == 2

    torch.manual_seed(0)
    for name, max_err in (("arcquant-nvfp4", 0.25), ("comet-w4ax", 0.25), ("flexq-w6a8", 0.05)):
        m = random_model("tiny", "cpu", torch.float32, seed=2)
        lin = m.model.layers[0].mlp.down_proj
        x = torch.randn(5, lin.in_features)
        with torch.no_grad():
            ref = lin(x)
        info = quantize_on_the_fly(m, load_recipe(name), log=lambda s: None, outlier_share=0.25)
        mods = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
        assert len(mods) == 4 * 7 and all(mod.act is not None for mod in mods)
        assert "made-up layout with outlier share 0.25" in " ".join(info["notes"])
        q = m.model.layers[0].mlp.down_proj
        with torch.no_grad():
            err = float((q(x) - ref).norm() / ref.norm())
        assert err < max_err, (name, err)
        if name == "arcquant-nvfp4":
            assert q.weight_in_features == q.in_features + q.act.residual > q.in_features
            assert info["act_layout"]["extra_input_channels_share"] > 0.2
    with pytest.raises(QuantkitError, match="--outlier-share 1.5 must be in"):
        quantize_on_the_fly(random_model("tiny", "cpu", torch.float32), load_recipe("arcquant-nvfp4"),
                            log=lambda s: None, outlier_share=1.5)


def test_refusals():
    cfg = LatencyConfig(**QUICK)
    with pytest.raises(QuantkitError, match="either MODEL_OR_DIR or --shape"):
        run_latency("demo", "tiny", ["rtn-w4g128"], cfg, log=lambda s: None)
    with pytest.raises(QuantkitError, match="unknown --shape 'llama9'.*llama3-8b"):
        run_latency(None, "llama9", ["rtn-w4g128"], cfg, log=lambda s: None)
    with pytest.raises(QuantkitError, match="--recipe"):
        run_latency(None, "tiny", [], cfg, log=lambda s: None)
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "bench", "latency", "--shape", "tiny",
                           "--recipe", "rtn-w4g128", "--batch", "1,x", "--device", "cpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --batch '1,x'"), proc.stderr[-2000:]


@pytest.mark.parametrize("mask_kind", ["bool", "float", None])
def test_gqa_decode_attention_matches_sdpa(mask_kind):
    from transformers.integrations.sdpa_attention import repeat_kv

    g = torch.Generator().manual_seed(0)
    b, h, hk, n, d = 3, 8, 2, 11, 16
    q = torch.randn(b, h, 1, d, generator=g)
    k = torch.randn(b, hk, n, d, generator=g)
    v = torch.randn(b, hk, n, d, generator=g)
    keep = torch.arange(n) < 7
    mask = {"bool": keep.view(1, 1, 1, n),
            "float": torch.where(keep, 0.0, float("-inf")).view(1, 1, 1, n), None: None}[mask_kind]
    module = torch.nn.Module()
    module.num_key_value_groups = h // hk
    out, _ = gqa_decode_attention(module, q, k, v, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, h // hk), repeat_kv(v, h // hk),
                                                           attn_mask=mask, scale=0.3)
    assert out.shape == (b, 1, h, d)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_report_table_and_json(tmp_path):
    rows = [{"name": "a", "us": 1.5, "x": None}, {"name": "bbbbbb", "us": 1234.25, "x": 0.5}]
    text = format_table(rows, [Column("name", "model", "<", "<"), Column("us", "us", ".2f"),
                               Column("x", "ratio", ".3f")], title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and lines[1].split() == ["model", "us", "ratio"]
    assert lines[3].split() == ["a", "1.50", "-"] and lines[4].split() == ["bbbbbb", "1234.25", "0.500"]
    assert len({len(ln) for ln in lines[1:]}) == 1  # fixed width
    p = write_json(tmp_path / "sub" / "r.json", {"v": torch.tensor(2.5), "p": tmp_path, "rows": rows})
    back = json.loads(p.read_text())
    assert back["v"] == 2.5 and back["p"] == str(tmp_path) and back["rows"][1]["x"] == 0.5
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_quantize_lm_head_untied_and_tied():
    """--lm-head-bits: an untied lm_head becomes an int4 g128 QuantLinear (fewer bytes, logits close to the
    dequantized reference); a tied one is left alone and the result says so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.eval.bench_latency import model_bytes, quantize_lm_head
    from quantkit.nn import QuantLinear

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (1, 12))
    before = model_bytes(m)["lm_head"]
    w = m.lm_head.weight.detach().clone()
    assert quantize_lm_head(m, 4) == "int4 g128 asym (RTN)"
    assert isinstance(m.get_output_embeddings(), QuantLinear)
    after = model_bytes(m)["lm_head"]
    assert after < before / 6  # 4.25 bits/weight (+ params) instead of 32
    hidden = m.model(ids).last_hidden_state
    out = m(ids).logits
    rel_q = ((hidden @ w.t() - out).norm() / (hidden @ w.t()).norm()).item()
    assert 0 < rel_q < 0.15, rel_q  # the quantized head serves the logits: 4-bit RTN error, not 0
    tied = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=100, tie_word_embeddings=True))
    assert "tied" in quantize_lm_head(tied, 4)
    assert isinstance(tied.get_output_embeddings(), torch.nn.Linear)
