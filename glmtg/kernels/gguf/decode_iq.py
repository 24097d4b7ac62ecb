"""Triton block decoders for llama.cpp's grid types: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M.

Each takes uint8 block pointers [R, G], a mask [R, G] and ``aux``, the type's grid from
``tables.lookup_table`` (one entry per grid row, its 8 or 4 levels packed as little-endian bytes in one
int64 or int32, so a single gather fetches a whole group), and returns fp32 [R, G, 256] in natural order.
See ``decode.py`` for the shared interface; ``glmtg/formats/gguf_iq.py`` for the formats in torch.

Layout of the work: a block's 256 values are 32 groups of 8 (the sign and grid unit of most types; the
4-wide IQ3 grids are gathered as 64 groups of 4 and reshaped to 32 x 8). Per-sub-block quantities (fp16
scale times the sub-scale, IQ1's delta) are decoded once per sub-block and repeated over its groups by a
broadcast and a reshape, and every per-value step is a shift, a mask and one multiply.

Bit-exactness with ``gguf.quants.dequantize``: each value is formed with gguf's fp32 operations in gguf's
order (``d * (0.5 + ls) * 0.25``, then times the level, then the sign; IQ1: ``dl * (level + delta)``). A
sign of -1 is applied as a negation, which is what multiplying by -1.0 does to every fp32 value. ggml's
``ksigns`` table (7 stored sign bits, the 8th making the count of minus signs even) is computed as parity
instead of read from memory. Masked blocks read all-zero bytes, so their scale is 0 and their values 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ggml's IQ1S_DELTA: IQ1_S / IQ1_M add +-1/8 to every grid level (exact in fp32).
IQ1_DELTA: tl.constexpr = tl.constexpr(0.125)


@triton.jit
def _f16(blk, mask, off: tl.constexpr):
    """The fp16 at byte ``off`` (even) of every block, widened to fp32 [R, G] (exactly); 0 where masked."""
    return tl.load((blk + off).to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _u8(blk, mask, offs):
    """The bytes at offsets ``offs`` (1-D) of every block: uint8 [R, G, len(offs)]."""
    return tl.load(blk[:, :, None] + offs[None, None, :], mask=mask[:, :, None], other=0)


@triton.jit
def _u16(blk, mask, offs):
    """The little-endian uint16 at even offsets ``offs`` of every block, as uint32 [R, G, len(offs)].

    Blocks start at even addresses only (type sizes are even, not multiples of 4), so 16 bits is the
    widest aligned load; a uint32 field is two of these."""
    p = (blk[:, :, None] + offs[None, None, :]).to(tl.pointer_type(tl.uint16))
    return tl.load(p, mask=mask[:, :, None], other=0).to(tl.uint32)


@triton.jit
def _u32(blk, mask, offs):
    """The little-endian uint32 at offsets ``offs`` (even) of every block: uint32 [R, G, len(offs)]."""
    return _u16(blk, mask, offs) | (_u16(blk, mask, offs + 2) << 16)


@triton.jit
def _repeat(x, N: tl.constexpr):
    """[R, G, S] -> [R, G, S * N], each element repeated N times in place (a sub-block's value over its
    groups)."""
    R: tl.constexpr = x.shape[0]
    G: tl.constexpr = x.shape[1]
    S: tl.constexpr = x.shape[2]
    return tl.reshape(tl.broadcast_to(x[:, :, :, None], (R, G, S, N)), (R, G, S * N))


@triton.jit
def _ksigns(idx):
    """ggml's ksigns[idx] for 7-bit ``idx``: idx with bit 7 set when idx has an odd number of set bits."""
    p = idx ^ (idx >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return idx | ((p & 1) << 7)


@triton.jit
def _levels8(aux, idx, SIGNED: tl.constexpr):
    """Grid rows ``idx`` [R, G, 32] of an 8-wide grid (int64 entries, 8 packed levels) -> fp32 [R, G, 32, 8]."""
    row = tl.load(aux.to(tl.pointer_type(tl.int64)) + idx.to(tl.int32))
    k = tl.arange(0, 8)
    byte = ((row[:, :, :, None] >> (8 * k).to(tl.int64)[None, None, None, :]) & 0xFF).to(tl.int32)
    if SIGNED:  # IQ1 levels -1, 0, 1 are stored as int8
        byte = byte - ((byte & 0x80) << 1)
    return byte.to(tl.float32)


@triton.jit
def _levels4(aux, idx):
    """Grid rows ``idx`` [R, G, 64] of a 4-wide grid (int32 entries) -> fp32 [R, G, 32, 8] (two rows per
    group of 8)."""
    R: tl.constexpr = idx.shape[0]
    G: tl.constexpr = idx.shape[1]
    row = tl.load(aux.to(tl.pointer_type(tl.int32)) + idx.to(tl.int32))
    k = tl.arange(0, 4)
    byte = (row[:, :, :, None] >> (8 * k)[None, None, None, :]) & 0xFF
    return tl.reshape(byte.to(tl.float32), (R, G, 32, 8))


@triton.jit
def _signed(scale, levels, signs):
    """scale [R, G, 32] * levels [R, G, 32, 8], negated where bit k of signs [R, G, 32] is set -> [R, G, 256]."""
    R: tl.constexpr = levels.shape[0]
    G: tl.constexpr = levels.shape[1]
    k = tl.arange(0, 8)
    v = scale[:, :, :, None] * levels
    neg = ((signs.to(tl.int32)[:, :, :, None] >> k[None, None, None, :]) & 1) != 0
    return tl.reshape(tl.where(neg, -v, v), (R, G, 256))


@triton.jit
def iq2_xxs(blk, mask, aux):
    # fp16 d; per 32 values 8 bytes: 4 grid indices (one per 8 values), then a uint32 holding four 7-bit
    # ksigns indices (bits 0, 7, 14, 21) and the 4-bit scale on top.
    d = _f16(blk, mask, 0)
    s = tl.arange(0, 8)
    w = _u32(blk, mask, 6 + 8 * s)  # [R, G, 8]
    db = d[:, :, None] * (0.5 + (w >> 28).to(tl.float32)) * 0.25
    i = tl.arange(0, 32)
    idx = _u8(blk, mask, 2 + 8 * (i // 4) + i % 4)
    signs = _ksigns((_repeat(w, 4) >> (7 * (i % 4)).to(tl.uint32)[None, None, :]) & 0x7F)
    return _signed(_repeat(db, 4), _levels8(aux, idx, False), signs)


@triton.jit
def iq3_xxs(blk, mask, aux):
    # fp16 d; 64 grid indices (one per 4 values); per 32 values a uint32 as IQ2_XXS's (scale, 4 ksigns).
    d = _f16(blk, mask, 0)
    s = tl.arange(0, 8)
    w = _u32(blk, mask, 66 + 4 * s)
    db = d[:, :, None] * (0.5 + (w >> 28).to(tl.float32)) * 0.5
    idx = _u8(blk, mask, 2 + tl.arange(0, 64))
    i = tl.arange(0, 32)
    signs = _ksigns((_repeat(w, 4) >> (7 * (i % 4)).to(tl.uint32)[None, None, :]) & 0x7F)
    return _signed(_repeat(db, 4), _levels4(aux, idx), signs)


@triton.jit
def _nibbles(blk, mask, start: tl.constexpr, N: tl.constexpr):
    """The N 4-bit fields of bytes [start, start + N / 2) of every block, low nibble first: int32 [R, G, N]."""
    j = tl.arange(0, N)
    return ((_u8(blk, mask, start + j // 2) >> (4 * (j % 2)).to(tl.uint8)[None, None, :]) & 0xF).to(tl.int32)


@triton.jit
def iq2_xs(blk, mask, aux):
    # fp16 d; per 8 values a uint16: 9-bit grid index, 7-bit ksigns index on top; 16 4-bit scales, one per
    # 16 values.
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 32)
    q = _u16(blk, mask, 2 + 2 * i)
    db = d[:, :, None] * (0.5 + _nibbles(blk, mask, 66, 16).to(tl.float32)) * 0.25
    return _signed(_repeat(db, 2), _levels8(aux, q & 511, False), _ksigns(q >> 9))


@triton.jit
def iq2_s(blk, mask, aux):
    # fp16 d; 32 low bytes of the 10-bit grid indices (one per 8 values); 32 sign bytes (bit k: value k of
    # the group is negative); 8 bytes of the indices' top 2 bits (4 per byte); 16 4-bit scales.
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 32)
    high = (_u8(blk, mask, 66 + i // 4) >> (2 * (i % 4)).to(tl.uint8)[None, None, :]) & 3
    idx = _u8(blk, mask, 2 + i).to(tl.int32) | (high.to(tl.int32) << 8)
    db = d[:, :, None] * (0.5 + _nibbles(blk, mask, 74, 16).to(tl.float32)) * 0.25
    return _signed(_repeat(db, 2), _levels8(aux, idx, False), _u8(blk, mask, 34 + i))


@triton.jit
def iq3_s(blk, mask, aux):
    # fp16 d; 64 low bytes of the 9-bit grid indices (one per 4 values); 8 bytes of their top bits; 32 sign
    # bytes (one per 8 values); 8 4-bit scales, one per 32 values: d * (1 + 2 scale).
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 64)
    high = (_u8(blk, mask, 66 + i // 8) >> (i % 8).to(tl.uint8)[None, None, :]) & 1
    idx = _u8(blk, mask, 2 + i).to(tl.int32) | (high.to(tl.int32) << 8)
    db = d[:, :, None] * (1 + 2 * _nibbles(blk, mask, 106, 8)).to(tl.float32)
    return _signed(_repeat(db, 4), _levels4(aux, idx), _u8(blk, mask, 74 + tl.arange(0, 32)))


@triton.jit
def _iq1(dl, delta, levels):
    """dl [R, G, 32] * (levels [R, G, 32, 8] + delta [R, G, 32]) -> [R, G, 256]."""
    R: tl.constexpr = levels.shape[0]
    G: tl.constexpr = levels.shape[1]
    return tl.reshape(dl[:, :, :, None] * (levels + delta[:, :, :, None]), (R, G, 256))


@triton.jit
def iq1_s(blk, mask, aux):
    # fp16 d; 32 low bytes of the 11-bit grid indices (one per 8 values); per 32 values a uint16: four
    # 3-bit index tops, a 3-bit scale (d * (2 scale + 1)), the sign of the +-1/8 delta on top.
    d = _f16(blk, mask, 0)
    h = _u16(blk, mask, 34 + 2 * tl.arange(0, 8))
    dl = d[:, :, None] * (2 * ((h >> 12) & 7) + 1).to(tl.float32)
    delta = tl.where((h & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA)
    i = tl.arange(0, 32)
    high = (_repeat(h, 4) >> (3 * (i % 4)).to(tl.uint32)[None, None, :]) & 7
    idx = _u8(blk, mask, 2 + i).to(tl.int32) | (high.to(tl.int32) << 8)
    return _iq1(_repeat(dl, 4), _repeat(delta, 4), _levels8(aux, idx, True))


@triton.jit
def iq1_m(blk, mask, aux):
    # 32 low bytes of the 11-bit grid indices (one per 8 values); per 8 values a nibble: 3 index top bits,
    # the delta's sign above; four uint16: in their low 12 bits four 3-bit scales each (one per 16 values,
    # d * (2 scale + 1)), in their top nibbles the fp16 d, low nibble first.
    w = _u16(blk, mask, 48 + 2 * tl.arange(0, 4))  # [R, G, 4]
    d_bits = tl.sum((w >> 12) << (4 * tl.arange(0, 4)).to(tl.uint32)[None, None, :], axis=2)  # disjoint: sum = or
    d = d_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    m = tl.arange(0, 16)
    sub = (_repeat(w, 4) >> (3 * (m % 4)).to(tl.uint32)[None, None, :]) & 7
    dl = d[:, :, None] * (2 * sub + 1).to(tl.float32)
    i = tl.arange(0, 32)
    h = _nibbles(blk, mask, 32, 32)
    delta = tl.where((h & 8) == 0, IQ1_DELTA, -IQ1_DELTA)
    idx = _u8(blk, mask, i).to(tl.int32) | ((h & 7) << 8)
    return _iq1(_repeat(dl, 2), delta, _levels8(aux, idx, True))
