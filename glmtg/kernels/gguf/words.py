"""Per-type integer dot products of GGUF weight blocks with int8 activation codes, inside a Triton kernel
(the MMVQ path of llama.cpp, written for Triton): the weight codes are packed four to an int32 word with
word-wide bit operations and multiplied with four activation codes at a time by dp4a.

Interface shared by every type (``block_dot`` dispatches on FMT):

    block_dot(blk, bm, xp, dxp, sp, xm, FMT) -> fp32 [BT, B]

- ``blk``: uint8 pointers [B] to B weight blocks (a flat axis: every tensor of a step then has one
  layout, and a thread works on whole blocks, so no data moves between threads), ``bm`` bool [B]
  (False: not read, adds 0);
- ``xp``: int32 pointers [BT, B] to the first activation word (4 int8 codes, 8-byte aligned) of each
  block's values for token t; ``dxp`` fp32 / ``sp`` int32 pointers [BT, B] to that block's first
  32-value group's scale dx and code sum Σxq (groups of one block follow each other); ``xm`` bool
  [BT, B] masks the activation loads;
- result: each block's contribution Σ_j w_j · dx · xq_j to y[t, r] (fp32), w the dequantized weights.

A block's (sub-block's) scales are applied once to an exact int32 Σ q·xq; the integer offsets of the
codes (q4_0's q - 8, ...) go through the group code sums Σxq: Σ (q - 8)·xq = Σ q·xq - 8·Σxq.

Alignment: blocks of 18 / 22 / 34 bytes are only 2-byte aligned, so their code words are assembled from
16-bit loads; Q4_K's 144-byte blocks are 4-byte aligned, their code words loaded whole.
"""

from __future__ import annotations

import triton
import triton.language as tl

from glmtg.kernels.gguf import words_k
from glmtg.kernels.gguf.decode import _f16_at
from glmtg.kernels.gguf.words_common import _dp4a, _u16_words, _x2, iq4_levels


@triton.jit
def _dot8(a0, a1, a2, a3, a4, a5, a6, a7, xp, xm):
    """Σ over the block's 8 activation words of dp4a(a_i, x word i): int32 [BT, B] (a_i [1, B])."""
    x0, x1 = _x2(xp, xm, 0)
    x2, x3 = _x2(xp, xm, 1)
    x4, x5 = _x2(xp, xm, 2)
    x6, x7 = _x2(xp, xm, 3)
    dot = _dp4a(a0, x0, 0)
    dot = _dp4a(a1, x1, dot)
    dot = _dp4a(a2, x2, dot)
    dot = _dp4a(a3, x3, dot)
    dot = _dp4a(a4, x4, dot)
    dot = _dp4a(a5, x5, dot)
    dot = _dp4a(a6, x6, dot)
    return _dp4a(a7, x7, dot)


@triton.jit
def _words16(blk, bm, off: tl.constexpr, ALIGN4: tl.constexpr):
    """The 4 code words (16 bytes) at byte ``off`` of every block, [1, B]: 32-bit loads if the area is
    4-byte aligned (ALIGN4), else two 16-bit loads a word."""
    if ALIGN4:
        p = (blk + off).to(tl.pointer_type(tl.int32))
        w0 = tl.load(p, mask=bm, other=0)
        w1 = tl.load(p + 1, mask=bm, other=0)
        w2 = tl.load(p + 2, mask=bm, other=0)
        w3 = tl.load(p + 3, mask=bm, other=0)
    else:
        w0 = _u16_words(blk + off, bm)
        w1 = _u16_words(blk + off + 4, bm)
        w2 = _u16_words(blk + off + 8, bm)
        w3 = _u16_words(blk + off + 12, bm)
    return w0[None, :], w1[None, :], w2[None, :], w3[None, :]


