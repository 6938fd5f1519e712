import json
import math

import pytest
import torch

from conftest import tiny_llama
from quantkit.data import calibration_windows, load_text, tokenize
from quantkit.errors import QuantkitError
from quantkit.eval import perplexity


class CharTokenizer:
    """Bytes as tokens: enough to exercise the data and evaluation paths without a model hub."""

    model_max_length = 1 << 30

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)

        class Out:
            input_ids = ids

        return Out()


def test_ptb_splits_load():
    test = load_text("ptb", "test")
    assert test.startswith("no it was n't black monday") and "\n" not in test
    assert len(load_text("ptb", "train")) > 10 * len(test)


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(str(tmp_path / "a.txt"), "train") == "hello world"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(QuantkitError, match="line 1 has no 'text' field"):
        load_text(str(tmp_path / "c.jsonl"))


def test_unknown_dataset_and_missing_file():
    with pytest.raises(QuantkitError, match="unknown dataset 'ptbb'"):
        load_text("ptbb")
    with pytest.raises(QuantkitError, match="does not exist"):
        load_text("/no/such/file.txt")


def test_calibration_windows_are_seeded_windows_of_train(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghijklmnopqrstuvwxyz" * 40)
    tok = CharTokenizer()
    a = calibration_windows(tok, str(p), nsamples=5, seq_len=16, seed=3)
    b = calibration_windows(tok, str(p), nsamples=5, seq_len=16, seed=3)
    c = calibration_windows(tok, str(p), nsamples=5, seq_len=16, seed=4)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenize(tok, p.read_text())
    for row in a:  # every window is a contiguous slice of the tokenized text
        s = int(torch.nonzero(ids == row[0])[0])
        assert any(torch.equal(ids[s2 : s2 + 16], row) for s2 in torch.nonzero(ids == row[0]).flatten().tolist()), s
    with pytest.raises(QuantkitError, match="fewer than seq_len"):
        calibration_windows(tok, str(p), nsamples=1, seq_len=5000)


def test_perplexity_follows_the_protocol(tmp_path):
    p = tmp_path / "t.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 12
    p.write_text(text)
    model = tiny_llama(vocab=256)
    res = perplexity(model, CharTokenizer(), dataset=str(p), seq_len=64, progress=False)
    n = len(text.encode()) // 64
    assert res["windows"] == n and res["predicted_tokens"] == n * 63 and res["tokens"] == n * 64
    ids = torch.tensor(list(text.encode()))[: n * 64].view(n, 64)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert res["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    capped = perplexity(model, CharTokenizer(), dataset=str(p), seq_len=64, max_windows=2, progress=False)
    assert capped["windows"] == 2


def test_enwiki_is_wikipedia_prose_split_by_article():
    pytest.importorskip("gensim")
    test, valid, train = (load_text("enwiki", s) for s in ("test", "valid", "train"))
    assert test.startswith("The Academy Awards are the oldest awards ceremony")
    assert len(train) > 5 * len(test) > 5 * 100_000
    paras = test.split("\n\n")
    assert all(len(p.split()) >= 12 for p in paras)  # prose only: no table cells, list items or headings
    assert not any(mark in test for mark in ("[[", "{{", "'''", "<ref"))
    # no paragraph is shared between the splits (each article belongs to one split)
    assert not set(paras) & set(valid.split("\n\n")) and not set(paras) & set(train.split("\n\n"))


def test_enwiki_without_gensim_says_what_to_install(monkeypatch):
    import sys

    load_text.cache_clear()
    monkeypatch.setitem(sys.modules, "gensim", None)
    try:
        with pytest.raises(QuantkitError, match=r"needs the package 'gensim'.*quantkit\[enwiki\]"):
            load_text("enwiki", "test")
    finally:
        load_text.cache_clear()


def test_quality_job_measures_both_texts_and_merges_only_within_one_environment(demo_dir, tmp_path):
    pytest.importorskip("gensim")
    from quantkit.eval import quality

    out = tmp_path / "q.json"
    args = ["--recipes", "rtn-w4g128", "--seq-len", "128", "--nsamples", "2", "--ptb-windows", "2",
            "--heldout-windows", "1", "--out-dir", str(tmp_path / "ck"), "--json", str(out)]
    quality.main(args)
    doc = json.loads(out.read_text())
    assert [(r["recipe"], r["seed"]) for r in doc["rows"]] == [("fp", None), ("rtn-w4g128", 0)]
    assert doc["texts"] == [{"dataset": "ptb", "split": "test", "windows": 2},
                            {"dataset": "enwiki", "split": "test", "windows": 1}]
    fp, q = doc["rows"]
    for ds in ("ptb", "enwiki"):
        assert fp["eval"][ds]["windows"] == (2 if ds == "ptb" else 1)
        assert q["ppl"][ds] > fp["ppl"][ds] > 1  # 4-bit RTN loses something on either text
    assert 4 < q["bits_per_weight"] < 5 and q["quant_seconds"] >= 0
    assert doc["env"]["threads"] == torch.get_num_threads()
    # --merge adds a seed row to the same file, replacing nothing else
    quality.main(args[:-2] + ["--json", str(out), "--merge", "--no-fp", "--seeds", "1"])
    doc2 = json.loads(out.read_text())
    assert [(r["recipe"], r["seed"]) for r in doc2["rows"]] == [("fp", None), ("rtn-w4g128", 0), ("rtn-w4g128", 1)]
    assert doc2["rows"][:2] == doc["rows"] and len(doc2["commands"]) == 2
    # ... but not to one measured in another environment, or with other texts
    doc2["env"]["transformers"] = "0.0"
    out.write_text(json.dumps(doc2))
    with pytest.raises(QuantkitError, match=r"another environment \(transformers: 0.0 vs"):
        quality.main(args + ["--merge", "--no-fp"])
    with pytest.raises(QuantkitError, match="unknown recipe|not found|no recipe"):
        quality.main(["--recipes", "no-such-recipe", "--json", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
