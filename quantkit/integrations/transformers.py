"""transformers, natively: `AutoModelForCausalLM.from_pretrained(<quantkit checkpoint>)` after `import quantkit`.

    import quantkit
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/smollm2-w4", dtype=torch.bfloat16, device_map="cpu")

returns the model `quantkit.load` returns (same modules, same tensors, same logits) for every weight format and
activation scheme, with transformers' own loader doing the reading: shards are read lazily, `dtype`,
`device_map` (accelerate placement / offload) and the other `from_pretrained` options work as for any model.

How: `QuantkitConfig` and `QuantkitHfQuantizer` are registered in transformers' quantizer table for
`quant_method: quantkit` (`register()`; `import quantkit` arranges it, see quantkit.integrations). Before the
weights load, the quantizer swaps in a QuantLinear for every `quantization_config.modules` entry with
`quantkit.checkpoint.install_quant_linears`, the very function `quantkit.load` builds its modules with (empty
packed tensors in their declared shapes and dtypes, activation quantizer buffers, bias); transformers then fills
them by name from the shards, as it fills every other tensor, keeping each packed tensor's stored dtype (a
skeleton tensor's dtype wins over `dtype`). After loading it checks that every QuantLinear tensor was filled,
records the recipe and KV-cache scheme as `quantkit.load` does, and, when the checkpoint has a `kv_cache` entry,
makes `generate()` use a `KV4Cache` unless given another cache (quantkit.kvcache; `quantkit.load`'s model uses
it under `quantkit.pipeline.kv_cache_context`).

Without quantkit, transformers skips an unknown quant_method with a warning and would load random Linears; the
checkpoint's config.json therefore carries `transformers_weights` set to a message
(`quantkit.checkpoint.TRANSFORMERS_GUARD`), which transformers refuses, quoting it. The quantizer removes that
key from the config before transformers reads it.

This module imports only transformers' quantizer modules at import time: the import hook runs it while
transformers itself is still being imported, so quantkit's model code is imported when a model loads.
"""

from __future__ import annotations

import types
from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "quantkit"
logger = logging.get_logger(__name__)


class QuantkitConfig(QuantizationConfigMixin):
    """A quantkit checkpoint's `quantization_config` (docs/format.md), as transformers holds it."""

    def __init__(self, modules: dict[str, dict] | None = None, format_version: int | None = None,
                 kv_cache: dict | None = None, recipe: dict | None = None, **kwargs: Any):
        from quantkit.checkpoint import FORMAT_VERSION

        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION if format_version is None else format_version
        self.modules = dict(modules or {})
        self.kv_cache = kv_cache
        self.recipe = recipe
        self.extra = {k: v for k, v in kwargs.items() if k != "quant_method"}

    def to_dict(self) -> dict[str, Any]:
        """The dict the checkpoint stores (what `quantkit.save` writes again from the loaded model)."""
        from quantkit.checkpoint import build_quantization_config

        d = build_quantization_config(self.modules, self.kv_cache, self.recipe)
        d["format_version"] = self.format_version  # as stored (the key keeps its place)
        return {**d, **self.extra}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _drop_guard(config):
    """Remove the config.json key that makes transformers without quantkit refuse the checkpoint."""
    from quantkit.checkpoint import TRANSFORMERS_GUARD, TRANSFORMERS_GUARD_KEY

    if getattr(config, TRANSFORMERS_GUARD_KEY, None) == TRANSFORMERS_GUARD:
        delattr(config, TRANSFORMERS_GUARD_KEY)
    return config


class QuantkitHfQuantizer(HfQuantizer):
    """Loads quantkit checkpoints (pre-quantized only) with QuantLinear modules."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        from quantkit.checkpoint import check_format_version

        check_format_version(self.quantization_config.to_dict(), "this checkpoint")

    # transformers hands the model config to these hooks before it resolves the weights files (5.x: one or the
    # other, by version): the guard key goes there
    def update_attn_implementation(self, config):
        return _drop_guard(super().update_attn_implementation(config))

    def update_tp_plan(self, config):
        parent = getattr(super(), "update_tp_plan", None)
        return _drop_guard(parent(config) if parent is not None else config)

    def update_ep_plan(self, config):
        parent = getattr(super(), "update_ep_plan", None)
        return _drop_guard(parent(config) if parent is not None else config)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        import torch

        from quantkit.checkpoint import check_quant_tensors, install_quant_linears

        # transformers builds the model under `torch.device("meta")`; formats compute small constants in their
        # constructors (INT6's clip grid), which must be real: the packed tensors are meta either way
        with torch.device("cpu"):
            quant = install_quant_linears(model, self.quantization_config.modules)
        # transformers would fill a missing packed tensor with garbage (it "initializes" missing keys) and skip
        # one of another shape: check the shard headers first, as quantkit.load checks the tensors it read
        check_quant_tensors(quant, _stored_tensors(checkpoint_files or []))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        qc = self.quantization_config
        model.quantkit_recipe = qc.recipe
        model.quantkit_kv_cache = qc.kv_cache
        model.quantkit_tokenizer = _tokenizer(getattr(model.config, "name_or_path", None))
        if qc.kv_cache:
            use_kv4_cache_in_generate(model, qc.kv_cache)
        return model

    def is_serializable(self, *args, **kwargs):
        logger.warning("a quantkit model is saved with quantkit.save(model, out), not save_pretrained")
        return False

    @property
    def is_trainable(self):
        return False


def _stored_tensors(files) -> dict:
    """name -> (shape, dtype) of every tensor in the safetensors `files`, from their headers (no tensor is read)."""
    import torch
    from safetensors import safe_open

    try:
        from safetensors.torch import _TYPES as names
    except ImportError:  # a safetensors without that table: the dtypes quantkit stores
        names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    stored = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            continue
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                stored[k] = (tuple(sl.get_shape()), names.get(sl.get_dtype(), sl.get_dtype()))
    return stored


def _tokenizer(path):
    """The checkpoint's tokenizer, as `quantkit.load` sets `model.quantkit_tokenizer` (local folders only)."""
    import os

    if not path or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return None


def _generate_with_kv4(self, *args, **kwargs):
    from quantkit.kvcache import CACHE_ARGUMENTS, KV4Cache, cache_argument

    if all(kwargs.get(k) is None for k in CACHE_ARGUMENTS) and kwargs.get("use_cache", True) is not False:
        kv = self.quantkit_kv_cache
        kwargs[cache_argument(self)] = KV4Cache(self.config, kv["group_size"], bool(kv.get("rotate", False)))
    return type(self).generate(self, *args, **kwargs)


def use_kv4_cache_in_generate(model, kv: dict) -> None:
    """`model.generate()` given no cache uses a fresh KV4Cache of the checkpoint's KV-cache scheme `kv` (a scheme
    this model cannot run, e.g. rotation with a head_dim not a power of two, fails there, as under
    `kv_cache_context`, not at loading)."""
    model.quantkit_kv_cache = kv
    model.generate = types.MethodType(_generate_with_kv4, model)


def register() -> None:
    """Register `quant_method: quantkit` in transformers' quantizer table (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QuantkitConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(QuantkitConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QuantkitHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)


def is_registered() -> bool:
    return AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is QuantkitHfQuantizer
