"""KV4: a real 4-bit KV cache (COMET's KV4) and an evaluation path with the very same numerics.

Numerics (one definition, used by the cache and by evaluation alike):

- K and V are quantized after RoPE, exactly as the attention hands them to the cache, as tensors
  `[batch, kv_heads, tokens, head_dim]`. Each (batch, head, token) row of `head_dim` channels is cut into
  groups of `group` consecutive channels; each group gets asymmetric INT4:
  `zero = min(x)`, `scale = (max(x) - min(x)) / 15`, both rounded to float16 and stored;
  `code = clamp(round((x - zero) / scale), 0, 15)` computed in float32 with the *stored* (fp16) scale and
  zero, round half to even (`torch.round`); a group whose fp16 scale is 0 (constant, or a range below
  fp16's resolution) takes code 0. Dequantized: `x̂ = code · scale + zero` in float32, cast to the model dtype.
- Codes are packed two per byte along head_dim (`byte = c[2i] | c[2i+1] << 4`): packed `[..., head_dim/2]`
  uint8, scale and zero `[..., head_dim/group]` float16. Bytes per token per layer, K and V together:
  `2 · kv_heads · (head_dim/2 + 4 · head_dim/group)`; against bf16's `2 · kv_heads · 2 · head_dim` that is
  0.281× at group = head_dim = 64 (SmolLM2), 0.266× at 128/128, 0.281× at 128/64, 0.3125× at group 32.
- Why fp16 and not bf16 for scale/zero: same size, 3 more mantissa bits (zero is exact to 2^-11 of its
  magnitude); K/V magnitudes sit far below fp16's 65504 (values beyond it are clamped there).
- Group size: `DEFAULT_GROUP = 64` (the whole head_dim when it is not a multiple of 64), measured with
  `python -m quantkit.eval.kv4_report` (docs/methods/comet.md): 64 is the smallest group that stays within 0.3×
  of a bf16 cache with fp16 scale and zero (needs group >= 40). On SmolLM2 (PTB, 4 windows) KV4 costs
  +11.1 % perplexity at group 64, +5.7 % at 32 (0.3125×), +2.9 % at 16 (0.375×): pass `group=32` when
  quality matters more than the last 11 % of bytes.

Optional rotation (`rotate=True`, recipe `kv_cache.rotate: true`): each row is multiplied by the normalized
Hadamard matrix H (head_dim a power of two) before the groups are cut, and dequantized rows are multiplied by
H again (H·H = I) — both as a fast Walsh-Hadamard transform (`rotate_rows`), whose rounding, unlike a
BLAS `x @ H`, does not depend on how many tokens are rotated at once. It spreads K's outlier channels over the row; same bytes, still per-token statistics. On
SmolLM2 (4 windows, group 64) it takes KV4's cost from +11.1 % to +4.7 % perplexity (docs/methods/comet.md).

Why the cache and the full-window evaluation agree token for token: the scale and zero of a token depend
only on that token's own channels (per-token groups, never statistics across tokens), so a token's stored
K/V do not depend on whether it arrived in the prefill, in a decode step, or in a full-window forward; and
the cache quantizes the current token too (no full-precision "residual" window as in transformers'
QuantizedCache), so the query at position t attends to quantized K/V at every position ≤ t in both
paths. The evaluation path *is* the cache: a full-window forward with a fresh `KV4Cache` as
`past_key_values` quantizes all tokens in one `update` and attends to the dequantized result under the
causal mask. The only remaining difference is floating-point rounding of the projections themselves
(k_proj over one token vs. over the whole window), which can move a value across a rounding boundary.

Pre-RoPE K quantization is not done: the attention applies RoPE before `Cache.update`, which receives
neither positions nor cos/sin; storing pre-RoPE K would mean patching every attention class (or inverting
RoPE from positions the cache would have to guess, wrong under left padding). See docs/methods/comet.md.

Public API:
- `quantize_kv(t, group) -> (packed, scale, zero)`, `dequantize_kv(packed, scale, zero, group, dtype)`,
  `fake_quant_kv(t, group)` (== dequantize_kv(*quantize_kv(t, group)), bit for bit).
- `KV4Cache(model.config, group=None)`: a transformers `Cache` of `KV4Layer`s (a `DynamicLayer` subclass)
  for `model.generate(..., cache=KV4Cache(model.config))` (`past_key_values=` before transformers 5.25) or any forward; `memory_report()`.
- `kv4_enabled(model, group=None)`: context manager; every forward of `model` (and `model.generate`) that
  is given no cache runs with a fresh KV4Cache, so e.g. `quantkit.eval.perplexity` measures KV4.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

from quantkit.adapters import adapter_for
from quantkit.errors import QuantkitError

BITS = 4
QMAX = 2**BITS - 1
DEFAULT_GROUP = 64
_FP16_MAX = 65504.0
_PARAM_DTYPE = torch.float16


class KV4Error(QuantkitError, ValueError):
    """A bad KV4 setting (group size, head_dim, architecture); one line, also a ValueError."""


def _divisors(n: int) -> list[int]:
    return [g for g in range(2, n + 1) if n % g == 0]


def check_group(head_dim: int, group: int) -> int:
    """Return `group` if it is an integer >= 2 dividing `head_dim` (itself even), else raise KV4Error."""
    if head_dim % 2:
        raise KV4Error(f"KV4 packs two 4-bit codes per byte along head_dim, which must be even (got {head_dim})")
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or head_dim % group:
        raise KV4Error(f"KV4 group size {group!r} does not divide head_dim={head_dim}; "
                       f"use one of {', '.join(map(str, _divisors(head_dim)))}")
    return group


def default_group(head_dim: int) -> int:
    """`DEFAULT_GROUP` channels, or the whole head_dim when it is smaller (or not a multiple of 64)."""
    return DEFAULT_GROUP if head_dim % DEFAULT_GROUP == 0 else head_dim


def head_dim_of(config) -> int:
    """Attention head size of an HF (decoder) config, as its model adapter reads it: `head_dim`, else
    hidden_size / num_attention_heads (`quantkit.adapters.ModelAdapter.head_dim`)."""
    return adapter_for(config).head_dim(config)


# ---------------------------------------------------------------------------------------------------------
# numerics


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], `[..., D]` (D even) -> `[..., D/2]` uint8, `c[2i] | c[2i+1] << 4`."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`[..., D/2]` uint8 -> `[..., D]` uint8 codes (inverse of `pack_int4`)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


@functools.cache
def hadamard(d: int, device=None) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix [d, d] (float32; symmetric and orthogonal: H·H = I). Cached
    per (d, device): every cache update of every layer uses it; callers must not modify it."""
    if d < 1 or d & (d - 1):
        raise KV4Error(f"KV4 rotation needs a power-of-two head_dim, got {d}; set kv_cache.rotate: false")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d**0.5


