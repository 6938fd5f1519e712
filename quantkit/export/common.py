"""What every exporter shares: reading a quantkit checkpoint and writing a folder atomically.

An export writes into `<out>.partial/` beside `--out` and renames it into place only when complete
(`quantkit.checkpoint.replace_path`), so a refused or failed export leaves nothing at `--out`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from quantkit import checkpoint
from quantkit.checkpoint import read_config
from quantkit.errors import QuantkitError


def read_quantkit_config(ckpt: Path) -> tuple[dict, dict]:
    """(model config without `quantization_config`, quantkit `quantization_config`) of checkpoint `ckpt`;
    a one-line QuantkitError when `ckpt` is not a quantkit checkpoint."""
    if not ckpt.is_dir():
        raise QuantkitError(f"checkpoint folder '{ckpt}' does not exist")
    return read_config(ckpt)


def write_folder(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """`quantkit.checkpoint.write_folder` with the exporters' retry hint."""
    return checkpoint.write_folder(out, overwrite, fill, "run the export again (nothing was left at that path)")


def copy_side_files(model, tmp: Path) -> None:
    """Generation config and tokenizer of a loaded quantkit model, when it has them."""
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(tmp))
    tok = getattr(model, "quantkit_tokenizer", None)
    if tok is not None:
        tok.save_pretrained(str(tmp))


def write_config(tmp: Path, cfg: dict) -> None:
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
