"""Single-token (decode) GQA attention in one Triton kernel, beside its torch reference.

A decode step's attention per layer was three kernels (two batched cuBLAS matmuls with M = 4 query heads per
KV head, and a softmax): ~8 µs per layer on an H200 for 2.6 MB of K/V at 640 positions
(experiments/bench_history/latency_notes.md). Here a program per (batch row, KV head, slice of positions) reads that head's
keys and values once, scores its G query heads (padded to 16 rows for `tl.dot`) and keeps an online softmax
(running max and sum, fp32) over blocks of 64 positions; with several slices (flash-decoding: about two
programs per SM) a second small kernel merges the slices' partial results. Torch reference:
`decode_attention_reference.py`.

Mask: boolean, True attends ([B or 1, L] after squeezing the head and query dims), as the latency harness
passes for a static cache; positions past the mask's length are not read. Numerics differ from the reference
only in fp32 summation order and in p being rescaled by the running max before its bf16 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.decode_attention_reference import decode_attention_ref  # re-exported


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ws_ptr, L, HK, scale, CHUNK,
                        s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_mb, s_ob, s_oh,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                        SPLITS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Grid (B·HK, SPLITS): program (row·KV head, split) covers positions [split·CHUNK, +CHUNK). One split:
    the normalized output; several: the split's running max, sum and unnormalized output, fp32, to `ws`
    ([B·HK, SPLITS, G, D + 2]) for `_combine_kernel`."""
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    b = pid // HK
    hk = pid % HK
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gm = offs_g < G
    q = tl.load(q_ptr + b * s_qb + (hk * G + offs_g)[:, None] * s_qh + offs_d[None, :], mask=gm[:, None], other=0)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    kbase = k_ptr + b * s_kb + hk * s_kh
    vbase = v_ptr + b * s_vb + hk * s_vh
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for start in range(lo, hi, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        ok = offs_l < hi
        if HAS_MASK:
            ok = ok & (tl.load(m_ptr + b * s_mb + offs_l, mask=ok, other=0) != 0)
        k = tl.load(kbase + offs_l[:, None] * s_kl + offs_d[None, :], mask=ok[:, None], other=0)
        s = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK_L] fp32
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = tl.load(vbase + offs_l[:, None] * s_vl + offs_d[None, :], mask=ok[:, None], other=0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * s_ob + (hk * G + offs_g)[:, None] * s_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        row = ws_ptr + ((pid * SPLITS + sp) * G + offs_g) * (D + 2)
        tl.store(row[:, None] + offs_d[None, :], acc, mask=gm[:, None])
        tl.store(row + D, m_i, mask=gm)
        tl.store(row + D + 1, l_i, mask=gm)


@triton.jit
def _combine_kernel(ws_ptr, o_ptr, HK, s_ob, s_oh, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                    SP: tl.constexpr):
    """Grid (B·HK, G): merge the splits of one query head (max-rescaled sums), normalize, store."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = pid // HK
    hk = pid % HK
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    sm = offs_s < SPLITS
    row = ws_ptr + ((pid * SPLITS + offs_s) * G + g) * (D + 2)
    m = tl.load(row + D, mask=sm, other=float("-inf"))
    ls = tl.load(row + D + 1, mask=sm, other=0.0)
    acc = tl.load(row[:, None] + offs_d[None, :], mask=sm[:, None], other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))  # splits with nothing to attend to weigh 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(ls * w, axis=0)
    tl.store(o_ptr + b * s_ob + (hk * G + g) * s_oh + offs_d, out.to(o_ptr.dtype.element_ty))


BLOCK_L = 64


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests cover the combine
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """What the kernel reads: one query token, ≤ 16 query heads per KV head, a power-of-two head_dim, 16-bit
    tensors with contiguous last dims, a boolean mask (or none)."""
    _, h, q_len, d = query.shape
    hk = key.shape[1]
    return (q_len == 1 and h % hk == 0 and h // hk <= 16 and d in (16, 32, 64, 128, 256)
            and query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
            and query.dtype in (torch.float16, torch.bfloat16) and key.dtype == value.dtype == query.dtype
            and (mask is None or mask.dtype == torch.bool))


@torch.library.custom_op("quantkit::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """As `decode_attention_ref` (which states the shapes), in one kernel launch. One opaque op, so
    torch.compile keeps it whole (and CUDA graphs capture it as one node)."""
    b, h, _, d = query.shape
    hk, n = key.shape[1], key.shape[2]
    g = h // hk
    out = torch.empty(b, 1, h, d, dtype=query.dtype, device=query.device)
    if mask is not None:
        mask = mask[:, :n]
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        s_mb = mask.stride(0) if mask.shape[0] > 1 else 0
    else:
        s_mb = 0
    # Split the positions (flash-decoding) until there are about two programs per SM: a program's blocks
    # form a dependent chain (load, dot, softmax, dot), so fewer, longer programs are latency-bound.
    blocks = triton.cdiv(n, BLOCK_L)
    splits = max(1, min(blocks, triton.cdiv(2 * _sms(query.device), b * hk)))
    chunk = triton.cdiv(blocks, splits) * BLOCK_L
    splits = triton.cdiv(n, chunk)
    # the splits' partials ([B·HK, SPLITS, G, D + 2] fp32); one split writes the output directly
    ws = torch.empty(b * hk * splits * g * (d + 2), dtype=torch.float32, device=query.device) if splits > 1 else out
    _decode_attn_kernel[(b * hk, splits)](
        query, key, value, mask if mask is not None else query, out, ws, n, hk, scale, chunk,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), s_mb, out.stride(0), out.stride(2),
        G=g, GP=16, D=d, BLOCK_L=BLOCK_L, SPLITS=splits, HAS_MASK=mask is not None, num_warps=4)
    if splits > 1:
        _combine_kernel[(b * hk, g)](ws, out, hk, out.stride(0), out.stride(2), G=g, D=d, SPLITS=splits,
                                     SP=triton.next_power_of_2(splits), num_warps=1)
    return out


@decode_attention.register_fake
def _decode_attention_fake(query, key, value, mask, scale):
    b, h, _, d = query.shape
    return query.new_empty(b, 1, h, d)


__all__ = ["decode_attention", "decode_attention_ref", "supports"]
