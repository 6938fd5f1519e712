"""What every exporter shares: reading a quantkit checkpoint and writing a folder atomically.

An export writes into `<out>.partial/` beside `--out` and renames it into place only when complete
(`quantkit.checkpoint.replace_path`), so a refused or failed export leaves nothing at `--out`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from quantkit.checkpoint import check_out_dir, read_config, replace_path, write_error
from quantkit.errors import QuantkitError


def read_quantkit_config(ckpt: Path) -> tuple[dict, dict]:
    """(model config without `quantization_config`, quantkit `quantization_config`) of checkpoint `ckpt`;
    a one-line QuantkitError when `ckpt` is not a quantkit checkpoint."""
    if not ckpt.is_dir():
        raise QuantkitError(f"checkpoint folder '{ckpt}' does not exist")
    return read_config(ckpt)


def write_folder(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Check `out`, let `fill(tmp)` write the whole folder into `<out>.partial`, then rename it to `out`.
    Anything that fails on the way removes the partial folder."""
    check_out_dir(out, overwrite)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        replace_path(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, out, "run the export again (nothing was left at that path)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
