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

from glmtg.kernels.gguf.decode import _PTX, _f16_at


@triton.jit
def _dp4a(a, b, c):
    """c + Σ_i a_i·b_i over the four signed bytes of int32 words ``a`` and ``b`` (broadcast together).

    Compiled: one dp4a.s32.s32 (four multiply-adds in one instruction). The interpreter cannot run PTX:
    the same sum from sign-extended bytes (shift left, arithmetic shift right)."""
    if _PTX:
        r = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        r = c
        for i in tl.static_range(4):
            r += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
    return r


@triton.jit
def _u16_words(ptr, mask):
    """int32 words from 16-bit loads: word i = the 4 bytes at ``ptr`` + 4i (``ptr`` [R, G, n], 2-byte
    aligned only), 0 where masked."""
    lo = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.int32)
    hi = tl.load((ptr + 2).to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _xwords(xp, xm, start: tl.constexpr, n: tl.constexpr):
    """Activation words start .. start + n of every block: int32 [BT, RR, G, n]."""
    i = tl.arange(0, n)
    return tl.load(xp[:, :, :, None] + start + i[None, None, None, :], mask=xm[:, :, :, None], other=0)


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
def block_dot(blk, bm, xp, dxp, sp, xm, FMT: tl.constexpr):
    """fp32 [BT, R, G]: each block's Σ w·dx·xq (see the module docstring)."""
    if FMT == 8:
        v = _q8_0(blk, bm, xp, dxp, sp, xm)
    else:
        tl.static_assert(FMT == 2, "no int8-dot path for this gguf type")
        v = _q4_0(blk, bm, xp, dxp, sp, xm)
    return v
