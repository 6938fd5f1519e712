"""Dynamic symmetric integer activation quantization: per token, per group of channels (FlexQ, COMET).

For x [..., K] and a group size G (groups run along K from column 0, the last one short when G does not
divide K — the weights' padding rule), each (token, group) gets

    scale = absmax / (2^(b-1) - 1)    (fp32; 1.0 where the group is all zeros)
    q     = clamp(round_half_even(x / scale), -(2^(b-1) - 1), 2^(b-1) - 1)      stored as int8

so 4-, 6- and 8-bit activations all ride int8 tensor cores. `bits` may be a per-group tensor (COMET's
mixed INT4/INT8 blocks). This module is the torch reference that the Triton kernels are tested against.
"""

from __future__ import annotations

import torch


def group_view(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """x [..., K] → zero-padded [..., groups, G] and the original K."""
    k = x.shape[-1]
    groups = -(-k // group_size)
    pad = groups * group_size - k
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], groups, group_size), k


def quantize_act_int(x: torch.Tensor, bits: int | torch.Tensor, group_size: int = 128
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float → (q int8 [..., K], scale fp32 [..., groups]).

    bits: an int, or an int tensor [groups] (one width per channel group, shared by all tokens).
    """
    xg, k = group_view(x.float(), group_size)
    if isinstance(bits, torch.Tensor):
        qmax = ((1 << (bits.to(torch.int64) - 1)) - 1).to(xg.device, torch.float32)
    else:
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be 2..8, got {bits}")
        qmax = torch.tensor(float((1 << (bits - 1)) - 1), device=xg.device)
    amax = xg.abs().amax(dim=-1)
    scale = amax / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xg / scale.unsqueeze(-1))
    q = torch.maximum(torch.minimum(q, qmax.unsqueeze(-1)), -qmax.unsqueeze(-1)) if qmax.dim() else \
        q.clamp(-qmax, qmax)
    q = q.to(torch.int8).reshape(*x.shape[:-1], -1)[..., :k]
    return q, scale


def dequantize_act_int(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """(q int8 [..., K], scale [..., groups]) → float32 [..., K]."""
    qg, k = group_view(q.float(), group_size)
    return (qg * scale.unsqueeze(-1)).reshape(*q.shape[:-1], -1)[..., :k]


def fake_quant_act_int(x: torch.Tensor, bits: int | torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Quantize-dequantize, in x's dtype: what the integer kernels compute, in float."""
    q, s = quantize_act_int(x, bits, group_size)
    return dequantize_act_int(q, s, group_size).to(x.dtype)
