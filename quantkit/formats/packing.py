"""Bit packing of integer codes along K.

Layout (shared by every integer-coded format): the K axis is cut into runs of 32 consecutive codes; each run
is one little-endian bit stream of 32·b bits stored in b int32 words, so code i of a run occupies stream bits
[i·b, i·b + b). When b divides 32 this is the familiar "32/b codes per word, lowest code in the lowest
bits"; for b = 3, 5, 6, 7 codes may straddle two words (b = 6 gives 4 codes per 3 bytes). The packed tensor
is `int32 [ceil(K/32)·b, N]`, N contiguous, so a GEMM tile that loads one packed row feeds N-contiguous
lanes. K is padded with zero codes to a multiple of 32.
"""

from __future__ import annotations

import functools

import torch

_WORD = 32


@functools.lru_cache(maxsize=64)
def _positions(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the 32 codes of a run: (index of the word holding the code's low bit, bit offset in that word)."""
    offs = torch.arange(_WORD, dtype=torch.int64) * bits
    return offs // _WORD, offs % _WORD


def packed_rows(k: int, bits: int) -> int:
    return -(-k // _WORD) * bits


# int64 temporaries per row block: ~8M codes (64 MiB each). Packing a whole 14336 x 4096 weight at once kept
# ~2.2 GiB of them alive, the largest item of a streamed layer's peak VRAM (experiments/offload_vram_profile.py).
_BLOCK_CODES = 1 << 23


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `codes: [N, K]` integers in [0, 2**bits) into `int32 [ceil(K/32)·bits, N]`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, k = codes.shape
    if n and k and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    runs = -(-k // _WORD)
    out = torch.empty(runs * bits, n, dtype=torch.int32, device=codes.device)
    step = max(1, _BLOCK_CODES // max(1, runs * _WORD))
    for i in range(0, n, step):
        out[:, i:i + step] = _pack_rows(codes[i:i + step], bits, runs)
    return out


def _pack_rows(codes: torch.Tensor, bits: int, runs: int) -> torch.Tensor:
    n, k = codes.shape
    c = torch.zeros(n, runs * _WORD, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes.to(torch.int64)
    c = c.view(n, runs, _WORD)
    word, shift = (t.to(codes.device) for t in _positions(bits))
    words = torch.zeros(n, runs, bits + 1, dtype=torch.int64, device=codes.device)
    low = (c << shift) & 0xFFFFFFFF
    high = c >> (_WORD - shift)  # bits that spill into the next word (0 when shift + bits <= 32)
    high = torch.where(shift > 0, high, torch.zeros_like(high))
    words.index_add_(2, word, low)  # bit ranges are disjoint, so add == or
    words.index_add_(2, word + 1, high)
    words = words[:, :, :bits].reshape(n, runs * bits)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).t()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_codes`: `int32 [ceil(K/32)·bits, N]` → `uint8 [N, k]`."""
    rows, n = packed.shape
    runs = rows // bits
    if rows != runs * bits or runs * _WORD < k:
        raise ValueError(f"packed tensor of {rows} rows does not hold K={k} codes of {bits} bits")
    w = packed.t().to(torch.int64) & 0xFFFFFFFF
    w = w.view(n, runs, bits)
    w = torch.cat([w, torch.zeros_like(w[:, :, :1])], dim=2)  # guard word for straddling codes
    word, shift = (t.to(packed.device) for t in _positions(bits))
    both = w[:, :, word] | (w[:, :, word + 1] << _WORD)
    codes = (both >> shift) & ((1 << bits) - 1)
    return codes.reshape(n, runs * _WORD)[:, :k].to(torch.uint8)
