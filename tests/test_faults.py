"""Bad input and environment faults on the CLI: one `error:` line (no traceback), exit status 2, and nothing
half-written at --out. Tiny random Llamas built here (no demo model); `quantize` runs use RTN (no data).

Most cases run the real entry point (`quantkit.cli.main`, what `python -m quantkit.cli` calls) in this process,
so that a fault (a full disk) can be injected with monkeypatch; a few run it as a subprocess end to end."""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_offload import word_tokenizer

import quantkit.checkpoint as checkpoint
import quantkit.cli as qcli
import quantkit.offload as offload
from conftest import tiny_llama
from quantkit.checkpoint import load, save
from quantkit.errors import QuantkitError
from quantkit.pipeline import quantize_model
from quantkit.recipe import load_recipe

# what safetensors 0.8 raises when the disk fills (measured on a 64 KiB tmpfs)
ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


def make_src(path: Path, tie: bool = True, poison: str | None = None) -> Path:
    """A tiny Llama folder (two safetensors shards, a word-level tokenizer; calib.txt next to it).
    poison: a parameter name to set one NaN in."""
    m = tiny_llama(tie=tie)
    if poison:
        with torch.no_grad():
            m.get_parameter(poison).view(-1)[0] = float("nan")
    m.save_pretrained(str(path), max_shard_size="300KB")
    word_tokenizer(path)
    return path


@pytest.fixture
def src(tmp_path):
    return make_src(tmp_path / "src")


def run_cli(monkeypatch, capsys, *args):
    """Run `quantkit ...` through the real entry point in this process: (status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["quantkit", *map(str, args)])
    capsys.readouterr()
    try:
        qcli.main()
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def run_sub(*args, umask=None):
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def one_line(rc, err, pattern):
    """Exit status 2 and exactly one `error:` line matching `pattern`, no traceback."""
    import re

    assert rc == 2, (rc, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err[-2000:]
    assert "Traceback" not in err
    return lines[0]


def leftovers(out: Path) -> list[str]:
    """What a failed run left next to --out: the folder itself, .partial, .old, temp files."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def quantize_args(src, out, *extra):
    return ["quantize", src, "--recipe", "rtn-w4g128", "--out", out, *extra]


# 1 ------------------------------------------------------------------------------------------------------


def test_non_causal_config_without_weights_is_one_line(tmp_path, monkeypatch, capsys):
    from transformers import BertConfig, LlamaConfig

    bert = tmp_path / "bert"
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(str(bert))
    out = tmp_path / "o"
    # end to end: the reported traceback (OSError ... no file named model.safetensors) is one line now
    proc = run_sub(*quantize_args(bert, out))
    one_line(proc.returncode, proc.stderr, r"no model weights found in '.*bert'.*'bert' model.*put the weight "
                                           r"files next to config.json")
    one_line(*run_cli(monkeypatch, capsys, "eval", "ppl", bert)[::2], r"no model weights found in '.*bert'")
    one_line(*run_cli(monkeypatch, capsys, *quantize_args(bert, out, "--offload"))[::2],
             r"'.*bert' holds no .safetensors shards")
    llama = tmp_path / "llama"
    LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64).save_pretrained(str(llama))
    one_line(*run_cli(monkeypatch, capsys, *quantize_args(llama, out))[::2],
             r"no model weights found in '.*llama'.*'llama' model")
    assert leftovers(out) == []


# 2 ------------------------------------------------------------------------------------------------------


