"""The model-adapter contract: everything quantkit needs to know of an architecture's structure, in one place.

A `ModelAdapter` declares, for one family of Hugging Face decoder-only causal LMs:

- where the decoder stack and its layers live (`model.model`, `model.model.layers`), which modules of the
  stack run before layer 0 (embeddings, rotary) and which after the last layer (final norm, lm_head), and
  whether lm_head is tied to the embeddings;
- the Linears of one decoder layer by role (q/k/v, o, gate/up, down) and so its sub-blocks (Linears that
  read one input tensor), which of them can fuse at inference (q/k/v; gate/up), and which the checkpoint
  already stores fused (Phi-3's qkv_proj, gate_up_proj);
- the per-layer norms (q/k norms included) and the attention / KV layout read from the config (heads,
  KV heads, head_dim, each layer's attention type: full or sliding).

`adapter_for(model_or_config)` resolves it by the config's `model_type` from a registry (`register_adapter`),
falling back to the Llama-like default; for a model it also checks that the structure is there and raises a
one-line `QuantkitError` naming what is missing otherwise. Users of the contract: calibration capture
(`pipeline.capture_layer_inputs`, `models.decoder_layers`), streaming (`offload.quantize_streaming`: which
tensors go to the embeddings / head shards, what to materialize for the capture, the estimate), fusion
(`nn.fused.fuse_shared_input_linears`), the KV cache (`kvcache.head_dim_of`, `KV4Cache`) and checkpoint
loading (tied lm_head).

The pipeline still *discovers* a layer's sub-blocks by tracing a forward (every targeted Linear is found,
whatever its name); the declared `sub_blocks` say what that trace must find on a supported architecture
(tests/test_architectures.py holds them to it).

This module imports no transformers and no model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class AttentionLayout:
    """Attention / KV-cache geometry of a decoder, from its (text) config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]  # per decoder layer: "full_attention", "sliding_attention", ...
    sliding_window: int | None = None

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t != "full_attention")


@dataclass(frozen=True)
class ModelAdapter:
    """What quantkit needs of one architecture family. Module paths are dotted attribute names: `stack` and
    `lm_head` from the causal LM, `layers` / `embed_tokens` / `final_norm` under the stack, `attention` /
    `mlp` / `layer_norms` under a decoder layer, the projection names under `attention` / `mlp`."""

    name: str  # for messages
    model_types: tuple[str, ...] = ()  # the config `model_type`s it serves (empty: the generic default)
    stack: str = "model"
    layers: str = "layers"
    embed_tokens: str = "embed_tokens"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    # projections by role; a role the checkpoint stores as one fused Linear lists that one name
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    o: str = "o_proj"
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    down: str = "down_proj"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    qk_norms: tuple[str, ...] = ()  # under `attention` (Qwen3, Gemma 3)
    notes: str = field(default="", compare=False)

    # ----------------------------------------------------------------------------------------- names

    @property
    def layers_path(self) -> str:
        """Full module name of the decoder layers' ModuleList ("model.layers")."""
        return f"{self.stack}.{self.layers}"

    @property
    def embed_path(self) -> str:
        return f"{self.stack}.{self.embed_tokens}"

    @property
    def final_norm_path(self) -> str:
        return f"{self.stack}.{self.final_norm}"

    @property
    def lm_head_weight(self) -> str:
        """State-dict key of the output projection (absent from checkpoints of tied models)."""
        return f"{self.lm_head}.weight"

    @property
    def fusable_groups(self) -> tuple[tuple[str, ...], ...]:
        """Sibling projections that read one input and can run as one Linear at inference (names under
        their parent module): q/k/v and gate/up where the checkpoint keeps them apart."""
        return tuple(g for g in (self.qkv, self.gate_up) if len(g) > 1)

    @property
    def fused_in_checkpoint(self) -> tuple[str, ...]:
        """Projections the checkpoint already stores fused (one Linear for a role of several outputs)."""
        return tuple(g[0] for g in (self.qkv, self.gate_up) if len(g) == 1)

    @property
    def sub_blocks(self) -> tuple[tuple[str, ...], ...]:
        """A decoder layer's Linears (names under the layer) grouped by the input they read, in execution
        order: q/k/v, o, gate/up, down (what the pipeline's traced forward finds)."""
        a, m = self.attention, self.mlp
        return (tuple(f"{a}.{n}" for n in self.qkv), (f"{a}.{self.o}",),
                tuple(f"{m}.{n}" for n in self.gate_up), (f"{m}.{self.down}",))

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every Linear of a decoder layer, under the layer."""
        return tuple(n for b in self.sub_blocks for n in b)

    @property
    def norm_names(self) -> tuple[str, ...]:
        """Every norm of a decoder layer, under the layer (q/k norms included)."""
        return self.layer_norms + tuple(f"{self.attention}.{n}" for n in self.qk_norms)

    # --------------------------------------------------------------------------------------- modules

    def stack_module(self, model: nn.Module) -> nn.Module:
        return _get(model, self.stack)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers (a ModuleList: the pipeline swaps entries in and out)."""
        return _get(self.stack_module(model), self.layers)

    def before_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(full name, module) of what runs before layer 0: the stack's children other than the layers and
        the final norm (embeddings, rotary embedding, anything else the stack holds)."""
        stack = self.stack_module(model)
        return [(f"{self.stack}.{n}", m) for n, m in stack.named_children() if n not in (self.layers, self.final_norm)]

    def after_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(full name, module) of what runs after the last layer: the final norm, then lm_head."""
        out = []
        for path in (self.final_norm_path, self.lm_head):
            try:
                out.append((path, model.get_submodule(path)))
            except AttributeError:
                pass
        return out

    def embedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed_path)

    # ---------------------------------------------------------------------------------------- config

    @staticmethod
    def text_config(config):
        """The decoder's config (the text config of a composite model, else `config` itself)."""
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def tied(self, config) -> bool:
        """Whether lm_head shares the embedding matrix (stored once, as the embeddings)."""
        return bool(getattr(config, "tie_word_embeddings", False))

    def head_dim(self, config) -> int:
        cfg = self.text_config(config)
        hd = getattr(cfg, "head_dim", None)
        return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads

    def layer_types(self, config) -> tuple[str, ...]:
        """Each decoder layer's attention type, read from the config as transformers' caches read it."""
        cfg = self.text_config(config)
        try:
            from transformers.cache_utils import get_layer_types_and_kwargs
        except ImportError:  # older transformers 5.x (the helper is not in every release)
            types = getattr(cfg, "layer_types", None)
            if types is None:
                window = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
                types = ["sliding_attention" if window is not None else "full_attention"] * cfg.num_hidden_layers
            return tuple(types)
        return tuple(get_layer_types_and_kwargs(cfg)[0])

    def attention_layout(self, config) -> AttentionLayout:
        cfg = self.text_config(config)
        heads = int(cfg.num_attention_heads)
        return AttentionLayout(num_heads=heads, num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                               head_dim=self.head_dim(cfg), layer_types=self.layer_types(cfg),
                               sliding_window=getattr(cfg, "sliding_window", None))

    # ---------------------------------------------------------------------------------------- checks

    def missing(self, model: nn.Module) -> str | None:
        """What of the declared structure `model` lacks (a phrase), or None."""
        stack = _find(model, self.stack)
        if stack is None:
            return f"no decoder stack at model.{self.stack}"
        layers = _find(stack, self.layers)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return f"no decoder layers at model.{self.layers_path}"
        layer = layers[0]
        if not self.model_types:  # generic default: the pipeline finds the Linears itself, by tracing
            if not any(hasattr(m, "in_features") for m in layer.modules()):
                return f"decoder layer {type(layer).__name__} holds no nn.Linear"
            return None
        if _find(model, self.embed_path) is None:
            return f"no token embeddings at model.{self.embed_path}"
        for n in (*self.linear_names, *self.norm_names):
            if _find(layer, n) is None:
                return f"decoder layer {type(layer).__name__} has no '{n}'"
        return None


