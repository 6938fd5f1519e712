"""quantkit: post-training quantization for LLMs on one layer-by-layer pipeline."""

__version__ = "0.1.0"

from quantkit import eval  # quantkit.eval lives in the top-level eval/ folder
from quantkit.api import load, load_model, quantize, quantize_streaming, save
from quantkit.errors import QuantkitError
from quantkit.recipe import Recipe, load_recipe

__all__ = ["QuantkitError", "Recipe", "eval", "load", "load_model", "load_recipe", "quantize", "quantize_streaming", "save"]