def rotate_rows(x: torch.Tensor) -> torch.Tensor:
    """x · H along the last dim (H = `hadamard(d)`), as a fast Walsh-Hadamard transform: log2(d) stages of
    elementwise a + b / a − b, then one scale. Unlike `x @ H` (a BLAS matmul whose rounding depends on how many
    rows go in at once), every row's result is the same whatever the batch: generate() through the cache, one
    token at a time, and the evaluation path over a whole window must round identically."""
    d = x.shape[-1]
    hadamard(d)  # validates d
    h = 1
    while h < d:
        y = x.unflatten(-1, (d // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return x * d**-0.5


def quantize_kv(t: torch.Tensor, group: int, rotate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric INT4 per row, groups of `group` channels along the last dim.

    t: `[..., D]` float (any dtype; computed in float32). Returns packed `[..., D/2]` uint8, scale and zero
    `[..., D/group]` float16 (x̂ = code · scale + zero). rotate: quantize t·H (H = `hadamard(D)`) instead of
    t: an orthogonal mix of the channels, so a few outlier channels no longer set every token's range.
    """
    d = t.shape[-1]
    check_group(d, group)
    x = t.float()
    if rotate:
        x = rotate_rows(x)
    x = x.unflatten(-1, (d // group, group))
    lo, hi = x.amin(-1), x.amax(-1)
    scale = ((hi - lo) / QMAX).clamp(max=_FP16_MAX).to(_PARAM_DTYPE)
    zero = lo.clamp(-_FP16_MAX, _FP16_MAX).to(_PARAM_DTYPE)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # scale 0 (constant group): every code rounds to 0
    codes = torch.round((x - zero.float().unsqueeze(-1)) / s.unsqueeze(-1)).clamp_(0, QMAX)
    return pack_int4(codes.flatten(-2)), scale, zero


def dequantize_kv(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                  dtype: torch.dtype = torch.float32, rotate: bool = False) -> torch.Tensor:
    """`[..., D/2]` packed codes + `[..., D/group]` fp16 scale/zero -> `[..., D]` in `dtype` (float32 math;
    rotate: the stored values are t·H, rotated back by H, its own inverse)."""
    codes = unpack_int4(packed).float().unflatten(-1, (-1, group))
    x = (codes * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)
    if rotate:
        x = rotate_rows(x)
    return x.to(dtype)


def fake_quant_kv(t: torch.Tensor, group: int, rotate: bool = False) -> torch.Tensor:
    """`dequantize_kv(*quantize_kv(t, group), group, t.dtype)`: the values attention sees, same shape/dtype."""
    return dequantize_kv(*quantize_kv(t, group, rotate), group, t.dtype, rotate)


def kv4_bytes_per_token(kv_heads: int, head_dim: int, group: int) -> int:
    """Stored bytes per token per layer, K and V together (packed codes + fp16 scale and zero)."""
    return 2 * kv_heads * (head_dim // 2 + 2 * 2 * (head_dim // group))


# ---------------------------------------------------------------------------------------------------------
# the cache


class KV4Layer(DynamicLayer):
    """One layer's KV4 cache: packed 4-bit K/V + fp16 scale/zero for every token, appended per update.

    `update` quantizes the incoming K/V (current tokens included) and returns the dequantized K/V of all
    tokens in the model dtype; the full-precision `keys`/`values` of `DynamicLayer` stay empty.
    """

    is_compileable = False

    def __init__(self, group: int, rotate: bool = False):
        super().__init__()
        self.group = group
        self.rotate = rotate
        self.cumulative_length = 0
        self._k: tuple[torch.Tensor, ...] | None = None  # (packed, scale, zero), [B, H, T, ...]
        self._v: tuple[torch.Tensor, ...] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Defined here rather than inherited: which attributes DynamicLayer sets has changed across
        # transformers 5.x (5.25 no longer sets `dtype`), and this layer needs `dtype` and `device`.
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.tensor([], dtype=key_states.dtype, device=key_states.device)
        self.values = torch.tensor([], dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k = quantize_kv(key_states, self.group, self.rotate)
        v = quantize_kv(value_states, self.group, self.rotate)
        if self._k is None:
            self._k, self._v = k, v
        else:
            self._k = tuple(torch.cat((a, b), dim=-2) for a, b in zip(self._k, k, strict=True))
            self._v = tuple(torch.cat((a, b), dim=-2) for a, b in zip(self._v, v, strict=True))
        self.cumulative_length += key_states.shape[-2]
        return (dequantize_kv(*self._k, self.group, self.dtype, self.rotate),
                dequantize_kv(*self._v, self.group, self.dtype, self.rotate))

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def _map(self, fn) -> None:
        if self._k is not None:
            self._k = tuple(fn(t) for t in self._k)
            self._v = tuple(fn(t) for t in self._v)

    def reset(self) -> None:
        self._k = self._v = None
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many trailing tokens; positive (older transformers): keep that many."""
        n = self.cumulative_length
        keep = n + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, n)
        keep = max(keep, 0)
        if keep != n:
            self._map(lambda t: t[..., :keep, :])
            self.cumulative_length = keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def stored(self) -> dict[str, tuple[torch.Tensor, ...]] | None:
        """{'k': (packed, scale, zero), 'v': (...)} as stored, or None before the first update."""
        return None if self._k is None else {"k": self._k, "v": self._v}

    def nbytes(self) -> int:
        if self._k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))


