"""quantkit: post-training quantization for LLMs on one layer-by-layer pipeline.

The public API is imported lazily, so `import quantkit` (and `quantkit --help`) does not import torch.
`import quantkit` also makes transformers load quantkit checkpoints (quantkit.integrations.transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from quantkit import integrations as _integrations

__version__ = "0.1.0"

_API = {
    "load": "quantkit.api",
    "load_model": "quantkit.api",
    "quantize": "quantkit.api",
    "quantize_streaming": "quantkit.api",
    "save": "quantkit.api",
    "QuantkitError": "quantkit.errors",
    "Recipe": "quantkit.recipe",
    "load_recipe": "quantkit.recipe",
}

__all__ = ["QuantkitError", "Recipe", "load", "load_model", "load_recipe", "quantize", "quantize_streaming", "save"]

# `quant_method: quantkit` in transformers' quantizer table, so that AutoModelForCausalLM.from_pretrained loads
# quantkit checkpoints; registered when transformers imports that table (no transformers/torch import here).
_integrations.install()

if TYPE_CHECKING:
    from quantkit.api import load, load_model, quantize, quantize_streaming, save
    from quantkit.errors import QuantkitError
    from quantkit.recipe import Recipe, load_recipe


def __getattr__(name: str):
    if name == "eval":  # `quantkit.eval`, the evaluation jobs (the top-level eval/ folder)
        return importlib.import_module("quantkit.eval")
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