@triton.jit
def _nibble_dot(w0, w1, w2, w3, xp, xm):
    """Σ q·xq of a block of 32 four-bit codes (value j < 16 the low nibble of byte j, j + 16 its high
    nibble), the 16 bytes as words w0..w3: low nibbles pair with activation words 0-3, high with 4-7."""
    m = 0x0F0F0F0F
    return _dot8(w0 & m, w1 & m, w2 & m, w3 & m, (w0 >> 4) & m, (w1 >> 4) & m, (w2 >> 4) & m, (w3 >> 4) & m,
                 xp, xm)


@triton.jit
def _q8_0(blk, bm, xp, dxp, sp, xm):
    # fp16 d, int8 q[32] (34-byte blocks: 16-bit loads): d · dx · Σ q·xq
    a0, a1, a2, a3 = _words16(blk, bm, 2, False)
    a4, a5, a6, a7 = _words16(blk, bm, 18, False)
    dot = _dot8(a0, a1, a2, a3, a4, a5, a6, a7, xp, xm)
    d = _f16_at(blk, bm)[None, :]
    return d * tl.load(dxp, mask=xm, other=0.0) * dot.to(tl.float32)


@triton.jit
def _q4_0(blk, bm, xp, dxp, sp, xm):
    # fp16 d, qs[16] (18-byte blocks): d · dx · (Σ q·xq - 8 Σxq)
    w0, w1, w2, w3 = _words16(blk, bm, 2, False)
    dot = _nibble_dot(w0, w1, w2, w3, xp, xm)
    d = _f16_at(blk, bm)[None, :]
    sx = tl.load(sp, mask=xm, other=0)
    return d * tl.load(dxp, mask=xm, other=0.0) * (dot - 8 * sx).to(tl.float32)


@triton.jit
def _q4_1(blk, bm, xp, dxp, sp, xm):
    # fp16 d, fp16 m, qs[16] (20-byte blocks, 4-byte aligned): Σ (d q + m)·dx·xq = dx (d Σ q·xq + m Σxq)
    w0, w1, w2, w3 = _words16(blk, bm, 4, True)
    dot = _nibble_dot(w0, w1, w2, w3, xp, xm)
    d = _f16_at(blk, bm)[None, :]
    m = _f16_at(blk + 2, bm)[None, :]
    sx = tl.load(sp, mask=xm, other=0)
    return tl.load(dxp, mask=xm, other=0.0) * (d * dot.to(tl.float32) + m * sx.to(tl.float32))


@triton.jit
def _spread4(qh, SHIFT: tl.constexpr):
    """Bits SHIFT .. SHIFT + 3 of int32 ``qh`` moved to bit 4 of bytes 0 .. 3 (the q5 high bit of four
    values): one multiply places the 4 bits 7 apart at bits 4, 11, 18, 25 (no carries: the shifted copies
    do not overlap), a mask keeps bit 4 of each byte."""
    return (((qh >> SHIFT) & 0xF) * 0x2040810) & 0x10101010


@triton.jit
def _q5_dot(w0, w1, w2, w3, qh, xp, xm):
    """Σ q·xq of a q5 block: the nibbles of w0..w3 as ``_nibble_dot``, bit 4 of value j from bit j of qh."""
    m = 0x0F0F0F0F
    return _dot8((w0 & m) | _spread4(qh, 0), (w1 & m) | _spread4(qh, 4), (w2 & m) | _spread4(qh, 8),
                 (w3 & m) | _spread4(qh, 12), ((w0 >> 4) & m) | _spread4(qh, 16), ((w1 >> 4) & m) | _spread4(qh, 20),
                 ((w2 >> 4) & m) | _spread4(qh, 24), ((w3 >> 4) & m) | _spread4(qh, 28), xp, xm)


@triton.jit
def _q5_0(blk, bm, xp, dxp, sp, xm):
    # fp16 d, qh[4] (bit j: bit 4 of value j), qs[16] (22-byte blocks: 16-bit loads): d · dx · (Σ q·xq - 16 Σxq)
    w0, w1, w2, w3 = _words16(blk, bm, 6, False)
    qh = _u16_words(blk + 2, bm)[None, :]
    dot = _q5_dot(w0, w1, w2, w3, qh, xp, xm)
    d = _f16_at(blk, bm)[None, :]
    sx = tl.load(sp, mask=xm, other=0)
    return d * tl.load(dxp, mask=xm, other=0.0) * (dot - 16 * sx).to(tl.float32)


