"""Single-token attention for the latency benchmark: a GQA decode attention that reads each KV head once
(`gqa_decode_attention`, the Triton kernel `quantkit.kernels.decode_attention` on CUDA), registered with
transformers and installed on Llama-like full-attention models (`install_decode_attention`).
"""

from __future__ import annotations

import torch
from torch import nn

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
DECODE_ATTN = "quantkit_gqa_decode"


def gqa_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface. query [B, H, q, D], key/value [B, Hkv, L, D] → ([B, q, H, D], None).
    q == 1: scores of the query heads of each KV head against that head's keys (K and V read once, not
    repeated per query head), masked (boolean: True attends; float: added), softmax in fp32; on CUDA with a
    boolean mask one Triton kernel (`quantkit.kernels.decode_attention`), else its torch reference. q > 1:
    SDPA."""
    if query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, 0, 0, :]  # [B or 1, L]: one query row, heads broadcast
    if query.is_cuda:
        from quantkit.kernels import decode_attention as da

        if da.supports(query, key, value, mask):  # boolean masks only; additive ones take the torch path
            return torch.ops.quantkit.decode_attention(query, key, value, mask, scale), None
    from quantkit.kernels.decode_attention_reference import decode_attention_ref

    return decode_attention_ref(query, key, value, mask, scale), None


def _plain_causal(config) -> bool:
    if getattr(config, "model_type", None) not in LLAMA_LIKE:
        return False
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(config, "sliding_window", None) is None


def install_decode_attention(model: nn.Module) -> bool:
    """Use `gqa_decode_attention` (registered once with transformers) on Llama-like full-attention models."""
    if not _plain_causal(model.config):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTN, gqa_decode_attention)
    try:
        model.set_attn_implementation(DECODE_ATTN)
    except Exception:
        model.config._attn_implementation = DECODE_ATTN
    return model.config._attn_implementation == DECODE_ATTN