def _layer_types(cfg) -> list[str]:
    """Each decoder layer's attention type (full / sliding), as the model adapter reads it from the config."""
    return list(adapter_for(cfg).layer_types(cfg))


class KV4Cache(Cache):
    """A transformers Cache holding K/V as packed INT4 + fp16 scale/zero (see the module docstring).

    `KV4Cache(model.config, group=None, rotate=False)`; `group` defaults to `default_group(head_dim)`;
    `rotate` stores K·H and V·H (Hadamard along head_dim, see `quantize_kv`). Only models whose layers are all
    full attention (Llama, Qwen2, Mistral without sliding window, ...) are supported.
    """

    def __init__(self, config, group: int | None = None, rotate: bool = False):
        layout = adapter_for(config).attention_layout(config)  # heads, KV heads, head_dim, layer types
        self.head_dim = layout.head_dim
        self.group = check_group(self.head_dim, default_group(self.head_dim) if group is None else group)
        layer_types = list(layout.layer_types)
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise KV4Error(f"KV4Cache supports full-attention layers only; this model also has {', '.join(other)}")
        self.kv_heads = layout.num_kv_heads
        self.rotate = bool(rotate)
        if self.rotate:
            hadamard(self.head_dim)  # validates head_dim
        super().__init__(layers=[KV4Layer(self.group, self.rotate) for _ in layer_types])

    def nbytes(self) -> int:
        """Bytes stored: packed codes + scales + zeros, all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def memory_report(self) -> dict:
        """Stored bytes vs what a bf16 DynamicCache would hold for the same tokens (JSON-ready)."""
        tokens = self.get_seq_length()
        batch = next((layer._k[0].shape[0] for layer in self.layers if layer._k is not None), 0)
        bf16 = sum(2 * 2 * batch * self.kv_heads * layer.get_seq_length() * self.head_dim for layer in self.layers)
        kv4 = self.nbytes()
        per_tok = batch * tokens
        return {
            "group": self.group, "rotate": self.rotate, "head_dim": self.head_dim, "kv_heads": self.kv_heads, "layers": len(self.layers),
            "batch": batch, "tokens": tokens, "kv4_bytes": kv4, "bf16_bytes": bf16,
            "kv4_bytes_per_token": kv4 / per_tok if per_tok else 0.0,
            "bf16_bytes_per_token": bf16 / per_tok if per_tok else 0.0,
            "ratio": kv4 / bf16 if bf16 else 0.0,
        }


# ---------------------------------------------------------------------------------------------------------
# evaluation path


# How a model's forward takes its KV cache: `cache` from transformers 5.25 on, `past_key_values` before.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model) -> str:
    """The name under which `model.forward` (and `generate`) take a KV cache in this transformers version."""
    params = inspect.signature(model.forward).parameters
    return next((k for k in CACHE_ARGUMENTS if k in params), "past_key_values")


@contextlib.contextmanager
def kv4_enabled(model, group: int | None = None, rotate: bool = False) -> Iterator[None]:
    """Inside the block every forward of `model` given no cache runs with a fresh `KV4Cache`.

    A full-window forward (`model(x, use_cache=False)`, as `quantkit.eval.perplexity` does) then quantizes
    every token's K/V exactly as the cache stores them and attends to the dequantized values (the output
    carries that KV4Cache, a few MB at 2048 tokens). `model.generate` without
    `past_key_values` gets a KV4Cache too. A forward handed another Cache type raises KV4Error. `model` is
    the top-level causal LM (calls into `model.model` or single layers bypass the hook).
    """
    group = check_group(head_dim_of(model.config),
                        default_group(head_dim_of(model.config)) if group is None else group)
    KV4Cache(model.config, group, rotate)  # validates the architecture before anything is patched
    sig = inspect.signature(model.forward)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    name = cache_argument(model)

    def given_cache(kwargs: dict):
        """The cache a call passes under either name (older callers still say past_key_values)."""
        found = [kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None]
        return found[0] if found else None

    def pre_hook(module, args, kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        extra = dict(bound.arguments.pop(var_kw, {})) if var_kw else {}
        cache = given_cache(bound.arguments) or given_cache(extra)
        if cache is None:
            cache = KV4Cache(model.config, group, rotate)
        elif not isinstance(cache, KV4Cache):
            raise KV4Error(f"kv4_enabled: the forward was given a {type(cache).__name__}; "
                           f"pass {name}=KV4Cache(...) or none")
        for k in CACHE_ARGUMENTS:
            bound.arguments.pop(k, None)
            extra.pop(k, None)
        return (), {**bound.arguments, **extra, name: cache}

    orig_generate = model.generate

    def generate(*args, **kwargs):
        if all(kwargs.get(k) is None for k in CACHE_ARGUMENTS):
            kwargs[name] = KV4Cache(model.config, group, rotate)
        return orig_generate(*args, **kwargs)

    hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    had_generate = "generate" in model.__dict__
    model.generate = generate
    try:
        yield
    finally:
        hook.remove()
        if had_generate:
            model.generate = orig_generate
        else:
            del model.generate