def _find(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if not isinstance(obj, nn.Module):
            return None
    return obj


def _get(root: nn.Module, path: str) -> nn.Module:
    m = _find(root, path)
    if m is None:
        raise QuantkitError(f"could not find '{path}' in {type(root).__name__}")
    return m


# ---------------------------------------------------------------------------------------------------------
# the registry

LLAMA = ModelAdapter(name="Llama-style", model_types=("llama", "mistral", "qwen2"),
                     notes="SmolLM, Llama 2/3, Mistral, Qwen2 (q/k/v biases)")
QWEN3 = replace(LLAMA, name="Qwen3", model_types=("qwen3",), qk_norms=("q_norm", "k_norm"))
GEMMA3 = replace(LLAMA, name="Gemma 3 (text)", model_types=("gemma3_text",),
                 layer_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                              "post_feedforward_layernorm"),
                 qk_norms=("q_norm", "k_norm"), notes="sliding-window layers, scaled embeddings")
GEMMA3_VLM = replace(GEMMA3, name="Gemma 3 (image-text: its language model)", model_types=("gemma3",),
                     stack="model.language_model",
                     notes="Gemma3ForConditionalGeneration: the decoder layers of its language model are quantized; "
                           "the vision tower and projector are kept as they are (text-only calibration)")
PHI3 = replace(LLAMA, name="Phi-3", model_types=("phi3",), qkv=("qkv_proj",), gate_up=("gate_up_proj",),
               notes="q/k/v and gate/up stored fused: quantized as one matrix each, nothing left to fuse")
GENERIC = replace(LLAMA, name="generic Llama-like", model_types=())

_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make `adapter` the one for its `model_types` (replacing any earlier one)."""
    if not adapter.model_types:
        raise ValueError("an adapter needs at least one model_type")
    for t in adapter.model_types:
        _REGISTRY[t] = adapter
    return adapter


for _a in (LLAMA, QWEN3, GEMMA3, GEMMA3_VLM, PHI3):
    register_adapter(_a)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def _config_of(obj):
    return getattr(obj, "config", None) if isinstance(obj, nn.Module) else obj


def _model_type(config) -> str | None:
    return getattr(config, "model_type", None) if config is not None else None


def adapter_for(model_or_config, check: bool = True) -> ModelAdapter:
    """The adapter of a model (or config): the registered one for its `model_type`, else the generic
    Llama-like default. For a model with `check`, a structure lacking what the adapter declares raises a
    one-line QuantkitError naming what is missing."""
    config = _config_of(model_or_config)
    mt = _model_type(config)
    adapter = _REGISTRY.get(mt, GENERIC) if mt else GENERIC
    if check and isinstance(model_or_config, nn.Module):
        what = adapter.missing(model_or_config)
        if what is not None:
            kind = f"model type '{mt}'" if mt else "model"
            raise QuantkitError(
                f"{kind} ({type(model_or_config).__name__}) is not supported: {what} (quantkit needs a "
                f"decoder-only causal LM laid out like Llama: embeddings, a ModuleList of decoder layers of "
                f"nn.Linear projections, final norm, lm_head; supported: {', '.join(supported_model_types())})")
    return adapter


__all__ = ["GENERIC", "AttentionLayout", "ModelAdapter", "adapter_for", "register_adapter",
           "supported_model_types"]
