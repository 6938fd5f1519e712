"""Triton helpers shared by the int8-tensor-core kernels (`int8_gemm.py`, `int8_prefill.py`): the exact
int32 → fp32 trick's constants and the unpacking of 6-bit / 4-bit weight codes (layouts: `int8_reference.py`).

- `MAGIC`, `MAGIC_F`  bits and value of 1.5·2^23: bitcast_f32(I + MAGIC) − MAGIC_F = I exactly for |I| < 2^22
                      (an IADD + FADD instead of a slow I2F); (v + MAGIC_F) − MAGIC_F rounds half to even.
- `load_codes`        one 128-block of BLOCK_N weight rows → unsigned codes int8 [BLOCK_N, 128], K in order
                      (inline asm on packed 32-bit registers when compiled; the same masks per byte when
                      interpreted).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B400000)  # bits of 1.5·2^23
MAGIC_F = tl.constexpr(12582912.0)


# Weight unpack on packed bytes: every op below is bytewise-correct on a 32-bit word (the masks drop what a
# shift carries over from the neighbouring byte), so one instruction handles four codes and the bytes stay
# packed from the 128-bit load to the shared-memory store of the dot operand. In plain Triton each uint8 lane
# is unpacked to a register, shifted and re-packed (~4 instructions per weight instead of ~0.5).
_LO6_ASM: tl.constexpr = tl.constexpr("and.b32 $0, $1, 0x3F3F3F3F;")
_HI6_ASM: tl.constexpr = tl.constexpr(
    "{ .reg .b32 a, b, c; shr.b32 a, $1, 6; and.b32 a, a, 0x03030303; shr.b32 b, $2, 4; and.b32 b, b, 0x0C0C0C0C;"
    " shr.b32 c, $3, 2; and.b32 c, c, 0x30303030; or.b32 a, a, b; or.b32 $0, a, c; }")
_LO4_ASM: tl.constexpr = tl.constexpr("and.b32 $0, $1, 0x0F0F0F0F;")
_HI4_ASM: tl.constexpr = tl.constexpr("{ .reg .b32 a; shr.b32 a, $1, 4; and.b32 $0, a, 0x0F0F0F0F; }")


@triton.jit
def _bytes_op(src, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,r", [src], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _int6_planes(x0, x1, x2, USE_ASM: tl.constexpr):
    """Three [BLOCK_N, 32] uint8 tiles of the int6 layout → four int8 code tiles (k 0-31, 32-63, 64-95, 96-127)."""
    if USE_ASM:
        c0 = _bytes_op(x0, _LO6_ASM)
        c1 = _bytes_op(x1, _LO6_ASM)
        c2 = _bytes_op(x2, _LO6_ASM)
        c3 = tl.inline_asm_elementwise(_HI6_ASM, "=r,r,r,r", [x0, x1, x2], dtype=tl.int8, is_pure=True, pack=4)
    else:
        c0 = (x0 & 63).to(tl.int8)
        c1 = (x1 & 63).to(tl.int8)
        c2 = (x2 & 63).to(tl.int8)
        c3 = ((x0 >> 6) | ((x1 >> 4) & 12) | ((x2 >> 2) & 48)).to(tl.int8)
    return c0, c1, c2, c3


@triton.jit
def _int4_planes(x0, x1, USE_ASM: tl.constexpr):
    """Two [BLOCK_N, 32] uint8 tiles of the nibble-plane layout → four int8 code tiles."""
    if USE_ASM:
        return _bytes_op(x0, _LO4_ASM), _bytes_op(x1, _LO4_ASM), _bytes_op(x0, _HI4_ASM), _bytes_op(x1, _HI4_ASM)
    else:
        return (x0 & 15).to(tl.int8), (x1 & 15).to(tl.int8), (x0 >> 4).to(tl.int8), (x1 >> 4).to(tl.int8)


@triton.jit
def _stack4(c0, c1, c2, c3, BLOCK_N: tl.constexpr):
    """Four [BLOCK_N, 32] tiles → [BLOCK_N, 128], c0 first along K (join + permute + reshape: register moves;
    each thread keeps its K-contiguous runs, so the K-major shared-memory store of the dot operand is wide)."""
    c = tl.join(tl.join(c0, c1), tl.join(c2, c3))  # [BLOCK_N, 32, q, p]: element of c_(2p+q)
    return tl.reshape(tl.permute(c, (0, 3, 2, 1)), (BLOCK_N, 128))


@triton.jit
def load_codes(wb, nmask, WBITS: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
    """One 128-block of BLOCK_N weight rows (`wb`: [BLOCK_N, 32] byte pointers at the block's first byte of
    each row) → unsigned codes int8 [BLOCK_N, 128], K in natural order."""
    x0 = tl.load(wb, mask=nmask[:, None], other=0)  # [BLOCK_N, 32] uint8, K contiguous
    x1 = tl.load(wb + 32, mask=nmask[:, None], other=0)
    if WBITS == 6:
        x2 = tl.load(wb + 64, mask=nmask[:, None], other=0)
        c0, c1, c2, c3 = _int6_planes(x0, x1, x2, USE_ASM)
    else:
        c0, c1, c2, c3 = _int4_planes(x0, x1, USE_ASM)
    return _stack4(c0, c1, c2, c3, BLOCK_N)