@triton.jit
def _q5_1(blk, bm, xp, dxp, sp, xm):
    # fp16 d, fp16 m, uint32 qh, qs[16] (24-byte blocks, 4-byte aligned): dx (d Σ q·xq + m Σxq)
    w0, w1, w2, w3 = _words16(blk, bm, 8, True)
    qh = tl.load((blk + 4).to(tl.pointer_type(tl.int32)), mask=bm, other=0)[None, :]
    dot = _q5_dot(w0, w1, w2, w3, qh, xp, xm)
    d = _f16_at(blk, bm)[None, :]
    m = _f16_at(blk + 2, bm)[None, :]
    sx = tl.load(sp, mask=xm, other=0)
    return tl.load(dxp, mask=xm, other=0.0) * (d * dot.to(tl.float32) + m * sx.to(tl.float32))


@triton.jit
def _iq4_nl(blk, bm, xp, dxp, sp, xm):
    # fp16 d, qs[16] (nibbles as q4_0 index the 16 int8 levels): d · dx · Σ level·xq
    w0, w1, w2, w3 = _words16(blk, bm, 2, False)
    l0, h0 = iq4_levels(w0)
    l1, h1 = iq4_levels(w1)
    l2, h2 = iq4_levels(w2)
    l3, h3 = iq4_levels(w3)
    dot = _dot8(l0, l1, l2, l3, h0, h1, h2, h3, xp, xm)
    d = _f16_at(blk, bm)[None, :]
    return d * tl.load(dxp, mask=xm, other=0.0) * dot.to(tl.float32)


@triton.jit
def _k_type(blk, bm, xp, dxp, sp, xm, FMT: tl.constexpr):
    """The 256-value types (words_k, written for [R, G] block tiles) on the flat block axis: as R = B, G = 1."""
    b2 = blk[:, None]
    m2 = bm[:, None]
    x3 = xp[:, :, None]
    d3 = dxp[:, :, None]
    s3 = sp[:, :, None]
    xm3 = xm[:, :, None]
    if FMT == 12:
        v = words_k.q4_k(b2, m2, x3, d3, s3, xm3)
    elif FMT == 13:
        v = words_k.q5_k(b2, m2, x3, d3, s3, xm3)
    elif FMT == 14:
        v = words_k.q6_k(b2, m2, x3, d3, s3, xm3)
    elif FMT == 10:
        v = words_k.q2_k(b2, m2, x3, d3, s3, xm3)
    elif FMT == 11:
        v = words_k.q3_k(b2, m2, x3, d3, s3, xm3)
    else:
        v = words_k.iq4_xs(b2, m2, x3, d3, s3, xm3)
    return tl.sum(v, axis=2)


@triton.jit
def block_dot(blk, bm, xp, dxp, sp, xm, FMT: tl.constexpr):
    """fp32 [BT, B]: each block's Σ w·dx·xq (see the module docstring)."""
    if FMT == 8:
        v = _q8_0(blk, bm, xp, dxp, sp, xm)
    elif FMT == 2:
        v = _q4_0(blk, bm, xp, dxp, sp, xm)
    elif FMT == 3:
        v = _q4_1(blk, bm, xp, dxp, sp, xm)
    elif FMT == 6:
        v = _q5_0(blk, bm, xp, dxp, sp, xm)
    elif FMT == 7:
        v = _q5_1(blk, bm, xp, dxp, sp, xm)
    elif FMT == 20:
        v = _iq4_nl(blk, bm, xp, dxp, sp, xm)
    else:
        tl.static_assert((FMT == 10) or (FMT == 11) or (FMT == 12) or (FMT == 13) or (FMT == 14) or (FMT == 23),
                         "no int8-dot path for this type")
        v = _k_type(blk, bm, xp, dxp, sp, xm, FMT)
    return v
