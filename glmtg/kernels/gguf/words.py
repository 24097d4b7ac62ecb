"""Per-type integer dot products of GGUF weight blocks with int8 activation codes, inside a Triton kernel
(the MMVQ path of llama.cpp, written for Triton): the weight codes are packed four to an int32 word with
word-wide bit operations and multiplied with four activation codes at a time by dp4a.

Interface shared by every type (``block_dot`` dispatches on FMT):

    block_dot(blk, bm, xp, dxp, sp, xm, FMT) -> fp32 [BT, R, G]

- ``blk``: uint8 pointers [R, G] to R x G weight blocks, ``bm`` bool [R, G] (False: not read, adds 0);
- ``xp``: int32 pointers [BT, RR, G] (RR = R or 1) to the first activation word (4 int8 codes) of each
  block's values for token t; ``dxp`` fp32 / ``sp`` int32 pointers [BT, RR, G] to that block's first
  32-value group's scale dx and code sum Σxq (groups of one block follow each other); ``xm`` bool
  [BT, RR, G] masks the activation loads;
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
from glmtg.kernels.gguf.words_common import _dp4a, _u16_words, _xwords, iq4_levels


@triton.jit
def _q8_0(blk, bm, xp, dxp, sp, xm):
    # fp16 d, int8 q[32]: d · dx · Σ q·xq
    i = tl.arange(0, 8)
    w = _u16_words(blk[:, :, None] + 2 + 4 * i[None, None, :], bm[:, :, None])
    dot = tl.sum(_dp4a(w[None, :, :, :], _xwords(xp, xm, 0, 8), 0), axis=3)
    d = _f16_at(blk, bm)
    dx = tl.load(dxp, mask=xm, other=0.0)
    return d[None, :, :] * dx * dot.to(tl.float32)


@triton.jit
def _q4_0(blk, bm, xp, dxp, sp, xm):
    # fp16 d, qs[16]: value j < 16 the low nibble of byte j, j + 16 the high one; d · dx · (Σ q·xq - 8 Σxq)
    i = tl.arange(0, 4)
    w = _u16_words(blk[:, :, None] + 2 + 4 * i[None, None, :], bm[:, :, None])
    lo = (w & 0x0F0F0F0F)[None, :, :, :]
    hi = ((w >> 4) & 0x0F0F0F0F)[None, :, :, :]
    dot = tl.sum(_dp4a(hi, _xwords(xp, xm, 4, 4), _dp4a(lo, _xwords(xp, xm, 0, 4), 0)), axis=3)
    d = _f16_at(blk, bm)
    dx = tl.load(dxp, mask=xm, other=0.0)
    sx = tl.load(sp, mask=xm, other=0)
    return d[None, :, :] * dx * (dot - 8 * sx).to(tl.float32)


@triton.jit
def _q4_1(blk, bm, xp, dxp, sp, xm):
    # fp16 d, fp16 m, qs[16] (as q4_0), 20-byte blocks (4-byte aligned): Σ (d q + m)·dx·xq
    # = d · dx · Σ q·xq + m · dx · Σxq
    i = tl.arange(0, 4)
    w = tl.load((blk[:, :, None] + 4 + 4 * i[None, None, :]).to(tl.pointer_type(tl.int32)), mask=bm[:, :, None],
                other=0)
    lo = (w & 0x0F0F0F0F)[None, :, :, :]
    hi = ((w >> 4) & 0x0F0F0F0F)[None, :, :, :]
    dot = tl.sum(_dp4a(hi, _xwords(xp, xm, 4, 4), _dp4a(lo, _xwords(xp, xm, 0, 4), 0)), axis=3)
    d = _f16_at(blk, bm)[None, :, :]
    m = _f16_at(blk + 2, bm)[None, :, :]
    dx = tl.load(dxp, mask=xm, other=0.0)
    sx = tl.load(sp, mask=xm, other=0)
    return dx * (d * dot.to(tl.float32) + m * sx.to(tl.float32))


@triton.jit
def _spread4(qh, SHIFT):
    """Bits SHIFT .. SHIFT + 3 of int32 ``qh`` moved to bit 4 of bytes 0 .. 3 (the q5 high bit of four
    values): one multiply places the 4 bits 7 apart at bits 4, 11, 18, 25 (no carries: the shifted copies
    do not overlap), a mask keeps bit 4 of each byte."""
    return (((qh >> SHIFT) & 0xF) * 0x2040810) & 0x10101010


@triton.jit
def _q5_words(w, qh):
    """q5 code words: low nibbles of ``w`` [R, G, 4] ORed with their bit 4 from ``qh`` [R, G] (bit j: value
    j), and the high nibbles with bits 16 + j: (lo, hi) int32 [R, G, 4], values 4i .. 4i + 3 and 16 + 4i ..."""
    i = tl.arange(0, 4)[None, None, :]
    lo = (w & 0x0F0F0F0F) | _spread4(qh[:, :, None], 4 * i)
    hi = ((w >> 4) & 0x0F0F0F0F) | _spread4(qh[:, :, None], 16 + 4 * i)
    return lo, hi


@triton.jit
def _q5_0(blk, bm, xp, dxp, sp, xm):
    # fp16 d, qh[4] (bit j: bit 4 of value j), qs[16] as q4_0; 22-byte blocks: 16-bit loads only.
    # d · dx · (Σ q·xq - 16 Σxq)
    i = tl.arange(0, 4)
    w = _u16_words(blk[:, :, None] + 6 + 4 * i[None, None, :], bm[:, :, None])
    qh = _u16_words(blk + 2, bm)
    lo, hi = _q5_words(w, qh)
    dot = tl.sum(_dp4a(hi[None, :, :, :], _xwords(xp, xm, 4, 4), _dp4a(lo[None, :, :, :], _xwords(xp, xm, 0, 4), 0)),
                 axis=3)
    d = _f16_at(blk, bm)
    dx = tl.load(dxp, mask=xm, other=0.0)
    sx = tl.load(sp, mask=xm, other=0)
    return d[None, :, :] * dx * (dot - 16 * sx).to(tl.float32)


@triton.jit
def _q5_1(blk, bm, xp, dxp, sp, xm):
    # fp16 d, fp16 m, uint32 qh, qs[16]; 24-byte blocks (4-byte aligned): d · dx · Σ q·xq + m · dx · Σxq
    i = tl.arange(0, 4)
    w = tl.load((blk[:, :, None] + 8 + 4 * i[None, None, :]).to(tl.pointer_type(tl.int32)), mask=bm[:, :, None],
                other=0)
    qh = tl.load((blk + 4).to(tl.pointer_type(tl.int32)), mask=bm, other=0)
    lo, hi = _q5_words(w, qh)
    dot = tl.sum(_dp4a(hi[None, :, :, :], _xwords(xp, xm, 4, 4), _dp4a(lo[None, :, :, :], _xwords(xp, xm, 0, 4), 0)),
                 axis=3)
    d = _f16_at(blk, bm)[None, :, :]
    m = _f16_at(blk + 2, bm)[None, :, :]
    dx = tl.load(dxp, mask=xm, other=0.0)
    sx = tl.load(sp, mask=xm, other=0)
    return dx * (d * dot.to(tl.float32) + m * sx.to(tl.float32))


@triton.jit
def _iq4_nl(blk, bm, xp, dxp, sp, xm):
    # fp16 d, qs[16] (nibbles as q4_0, indices of the 16 int8 levels): d · dx · Σ level·xq
    i = tl.arange(0, 4)
    w = _u16_words(blk[:, :, None] + 2 + 4 * i[None, None, :], bm[:, :, None])
    lo, hi = iq4_levels(w)
    dot = tl.sum(_dp4a(hi[None, :, :, :], _xwords(xp, xm, 4, 4), _dp4a(lo[None, :, :, :], _xwords(xp, xm, 0, 4), 0)),
                 axis=3)
    d = _f16_at(blk, bm)
    dx = tl.load(dxp, mask=xm, other=0.0)
    return d[None, :, :] * dx * dot.to(tl.float32)


@triton.jit
def block_dot(blk, bm, xp, dxp, sp, xm, FMT: tl.constexpr):
    """fp32 [BT, R, G]: each block's Σ w·dx·xq (see the module docstring)."""
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
    elif FMT == 12:
        v = words_k.q4_k(blk, bm, xp, dxp, sp, xm)
    elif FMT == 13:
        v = words_k.q5_k(blk, bm, xp, dxp, sp, xm)
    elif FMT == 14:
        v = words_k.q6_k(blk, bm, xp, dxp, sp, xm)
    else:
        tl.static_assert(FMT == 23, "no int8-dot path for this gguf type")
        v = words_k.iq4_xs(blk, bm, xp, dxp, sp, xm)
    return v
