"""Triton block decoders for llama.cpp's grid types: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M.

Each takes uint8 block pointers [R, G], a mask [R, G] and ``aux``, the type's grid from
``tables.lookup_table`` (one entry per grid row, its 8 or 4 levels packed as little-endian bytes in one
int64 or int32, so one gather fetches a row), and returns fp32 [R, G, 256] in natural order. See
``decode.py`` for the shared interface and ``glmtg/formats/gguf_iq.py`` for the formats in torch.

How the work is laid out, and why: a block's 256 values are 32 groups of 8 (the unit of the signs and of
the 8-wide grids; for the 4-wide IQ3 grids a group is two grid rows). Everything a group needs (its grid
row, its signs, its sub-block's scale, IQ1's delta) is computed once per group as an [R, G, 32] tensor;
the group's 8 values are then built as 8 such tensors (constant shifts of the grid row) and put together
with ``tl.join`` and one reshape. ``join`` stacks in registers, so a thread holds a group's 8 values and
every per-group quantity it needs: no layout conversion through shared memory, which the first version
(sub-block scales broadcast over their groups by reshapes, levels unpacked by a broadcast over a fourth
axis of 8) needed several of per step: compiled for sm_90 inside a GEMV step of 8 rows x 2 blocks, 150-190
registers and ~30 shared-memory stores per step, against 72-96 registers and only the GEMV's own 3 now.
A sub-block field is loaded once per group (the extra loads of the same bytes hit L1) instead of being
broadcast, and bytes are read through aligned 16-bit loads (``_u8``).

Bit-exactness with ``gguf.quants.dequantize``: each value is formed with gguf's fp32 operations in gguf's
order (``d * (0.5 + ls) * 0.25``, then times the level, then the sign; IQ1: ``dl * (level + delta)``). A
sign of -1 is applied as a negation, which is what multiplying by -1.0 does to every fp32 value. ggml's
``ksigns`` table (7 stored sign bits, the 8th making the count of minus signs even) is computed as parity
instead of read from memory. Masked blocks read all-zero bytes, so their scale is 0 and their values 0.

Blocks start at even addresses only (type sizes are even, not multiples of 4), so 16 bits is the widest
field load; a uint32 field is two of them.
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
    """The bytes at offsets ``offs`` (1-D) of every block, as int32 [R, G, len(offs)].

    Read as the aligned uint16 holding the byte: a run of consecutive offsets would otherwise make the
    compiler give the load a vectorised layout of its own and move every value computed from it to the
    layout of the group tensors through shared memory."""
    return (_u16(blk, mask, offs - offs % 2) >> (8 * (offs % 2))[None, None, :]) & 0xFF


@triton.jit
def _u16(blk, mask, offs):
    """The little-endian uint16 at even offsets ``offs`` (1-D) of every block, as int32 [R, G, len(offs)]."""
    p = (blk[:, :, None] + offs[None, None, :]).to(tl.pointer_type(tl.uint16))
    return tl.load(p, mask=mask[:, :, None], other=0).to(tl.int32)


@triton.jit
def _u32(blk, mask, offs):
    """The little-endian uint32 at even offsets ``offs`` (1-D) of every block: uint32 [R, G, len(offs)]."""
    lo = _u16(blk, mask, offs).to(tl.uint32)
    return lo | (_u16(blk, mask, offs + 2).to(tl.uint32) << 16)


@triton.jit
def _ksigns(idx):
    """ggml's ksigns[idx] for 7-bit ``idx``: idx with bit 7 set when idx has an odd number of set bits."""
    p = idx ^ (idx >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return idx | ((p & 1) << 7)


@triton.jit
def _row8(aux, idx):
    """Rows ``idx`` [R, G, 32] of an 8-wide grid: int64 [R, G, 32], level k in byte k."""
    return tl.load(aux.to(tl.pointer_type(tl.int64)) + idx)


@triton.jit
def _row4(aux, idx):
    """Rows ``idx`` of a 4-wide grid: int32, level k in byte k."""
    return tl.load(aux.to(tl.pointer_type(tl.int32)) + idx)


@triton.jit
def _sv(row, byte: tl.constexpr, scale, signs, bit: tl.constexpr):
    """scale * level ``byte`` of ``row`` (an unsigned byte), negated where bit ``bit`` of ``signs`` is set."""
    v = scale * (row >> (8 * byte)).to(tl.uint8).to(tl.float32)
    return tl.where(((signs >> bit) & 1) != 0, -v, v)


@triton.jit
def _dv(row, byte: tl.constexpr, dl, delta):
    """IQ1's dl * (level + delta), level ``byte`` of ``row`` a signed byte (-1, 0, 1)."""
    return dl * ((row >> (8 * byte)).to(tl.int8).to(tl.float32) + delta)


@triton.jit
def _join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight [R, G, 32] tensors, value k of each group -> [R, G, 256] (value k of group i at 8 i + k).

    Nested joins add trailing axes x, y, z (the outermost join last) and the reshape reads value 4x+2y+z,
    so the innermost joins pair values k and k + 4, the outermost the even and odd ones."""
    R: tl.constexpr = v0.shape[0]
    G: tl.constexpr = v0.shape[1]
    even = tl.join(tl.join(v0, v4), tl.join(v2, v6))
    odd = tl.join(tl.join(v1, v5), tl.join(v3, v7))
    return tl.reshape(tl.join(even, odd), (R, G, 256))


@triton.jit
def _signed8(row, scale, signs):
    """Groups of an 8-wide grid: scale * levels of ``row``, value k negated by bit k of ``signs``."""
    return _join8(_sv(row, 0, scale, signs, 0), _sv(row, 1, scale, signs, 1), _sv(row, 2, scale, signs, 2),
                  _sv(row, 3, scale, signs, 3), _sv(row, 4, scale, signs, 4), _sv(row, 5, scale, signs, 5),
                  _sv(row, 6, scale, signs, 6), _sv(row, 7, scale, signs, 7))


@triton.jit
def _signed4x2(ra, rb, scale, signs):
    """Groups of two 4-wide grid rows (values 0-3 from ``ra``, 4-7 from ``rb``), signed as ``_signed8``."""
    return _join8(_sv(ra, 0, scale, signs, 0), _sv(ra, 1, scale, signs, 1), _sv(ra, 2, scale, signs, 2),
                  _sv(ra, 3, scale, signs, 3), _sv(rb, 0, scale, signs, 4), _sv(rb, 1, scale, signs, 5),
                  _sv(rb, 2, scale, signs, 6), _sv(rb, 3, scale, signs, 7))


@triton.jit
def _delta8(row, dl, delta):
    """IQ1 groups: dl * (level k of ``row`` + delta) for k = 0..7."""
    return _join8(_dv(row, 0, dl, delta), _dv(row, 1, dl, delta), _dv(row, 2, dl, delta), _dv(row, 3, dl, delta),
                  _dv(row, 4, dl, delta), _dv(row, 5, dl, delta), _dv(row, 6, dl, delta), _dv(row, 7, dl, delta))


@triton.jit
def iq2_xxs(blk, mask, aux):
    """IQ2_XXS (66 bytes): fp16 d; per 32 values 8 bytes: 4 grid indices (one per 8 values), then a uint32
    with four 7-bit ksigns indices (bits 0, 7, 14, 21) and the 4-bit scale on top."""
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 32)  # group
    w = _u32(blk, mask, 6 + 8 * (i // 4))
    db = d[:, :, None] * (0.5 + (w >> 28).to(tl.float32)) * 0.25
    signs = _ksigns((w >> (7 * (i % 4)).to(tl.uint32)[None, None, :]) & 0x7F)
    idx = _u8(blk, mask, 2 + 8 * (i // 4) + i % 4)
    return _signed8(_row8(aux, idx), db, signs)


@triton.jit
def iq2_xs(blk, mask, aux):
    """IQ2_XS (74 bytes): fp16 d; per 8 values a uint16: 9-bit grid index, 7-bit ksigns index on top; 16
    4-bit scales, one per 16 values."""
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 32)
    q = _u16(blk, mask, 2 + 2 * i)
    sc = (_u8(blk, mask, 66 + i // 4) >> (4 * ((i // 2) % 2))[None, None, :]) & 0xF
    db = d[:, :, None] * (0.5 + sc.to(tl.float32)) * 0.25
    return _signed8(_row8(aux, q & 511), db, _ksigns(q >> 9))


@triton.jit
def iq2_s(blk, mask, aux):
    """IQ2_S (82 bytes): fp16 d; 32 low bytes of the 10-bit grid indices (one per 8 values); 32 sign bytes
    (bit k: value k of the group is negative); 8 bytes of the indices' top 2 bits; 16 4-bit scales."""
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 32)
    high = (_u8(blk, mask, 66 + i // 4) >> (2 * (i % 4))[None, None, :]) & 3
    idx = _u8(blk, mask, 2 + i) | (high << 8)
    sc = (_u8(blk, mask, 74 + i // 4) >> (4 * ((i // 2) % 2))[None, None, :]) & 0xF
    db = d[:, :, None] * (0.5 + sc.to(tl.float32)) * 0.25
    return _signed8(_row8(aux, idx), db, _u8(blk, mask, 34 + i))


@triton.jit
def iq3_xxs(blk, mask, aux):
    """IQ3_XXS (98 bytes): fp16 d; 64 grid indices (one per 4 values); per 32 values a uint32 as IQ2_XXS's
    (four ksigns indices, the scale on top), d * (0.5 + scale) * 0.5."""
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 32)
    w = _u32(blk, mask, 66 + 4 * (i // 4))
    db = d[:, :, None] * (0.5 + (w >> 28).to(tl.float32)) * 0.5
    signs = _ksigns((w >> (7 * (i % 4)).to(tl.uint32)[None, None, :]) & 0x7F)
    pair = _u16(blk, mask, 2 + 2 * i)  # the group's two grid indices
    return _signed4x2(_row4(aux, pair & 0xFF), _row4(aux, pair >> 8), db, signs)


@triton.jit
def iq3_s(blk, mask, aux):
    """IQ3_S (110 bytes): fp16 d; 64 low bytes of the 9-bit grid indices (one per 4 values); 8 bytes of
    their top bits; 32 sign bytes (one per 8 values); 8 4-bit scales, one per 32 values: d * (1 + 2 scale)."""
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 32)
    pair = _u16(blk, mask, 2 + 2 * i)
    high = _u8(blk, mask, 66 + i // 4) >> (2 * (i % 4))[None, None, :]  # bit 0: row a's, bit 1: row b's
    ia = (pair & 0xFF) | ((high & 1) << 8)
    ib = (pair >> 8) | ((high & 2) << 7)
    sc = (_u8(blk, mask, 106 + i // 8) >> (4 * ((i // 4) % 2))[None, None, :]) & 0xF
    db = d[:, :, None] * (1 + 2 * sc).to(tl.float32)
    return _signed4x2(_row4(aux, ia), _row4(aux, ib), db, _u8(blk, mask, 74 + i))


@triton.jit
def iq1_s(blk, mask, aux):
    """IQ1_S (50 bytes): fp16 d; 32 low bytes of the 11-bit grid indices (one per 8 values); per 32 values
    a uint16: four 3-bit index tops, a 3-bit scale (d * (2 scale + 1)), the sign of the +-1/8 delta on top."""
    d = _f16(blk, mask, 0)
    i = tl.arange(0, 32)
    h = _u16(blk, mask, 34 + 2 * (i // 4))
    dl = d[:, :, None] * (2 * ((h >> 12) & 7) + 1).to(tl.float32)
    delta = tl.where((h & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA)
    idx = _u8(blk, mask, 2 + i) | (((h >> (3 * (i % 4))[None, None, :]) & 7) << 8)
    return _delta8(_row8(aux, idx), dl, delta)


@triton.jit
def iq1_m(blk, mask, aux):
    """IQ1_M (56 bytes): 32 low bytes of the 11-bit grid indices (one per 8 values); per 8 values a nibble:
    3 index top bits, the delta's sign above; four uint16: in their low 12 bits four 3-bit scales each (one
    per 16 values, d * (2 scale + 1)), in their top nibbles the fp16 d, low nibble first."""
    w0 = _u16(blk, mask, 48 + tl.arange(0, 1))
    w1 = _u16(blk, mask, 50 + tl.arange(0, 1))
    w2 = _u16(blk, mask, 52 + tl.arange(0, 1))
    w3 = _u16(blk, mask, 54 + tl.arange(0, 1))
    d_bits = (w0 >> 12) | ((w1 >> 8) & 0xF0) | ((w2 >> 4) & 0xF00) | (w3 & 0xF000)  # [R, G, 1]
    d = d_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    i = tl.arange(0, 32)
    sub = (_u16(blk, mask, 48 + 2 * (i // 8)) >> (3 * ((i // 2) % 4))[None, None, :]) & 7
    dl = d * (2 * sub + 1).to(tl.float32)
    h = _u8(blk, mask, 32 + i // 2) >> (4 * (i % 2))[None, None, :]
    delta = tl.where((h & 8) == 0, IQ1_DELTA, -IQ1_DELTA)
    idx = _u8(blk, mask, i) | ((h & 7) << 8)
    return _delta8(_row8(aux, idx), dl, delta)
