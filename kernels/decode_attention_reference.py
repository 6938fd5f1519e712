"""Torch reference of `decode_attention.py` (pure torch, any device): single-token GQA attention."""

from __future__ import annotations

import torch


def decode_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """query [B, H, 1, D], key/value [B, Hkv, L, D], mask [B or 1, L] (bool: True attends; float: added to
    the scores) → [B, 1, H, D]. Scores in fp32, softmax in fp32, probabilities cast to value's dtype for the
    second product."""
    b, h, _, d = query.shape
    hk, n = key.shape[1], key.shape[2]
    q = query.reshape(b, hk, h // hk, d)
    s = torch.matmul(q, key.transpose(-1, -2)).float() * scale
    if mask is not None:
        m = mask[:, None, None, :n]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    p = torch.softmax(s, dim=-1).to(value.dtype)
    return torch.matmul(p, value).reshape(b, 1, h, d)