def _readonly_out(tmp_path) -> Path:
    """An --out inside a folder nobody may write: chmod 0555 for a normal user; as root (which chmod does not
    stop) under /sys, where sysfs refuses to create files even for root."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "ck"
    ro = Path("/sys")
    if not ro.is_dir() or _can_create(ro):
        pytest.skip("running as root and /sys accepts new files: no read-only location to test with")
    return ro / "quantkit-test-out"


def _can_create(d: Path) -> bool:
    try:
        (d / ".quantkit-probe-test").touch()
    except OSError:
        return False
    (d / ".quantkit-probe-test").unlink()
    return True


@pytest.mark.parametrize("offload_flag", [False, True], ids=["in-memory", "offload"])
@pytest.mark.parametrize("where", ["under-a-file", "read-only-dir"])
def test_unwritable_out_fails_before_quantizing(where, offload_flag, src, tmp_path, monkeypatch, capsys):
    if where == "under-a-file":
        blocker = tmp_path / "somefile"
        blocker.write_text("not a folder")
        out = blocker / "sub" / "ck"  # the probe write in 'somefile' fails with ENOTDIR, for root too
        anc = blocker
    else:
        out = _readonly_out(tmp_path)
        anc = out.parent

    def must_not_run(*a, **k):
        raise AssertionError("the quantization ran although --out cannot be written")

    monkeypatch.setattr("quantkit.api.quantize_model", must_not_run)
    monkeypatch.setattr(offload, "quantize_layer", must_not_run)
    monkeypatch.setattr(offload, "SourceCheckpoint", must_not_run)
    extra = ["--offload"] if offload_flag else []
    rc, _, err = run_cli(monkeypatch, capsys, *quantize_args(src, out, *extra))
    one_line(rc, err, rf"cannot write --out '{out}': '{anc}' is not a writable folder \(.+\); choose another "
                      r"--out or fix its permissions")
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    if where == "read-only-dir" and os.geteuid() != 0:
        out.parent.chmod(0o755)  # let tmp_path be cleaned up


def test_unwritable_out_check_is_a_real_probe(tmp_path):
    """The check writes (and deletes) a probe file: a writable parent passes and keeps no trace."""
    out = tmp_path / "new" / "deeper" / "ck"
    checkpoint.check_out_dir(out, overwrite=False)
    assert list(tmp_path.iterdir()) == []


# 3 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["safetensors", "oserror"])
def test_disk_full_in_memory_writes_nothing(fault, src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ck"
    assert run_cli(monkeypatch, capsys, *quantize_args(src, out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fresh = tmp_path / "fresh"

    def full(*a, **k):
        if fault == "safetensors":
            raise SafetensorError(ENOSPC_SAFETENSORS)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    for target, extra in ((fresh, []), (out, ["--overwrite"])):
        rc, _, err = run_cli(monkeypatch, capsys, *quantize_args(src, target, *extra))
        one_line(rc, err, rf"disk full while writing '{target}'; free space and run it again \(nothing was left "
                          r"at that path\)")
    assert leftovers(fresh) == []  # no folder, no .partial, no temp file
    assert leftovers(out) == ["ck"] and {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("at", ["first-shard", "first-manifest", "layer-1"])
def test_disk_full_offload_is_one_line_and_leaves_no_empty_partial(at, src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    partial = tmp_path / "q.partial"
    if at == "first-manifest":
        # fsync is where a full disk surfaces for the manifest (json + fsync + rename)
        def full_fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(offload.os, "fsync", full_fsync)
    else:
        real, calls = checkpoint.save_file, []

        def flaky(tensors, path, metadata=None):
            calls.append(path)
            # shards: embeddings, head, layer 0, layer 1
            if len(calls) == (1 if at == "first-shard" else 4):
                raise SafetensorError(ENOSPC_SAFETENSORS)
            return real(tensors, path, metadata=metadata)

        monkeypatch.setattr(checkpoint, "save_file", flaky)
    rc, _, err = run_cli(monkeypatch, capsys, *quantize_args(src, out, "--offload"))
    one_line(rc, err, r"disk full while writing '.*q\.partial/.*'; free space and rerun the same command")
    assert not out.exists()
    if at == "layer-1":  # finished layers are kept for the rerun, no half-written file next to them
        units = json.loads((partial / offload.MANIFEST_NAME).read_text())["units"]
        assert "layer.0" in units and "layer.1" not in units
        assert not [p.name for p in partial.iterdir() if p.name.endswith(".tmp")]
        monkeypatch.undo()
        rc, _, err = run_cli(monkeypatch, capsys, *quantize_args(src, out, "--offload"))
        assert rc == 0 and "resuming" in err and not partial.exists()
    else:  # nothing finished: nothing to resume, nothing left behind
        assert leftovers(out) == []


# 4 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"], ids=["empty", "comments-only"])
def test_empty_recipe_file_is_an_error_naming_it(text, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    out = tmp_path / "o"
    # the recipe is read before the model: a missing model folder is fine here
    rc, _, err = run_cli(monkeypatch, capsys, "quantize", tmp_path / "model", "--recipe", recipe, "--out", out)
    one_line(rc, err, rf"recipe file '{recipe}' is empty; write at least a 'weights:' section")
    with pytest.raises(QuantkitError, match="is empty"):
        load_recipe(recipe)
    (tmp_path / "list.yaml").write_text("- weights\n")
    with pytest.raises(QuantkitError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")
    assert leftovers(out) == []


# 5 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload_flag", [False, True], ids=["in-memory", "offload"])
@pytest.mark.parametrize("poison", ["model.norm.weight", "model.layers.1.input_layernorm.weight"])
def test_nan_in_an_unquantized_weight_is_refused_at_quantize(poison, offload_flag, tmp_path, monkeypatch,
                                                             capsys):
    src = make_src(tmp_path / "src", poison=poison)
    out = tmp_path / "q"
    extra = ["--offload"] if offload_flag else []
    rc, _, err = run_cli(monkeypatch, capsys, *quantize_args(src, out, *extra))
    one_line(rc, err, rf"tensor '{poison}' holds 1 NaN/Inf values; the model's weights are damaged")
    assert not out.exists()


def test_eval_ppl_fails_on_a_non_finite_result(tmp_path):
    from transformers import AutoTokenizer

    src = make_src(tmp_path / "src")
    m = tiny_llama()
    quantize_model(m, load_recipe("rtn-w4g128"), None, progress=False)
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")  # damaged after quantization (or by hand): not caught before
    ck = save(m, tmp_path / "ck", tokenizer=AutoTokenizer.from_pretrained(str(src)))
    res = tmp_path / "ppl.json"
    proc = run_sub("eval", "ppl", ck, "--dataset", tmp_path / "calib.txt", "--seq-len", 32, "--max-windows", 2,
                   "--json", res)
    one_line(proc.returncode, proc.stderr, rf"perplexity of '{ck}' is not finite \(ppl nan\).*check the source "
                                           r"model for NaN/Inf")
    assert "ppl nan" not in proc.stdout and not res.exists()


# 6 ------------------------------------------------------------------------------------------------------


def test_tensors_the_config_does_not_expect_are_an_error_at_load(tmp_path, monkeypatch, capsys):
    m = tiny_llama()
    quantize_model(m, load_recipe("rtn-w4g128"), None, progress=False)  # asymmetric: stores zeros
    ck = save(m, tmp_path / "ck")
    cfg_path = ck / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["symmetric"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2))
    with pytest.raises(QuantkitError, match=r"holds a tensor its quantization_config does not expect "
                                            r"\('model\.layers\.0\.mlp\.up_proj\.zeros' \(module "
                                            r"'model\.layers\.0\.mlp\.up_proj' is listed as format int, bits 4, "
                                            r"group_size 128, symmetric True.*restore it or re-export"):
        load(ck)
    one_line(*run_cli(monkeypatch, capsys, "eval", "ppl", ck, "--max-windows", 1)[::2],
             r"does not expect \('model\.layers\.0\.mlp\.up_proj\.zeros'")
    # a tensor no module owns, added to a shard, is refused the same way
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["symmetric"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    shard = next(ck.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(QuantkitError, match=r"does not expect \('model\.extra\.weight'\)"):
        load(ck)


# 7 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload_flag", [False, True], ids=["in-memory", "offload"])
def test_overwrite_replaces_an_existing_file_cleanly(offload_flag, src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "X"
    out.write_text("a file in the way")
    extra = ["--offload"] if offload_flag else []
    one_line(*run_cli(monkeypatch, capsys, *quantize_args(src, out, *extra))[::2],
             rf"output '{out}' is an existing file; pass --overwrite")
    assert out.read_text() == "a file in the way"
    rc, _, err = run_cli(monkeypatch, capsys, *quantize_args(src, out, *extra, "--overwrite"))
    assert rc == 0, err[-2000:]
    assert out.is_dir() and (out / "config.json").exists()
    assert leftovers(out) == ["X"]  # no X.old, no X.partial
    load(out)


# 8 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload_flag", [False, True], ids=["in-memory", "offload"])
def test_checkpoint_files_honour_the_umask(offload_flag, src, tmp_path):
    for mask in (0o022, 0o027):
        out = tmp_path / f"q{mask:o}"
        proc = run_sub(*quantize_args(src, out, *(["--offload"] if offload_flag else [])), umask=mask)
        assert proc.returncode == 0, proc.stderr[-2000:]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert any(n.endswith(".safetensors") for n in modes) and "config.json" in modes
        assert modes == dict.fromkeys(modes, 0o666 & ~mask), modes
