"""`quantkit eval tasks`: lm-evaluation-harness on a quantized checkpoint, offline.

The task is tests/data/tasks/quantkit_tiny_mc.yaml, 8 multiple-choice items in a JSONL file next to it (read by
datasets' packaged JSON builder: no network), run on a tiny random Llama with a word-level tokenizer, quantized
with rtn-w4g128 and saved. lm-eval's accuracy must equal the one computed here from the model's own
log-likelihoods. HF_HUB_OFFLINE / HF_DATASETS_OFFLINE rule out hub lookups.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkit as qk
from conftest import tiny_llama
from quantkit.errors import QuantkitError

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "tasks"
TASK = "quantkit_tiny_mc"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def word_tokenizer(folder, vocab_words=300):
    """Word-level, ids < 512 (the tiny model's vocab); no BOS / EOS (lm-eval then prefixes with UNK)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(vocab_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    tok = word_tokenizer(tmp / "tok")
    m = qk.quantize(tiny_llama(), "rtn-w4g128", tokenizer=tok, progress=False)
    return qk.save(m, tmp / "q", tokenizer=tok)


def run_cli(*args, cwd):
    env = {**os.environ, **OFFLINE}
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


@torch.no_grad()
def direct_accuracy(model, tok, docs):
    """Each choice's summed log-prob of ' ' + choice given the query, argmax, compared to the gold index."""
    correct = 0
    for doc in docs:
        ctx = tok(doc["query"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(doc["query"] + " " + choice)["input_ids"]
            assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        top = sorted(scores, reverse=True)
        assert top[0] - top[1] > 1e-3  # no near-tie that rounding in a batched forward could flip
        correct += int(scores.index(top[0]) == doc["gold"])
    return correct / len(docs)


def test_cli_accuracy_equals_direct_loglikelihoods(ckpt, tmp_path):
    out = tmp_path / "res" / "tasks.json"
    # run elsewhere than the YAML's folder: the relative data_files path resolves against the YAML
    proc = run_cli("eval", "tasks", ckpt, "--tasks", TASK, "--include-path", TASKS, "--batch-size", 4,
                   "--json", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in proc.stdout and "acc" in proc.stdout  # lm-eval's table
    res = json.loads(out.read_text())
    acc = res["results"][TASK]["acc,none"]

    docs = [json.loads(line) for line in (TASKS / f"{TASK}.jsonl").read_text().splitlines()]
    model = qk.load(ckpt)
    assert acc == pytest.approx(direct_accuracy(model, model.quantkit_tokenizer, docs), abs=1e-12)
    assert res["n-samples"][TASK]["effective"] == len(docs) == 8
    assert res["library_versions"]["lm_eval"] and res["library_versions"]["torch"]
    assert res["command"].startswith("quantkit eval tasks ") and "--tasks quantkit_tiny_mc" in res["command"]
    assert res["model"] == str(ckpt) and res["kv_cache"] is None
    assert not list(out.parent.glob("*.partial"))


def test_kv4_model_evaluates_with_its_cache_on(tmp_path):
    """The library call with `limit`: a model with COMET's KV4 cache scores each choice with K/V quantized,
    the log-likelihoods of `kv_cache_context` (as perplexity uses), not of full-precision attention."""
    from quantkit.eval.tasks import evaluate_tasks
    from quantkit.pipeline import kv_cache_context, quantize_model
    from quantkit.recipe import load_recipe

    tok = word_tokenizer(tmp_path / "tok")
    m = tiny_llama(hidden=128)  # head_dim 32: KV4's Hadamard rotation needs a power of two
    calib = torch.randint(1, 301, (2, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(m, load_recipe("comet-w4a4kv4"), calib, progress=False)
    assert m.quantkit_kv_cache
    res = evaluate_tasks(m, tok, TASK, include_path=TASKS, limit=2, batch_size=2, log_samples=True)
    samples = res["samples"][TASK]
    assert len(samples) == 2 and res["kv_cache"] == m.quantkit_kv_cache

    docs = [json.loads(line) for line in (TASKS / f"{TASK}.jsonl").read_text().splitlines()][:2]

    @torch.no_grad()
    def loglik(doc, choice):
        ctx = tok(doc["query"])["input_ids"]
        whole = tok(doc["query"] + " " + choice)["input_ids"]
        logp = torch.log_softmax(m(torch.tensor([whole])).logits[0].float(), -1)
        return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))

    with kv_cache_context(m):
        kv4 = [[loglik(d, c) for c in d["choices"]] for d in docs]
    fp = [[loglik(d, c) for c in d["choices"]] for d in docs]
    got = [r[0] for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
    kv4, fp = [x for row in kv4 for x in row], [x for row in fp for x in row]
    assert got == pytest.approx(kv4, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got, fp, strict=True)) > 1e-3  # KV4 changed the scores


def assert_one_line_error(capsys, excinfo, pattern):
    import re

    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert "Traceback" not in err


def cli_main(monkeypatch, *args):
    from quantkit.cli import main

    monkeypatch.setattr(sys, "argv", ["quantkit", *map(str, args)])
    with pytest.raises(SystemExit) as excinfo:
        main()
    return excinfo


def test_unknown_task_is_one_line_and_writes_nothing(ckpt, tmp_path, monkeypatch, capsys):
    import lm_eval.tasks

    # skip indexing lm-eval's ~15,000 built-in task YAMLs (20 s); the names checked are the include path's
    real = lm_eval.tasks.TaskManager.__init__
    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__",
                        lambda self, *a, **kw: real(self, *a, **{**kw, "include_defaults": False}))
    out = tmp_path / "r.json"
    exc = cli_main(monkeypatch, "eval", "tasks", ckpt, "--tasks", f"{TASK},no_such_task", "--include-path", TASKS,
                   "--json", out)
    assert_one_line_error(capsys, exc, r"unknown task 'no_such_task'.*--include-path")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_extra_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    out = tmp_path / "r.json"
    exc = cli_main(monkeypatch, "eval", "tasks", ckpt, "--tasks", TASK, "--json", out)
    assert_one_line_error(capsys, exc, r"pip install 'quantkit\[tasks\]'")
    assert not out.exists()
    with pytest.raises(QuantkitError, match=r"quantkit\[tasks\]"):
        from quantkit.eval.tasks import require_lm_eval

        require_lm_eval()
