"""The documentation: generated tables match the result JSON, links resolve, no development narration, and the
worked format example in docs/design.md runs."""

from __future__ import annotations

import re
import shutil
import types
from pathlib import Path

import pytest
import torch

from quantkit.eval import render_docs

ROOT = Path(__file__).resolve().parents[1]
NARRATION = re.compile(r"session|issue [0-9]|eleventh|tenth", re.I)
STALE = re.compile(r"DESIGN\.md|docs/FORMAT\.md|docs/ARCQUANT\.md|docs/KVCACHE\.md|docs/bench/|docs/experiments/")
TEXT = {".md", ".py", ".json", ".yaml", ".yml", ".sh", ".toml", ".txt"}


def _copy_docs(dst: Path) -> None:
    shutil.copy(ROOT / "README.md", dst / "README.md")
    shutil.copytree(ROOT / "docs", dst / "docs")


def test_rendered_tables_match_the_json_and_rendering_is_idempotent(tmp_path):
    _copy_docs(tmp_path)
    changed = render_docs.render(tmp_path)
    assert not changed, (f"out of date with docs/results: {[str(p.relative_to(tmp_path)) for p in changed]}; "
                         "run `python -m quantkit.eval.render_docs`")
    before = {p: p.read_text() for p in render_docs.pages(tmp_path)}
    assert render_docs.render(tmp_path) == []
    assert before == {p: p.read_text() for p in render_docs.pages(tmp_path)}


def test_every_results_marker_has_a_table_and_every_page_is_rendered():
    names = set()
    for p in render_docs.pages(ROOT):
        text = p.read_text()
        opened = re.findall(r"^<!-- results:([a-z0-9-]+) -->$", text, re.M)
        assert len(opened) == len(re.findall(r"^<!-- /results -->$", text, re.M)), p
        names |= set(opened)
    assert names <= set(render_docs.TABLES)
    assert {"recipes"} <= names


def test_result_json_records_command_and_versions():
    import json

    for f in sorted((ROOT / "docs" / "results").glob("*.json")):
        d = json.loads(f.read_text())
        assert d.get("command"), f"{f.name}: no command"
        assert "env" in d or all(k in d for k in ("torch", "device")), f"{f.name}: no library versions"


def _files(*tops: str):
    for top in tops:
        p = ROOT / top
        if p.is_file():
            yield p
            continue
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix in TEXT and "__pycache__" not in f.parts:
                yield f


def test_no_development_narration_in_the_product():
    hits = []
    for f in _files("README.md", "CHANGELOG.md", "docs", "quantkit", "kernels", "eval"):
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if NARRATION.search(line) or STALE.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_relative_links_in_the_docs_resolve():
    missing = []
    for f in [ROOT / "README.md", ROOT / "CHANGELOG.md", *render_docs.pages(ROOT)]:
        for target in re.findall(r"\]\(([^)\s]+)\)", f.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (f.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{f.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_the_format_example_in_design_md_runs(tmp_path):
    """The 'Adding a format' example registers a format that RTN, save and load handle unchanged."""
    import quantkit as qk
    from quantkit.formats import FORMATS

    text = (ROOT / "docs" / "design.md").read_text()
    m = re.search(r"<!-- example:format -->\n```python\n(.*?)```\n<!-- /example -->", text, re.S)
    assert m, "docs/design.md lost its format example"
    assert "pot" not in FORMATS
    module = types.ModuleType("docs_format_example")
    try:
        exec(compile(m.group(1), "docs/design.md", "exec"), module.__dict__)
        from conftest import tiny_llama

        model = tiny_llama()
        ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
        ref = model(ids).logits
        recipe = {"name": "pot-w4g32", "method": {"name": "rtn"},
                  "weights": {"format": "pot", "bits": 4, "group_size": 32, "round_up": False}}
        q = qk.quantize(model, recipe)
        y = q(ids).logits
        assert ((y - ref).norm() / ref.norm()).item() < 0.5
        qk.save(q, tmp_path / "ck")
        r = qk.load(tmp_path / "ck")
        assert torch.equal(r(ids).logits, y)
        assert r.model.layers[0].mlp.down_proj.exps.dtype == torch.int8
        with pytest.raises(Exception, match="round_up"):
            qk.quantize(tiny_llama(), {**recipe, "weights": {**recipe["weights"], "round_up": "yes"}})
    finally:  # leave the registries as the other tests expect them
        import quantkit.recipe as rec

        FORMATS.pop("pot", None)
        for table in ("_FORMAT_LIMITS", "_FORMAT_CHOICES", "_FORMAT_CHECKS"):
            getattr(rec, table, {}).pop("pot", None)
