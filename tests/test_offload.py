"""Disk offload (quantkit/offload.py): streaming from safetensors shards, identity with the in-memory pipeline,
kill -9 and resume, errors that keep the resumable state."""

import errno
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import quantkit as qk
import quantkit.offload as offload
from conftest import tiny_llama
from quantkit.calibration_store import ActivationBudget, ActivationStore, parse_size
from quantkit.checkpoint import TRANSFORMERS_GUARD_KEY, load
from quantkit.errors import QuantkitError
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe

RECIPES = ["rtn-w4g128", "gptq-w4g128", "hlq-w3g128", "arcquant-nvfp4-gptq", "flexq-w6a6", "comet-w4a4kv4"]


def word_tokenizer(folder, vocab_words=300):
    """A word-level tokenizer (ids < 512, the tiny model's vocab) and a text file to calibrate on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(vocab_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    rng = random.Random(0)
    text = folder.parent / "calib.txt"
    text.write_text(" ".join(f"w{rng.randrange(vocab_words)}" for _ in range(4000)))
    return text


def make_source(path, layers=2, tie=True, tokenizer=False, hidden=96):
    m = tiny_llama(layers=layers, tie=tie, hidden=hidden)
    m.save_pretrained(str(path), max_shard_size="300KB")
    assert len(list(path.glob("*.safetensors"))) > 1  # a real multi-shard folder
    text = word_tokenizer(path) if tokenizer else None
    return m, text


@pytest.fixture
def calib():
    return torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))


def stream(src, out, recipe="gptq-w4g128", calib=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda s: None)
    return qk.quantize_streaming(src, recipe, out, calibration=calib, **kw)


def files_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("recipe", RECIPES)
def test_streaming_equals_in_memory_pipeline(recipe, calib, tmp_path):
    hidden = 128 if recipe.endswith("kv4") else 96  # the rotated KV4 cache needs a power-of-two head_dim
    make_source(tmp_path / "src", hidden=hidden)
    ref = tiny_llama(hidden=hidden)
    quantize_model(ref, load_recipe(recipe), calib, progress=False)
    # a budget of ~1.5 samples: the first stays on the device, the rest spill to disk
    out = stream(tmp_path / "src", tmp_path / "q", recipe, calib, max_activation_memory=36_000,
                 offload_dir=tmp_path / "spill")
    q = load(out)
    ref_sd, sd = ref.state_dict(), q.state_dict()
    assert ref_sd.keys() == sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], sd[k]), k
    with torch.no_grad():
        assert torch.equal(ref(calib).logits, q(calib).logits)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["modules"] == ref.quantkit_report.modules and qc["recipe"]["name"] == recipe
    # one writer for config.json: the in-memory save of the same model writes the same file
    ref.quantkit_recipe = load_recipe(recipe).to_dict()
    saved = json.loads((qk.save(ref, tmp_path / "mem") / "config.json").read_text())
    assert list(saved["quantization_config"]) == list(qc) and saved["quantization_config"] == qc
    assert saved[TRANSFORMERS_GUARD_KEY] == cfg[TRANSFORMERS_GUARD_KEY]
    assert qc.get("kv_cache") == ref.quantkit_kv_cache and q.quantkit_kv_cache == ref.quantkit_kv_cache
    assert (qc.get("kv_cache") is not None) == recipe.endswith("kv4")
    assert len(list(out.glob("model-*-of-00004.safetensors"))) == 4  # embeddings, 2 layers, head
    assert not (tmp_path / "q.partial").exists() and not list((tmp_path / "spill").glob("*"))


def test_untied_model_streams_lm_head(calib, tmp_path):
    make_source(tmp_path / "src", tie=False)
    ref = tiny_llama(tie=False)
    quantize_model(ref, load_recipe("rtn-w3g128"), None, progress=False)
    q = load(stream(tmp_path / "src", tmp_path / "q", "rtn-w3g128"))
    assert q.lm_head.weight.data_ptr() != q.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(ref(calib).logits, q(calib).logits)


def test_dry_run_estimates_and_writes_nothing(calib, tmp_path):
    make_source(tmp_path / "src")
    lines = []
    est = stream(tmp_path / "src", tmp_path / "q", calib=calib, dry_run=True, log=lines.append)
    assert est["peak_ram_bytes"] > est["layer_source_bytes"] > 0 and est["disk_bytes"] > 0
    assert "peak RAM" in lines[0] and "disk" in lines[0]
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_cli_dry_run_and_tokenizer_mismatch(tmp_path):
    from click.testing import CliRunner

    from quantkit.cli import cli as cli_group

    make_source(tmp_path / "src")
    r = CliRunner().invoke(cli_group, ["quantize", str(tmp_path / "src"), "--recipe", "gptq-w4g128", "--out",
                                       str(tmp_path / "q"), "--offload", "--dry-run", "--nsamples", "2"])
    assert r.exit_code == 0 and "peak RAM" in r.output + (r.stderr if r.stderr_bytes else "")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    r = CliRunner().invoke(cli_group, ["quantize", str(tmp_path / "src"), "--recipe", "rtn-w4g128", "--out",
                                       str(tmp_path / "q"), "--dry-run"])
    assert isinstance(r.exception, QuantkitError) and "add --offload" in str(r.exception)
    with pytest.raises(QuantkitError, match="outside the model's vocabulary"):
        stream(tmp_path / "src", tmp_path / "q", calib=torch.full((1, 8), 600))


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, at, action=None):
    def hook(point, layer):
        if f"{point}:{layer}" == at:
            if action:
                action()
            raise Interrupt

    monkeypatch.setattr(offload, "_debug_kill", hook)


def test_resume_refuses_other_settings_then_finishes_identically(calib, tmp_path, monkeypatch):
    make_source(tmp_path / "src", layers=3)
    full = stream(tmp_path / "src", tmp_path / "full", "gptq-w4g128", calib)
    interrupt_at(monkeypatch, "after-manifest:0")
    with pytest.raises(Interrupt):
        stream(tmp_path / "src", tmp_path / "q", "gptq-w4g128", calib)
    manifest = json.loads((tmp_path / "q.partial" / offload.MANIFEST_NAME).read_text())
    assert "layer.0" in manifest["units"] and "layer.1" not in manifest["units"]
    monkeypatch.undo()
    with pytest.raises(QuantkitError, match=r"other settings \(calibration_sha256 differs; nsamples 4 -> 2"):
        stream(tmp_path / "src", tmp_path / "q", "gptq-w4g128", calib[:2])
    with pytest.raises(QuantkitError, match="other settings .*recipe differs"):
        stream(tmp_path / "src", tmp_path / "q", "gptq-w3g128", calib)
    out = stream(tmp_path / "src", tmp_path / "q", "gptq-w4g128", calib)
    assert files_bytes(out) == files_bytes(full)


def test_missing_and_unreadable_shards_are_one_clear_error(calib, tmp_path):
    make_source(tmp_path / "src")
    shards = sorted((tmp_path / "src").glob("*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].unlink()
    with pytest.raises(QuantkitError, match=f"shard '{shards[1].name}' listed in .* is missing"):
        stream(tmp_path / "src", tmp_path / "q", calib=calib)
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantkitError, match="input shard .* is unreadable"):
        stream(tmp_path / "src", tmp_path / "q", calib=calib)
    index = tmp_path / "src" / "model.safetensors.index.json"
    shards[1].write_bytes(data)
    idx = json.loads(index.read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shards[1].name}
    index.write_text(json.dumps(idx))  # the shard is on disk, but missing from the index
    with pytest.raises(QuantkitError, match="is in none of the shards"):
        stream(tmp_path / "src", tmp_path / "q", calib=calib)


def test_shard_breaking_mid_run_keeps_the_finished_layers(calib, tmp_path, monkeypatch):
    make_source(tmp_path / "src", layers=3)
    full = stream(tmp_path / "src", tmp_path / "full", calib=calib)
    src = tmp_path / "src"
    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    victim = src / idx["model.layers.2.mlp.down_proj.weight"]
    good = victim.read_bytes()

    def corrupt():
        victim.write_bytes(good[:100])

    interrupt_at(monkeypatch, "after-manifest:0", corrupt)
    monkeypatch.setattr(offload, "_debug_kill", lambda p, li: corrupt() if (p, li) == ("after-manifest", 0) else None)
    with pytest.raises(QuantkitError, match=f"input shard '.*{victim.name}' is unreadable"):
        stream(src, tmp_path / "q", calib=calib)
    units = json.loads((tmp_path / "q.partial" / offload.MANIFEST_NAME).read_text())["units"]
    assert "layer.0" in units
    monkeypatch.undo()
    victim.write_bytes(good)
    assert files_bytes(stream(src, tmp_path / "q", calib=calib)) == files_bytes(full)


def test_disk_full_is_one_clear_error_and_resumable(calib, tmp_path, monkeypatch):
    make_source(tmp_path / "src")
    full = stream(tmp_path / "src", tmp_path / "full", calib=calib)
    import quantkit.checkpoint as checkpoint  # shards are written through checkpoint.write_shard

    real = checkpoint.save_file
    calls = []

    def flaky(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 4:  # embeddings, head, layer 0 fine; layer 1 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    with pytest.raises(QuantkitError, match="disk full while writing .*rerun the same command"):
        stream(tmp_path / "src", tmp_path / "q", calib=calib)
    assert "layer.0" in json.loads((tmp_path / "q.partial" / offload.MANIFEST_NAME).read_text())["units"]
    monkeypatch.undo()
    assert files_bytes(stream(tmp_path / "src", tmp_path / "q", calib=calib)) == files_bytes(full)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_kill9_and_rerun_gives_a_bit_identical_checkpoint(tmp_path):
    """SIGKILL after layer 1's shard is on disk but before its activations and manifest entry: the rerun drops
    that shard, reloads layer 0's saved outputs and redoes layer 1."""
    src = tmp_path / "src"
    _, text = make_source(src, layers=3, tokenizer=True)
    settings = dict(dataset=str(text), nsamples=3, seq_len=48, max_activation_memory="40KB")
    stream(src, tmp_path / "ref", "gptq-w3g128", **settings)  # the uninterrupted run, in process
    args = ["quantize", src, "--recipe", "gptq-w3g128", "--out", tmp_path / "q", "--offload", "--dataset", text,
            "--nsamples", 3, "--seq-len", 48, "--max-activation-memory", "40KB"]
    killed = cli(*args, env={"QUANTKIT_DEBUG_KILL": "after-shard:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = tmp_path / "q.partial"
    assert not (tmp_path / "q").exists() and (partial / offload.MANIFEST_NAME).exists()
    assert (partial / "model-00003-of-00005.safetensors").exists()  # layer 1's shard, not yet recorded
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stderr and "1 of 3 layers were done" in again.stderr
    assert files_bytes(tmp_path / "q") == files_bytes(tmp_path / "ref")
    assert load(tmp_path / "q").quantkit_tokenizer is not None


def test_activation_store_spills_exact_bytes_and_cleans_up(tmp_path):
    budget = ActivationBudget(parse_size("3KB"))
    store = ActivationStore(torch.device("cpu"), budget, tmp_path / "spill", "x")
    xs = [torch.randn(1, 5, 100).to(torch.bfloat16) for _ in range(4)]  # 1000 B each
    for x in xs:
        store.append(x)
    assert budget.used == 3000 and store.spilled_bytes == 1000
    assert all(torch.equal(store[i], xs[i]) for i in range(4))
    store.close()
    assert budget.used == 0 and not list((tmp_path / "spill").iterdir())
    assert parse_size("4GB") == 4 * 10**9 and parse_size("1.5GiB") == 3 * 2**29
    with pytest.raises(QuantkitError, match="cannot read size"):
        parse_size("lots")


def test_make_random_checkpoint_streams_and_quantizes(tmp_path):
    from quantkit.eval.make_random_checkpoint import main

    word_tokenizer(tmp_path / "tok")
    main([str(tmp_path / "rand"), "--preset", "tiny", "--vocab", "512", "--layers", "2", "--shard-size", "200KB",
          "--tokenizer", str(tmp_path / "tok")])
    src = tmp_path / "rand"
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "tokenizer.json").exists()
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["dtype"] == "bfloat16"
    out = stream(src, tmp_path / "q", "rtn-w4g128")
    q = load(out)
    assert q.model.norm.weight.dtype == torch.bfloat16  # unquantized tensors keep their stored dtype
    assert q.quantkit_tokenizer is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streaming_on_cuda_equals_in_memory_on_cuda(calib, tmp_path):
    make_source(tmp_path / "src")
    ref = tiny_llama()
    quantize_model(ref, load_recipe("gptq-w4g128"), calib, device="cuda", progress=False)
    q = load(stream(tmp_path / "src", tmp_path / "q", "gptq-w4g128", calib, device="cuda",
                    dtype=torch.float32))
    ref_sd, sd = ref.state_dict(), q.state_dict()
    for k in ref_sd:
        assert torch.equal(ref_sd[k].cpu(), sd[k]), k
