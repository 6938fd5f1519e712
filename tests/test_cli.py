"""The `quantkit` command line, end to end on the demo model (SmolLM2-135M; fetched once from PyPI)."""

import json
import subprocess
import sys

import pytest


def run(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_one_line_error(proc, pattern):
    import re

    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_recipes_lists_backbone_recipes():
    out = run("recipes").stdout
    for name in ["rtn-w4g128", "rtn-w3g128", "rtn-w2g64", "gptq-w4g128", "gptq-w3g128", "gptq-w2g64"]:
        assert name in out


@pytest.mark.slow
def test_quantize_eval_inspect_on_the_demo_model(demo_dir, tmp_path):
    out = tmp_path / "w4"
    run("quantize", "demo", "--recipe", "gptq-w4g128", "--out", out, "--nsamples", 2, "--seq-len", 128)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    res_path = tmp_path / "ppl.json"
    run("eval", "ppl", out, "--seq-len", 512, "--max-windows", 2, "--json", res_path)
    res = json.loads(res_path.read_text())
    assert res["windows"] == 2 and res["seq_len"] == 512 and res["dataset"] == "ptb"
    fp_path = tmp_path / "fp.json"
    run("eval", "ppl", "demo", "--seq-len", 512, "--max-windows", 2, "--json", fp_path)
    fp = json.loads(fp_path.read_text())["ppl"]
    assert fp < res["ppl"] < 1.5 * fp  # 4-bit GPTQ costs a little, not a lot
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["totals"]["quantized_modules"] == 30 * 7
    assert 4.0 < info["totals"]["bits_per_weight"] < 4.6  # 4.54: K = 576 pads to 640 in g128
    table = run("inspect", out).stdout
    assert "model.layers.29.mlp.down_proj" in table and "bits/weight" in table

    # bad input on a real model: one line, nothing written
    assert_one_line_error(run("quantize", "demo", "--recipe", "rtn-w4g128", "--out", out, ok=False),
                          "not empty; pass --overwrite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: {bits: 4, grop_size: 128}\n")
    fresh = tmp_path / "fresh"
    assert_one_line_error(run("quantize", "demo", "--recipe", bad, "--out", fresh, ok=False),
                          "unknown recipe key 'grop_size'.*did you mean 'group_size'")
    assert not fresh.exists()
    shard = next(out.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    assert_one_line_error(run("eval", "ppl", out, "--max-windows", 1, ok=False), "truncated or corrupt")


def test_bad_inputs_give_one_line(tmp_path):
    assert_one_line_error(run("quantize", tmp_path / "nope", "--recipe", "rtn-w4g128", "--out", tmp_path / "o",
                              ok=False), "does not exist")
    assert_one_line_error(run("quantize", tmp_path, "--recipe", "rtn-w4g128", "--out", tmp_path / "o", ok=False),
                          "no config.json")
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert_one_line_error(run("eval", "ppl", vit, ok=False), "not a causal language model")
    assert_one_line_error(run("quantize", "demo", "--recipe", "gptq-w4g12", "--out", tmp_path / "o", ok=False),
                          "did you mean 'gptq-w4g128'")
    big = tmp_path / "big.yaml"
    big.write_text("weights: {bits: 12}\n")
    assert_one_line_error(run("quantize", "demo", "--recipe", big, "--out", tmp_path / "o", ok=False),
                          r"bits = 12 is out of range")
    assert_one_line_error(run("inspect", tmp_path / "nope", ok=False), "does not exist")
    assert not (tmp_path / "o").exists()
