"""Integer dot products of the 256-value k-quant blocks (Q2_K .. Q6_K) and IQ4_XS with int8
activation codes (``words.block_dot`` dispatches here, its docstring states the interface). Written for
tiles of blocks: ``blk`` / ``bm`` [R, G], activation pointers and mask [BT, RR, G], result [BT, R, G];
block_dot passes its flat block axis as R = B, G = 1.

Each block's code words are loaded once in memory order (32-bit loads where the block size is a multiple
of 4: Q4_K 144, Q5_K 176, IQ4_XS 136 bytes; Q6_K's 210-byte blocks from 16-bit loads) and turned into
int8x4 words with word-wide masks and shifts; the per-32 (Q6_K: per-16) sub-block sums Σ q·xq are exact
int32 and get their scale once. Q4_K / Q5_K mins go through the activation group sums:
Σ (d sc q - dmin m)·dx·xq = d sc dx Σ q·xq - dmin m dx Σxq; Q2_K's mins are per 16 values, their Σxq
a dp4a with 0x01010101. Q6_K's and Q3_K's offset codes (q - 32, q - 4) are made signed bytes instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from glmtg.kernels.gguf.decode import _f16_at
from glmtg.kernels.gguf.decode_kquants import _half_hi, _half_lo
from glmtg.kernels.gguf.words_common import _dp4a, _u16_words, iq4_levels


@triton.jit
def _i32_at(ptr, mask):
    """int32 words at 4-byte aligned byte pointers ``ptr``; 0 where masked."""
    return tl.load(ptr.to(tl.pointer_type(tl.int32)), mask=mask, other=0)


@triton.jit
def _k_scale_min(blk, bm, s):
    """Q4_K / Q5_K six-bit scales and mins of sub-blocks ``s`` (int32 [S]) as fp32 [R, G, S] (layout:
    decode_kquants._k_scale_min)."""
    w_sc = _i32_at(blk + 4, bm)[:, :, None]
    w_mn = _i32_at(blk + 8, bm)[:, :, None]
    w_lo = _i32_at(blk + 12, bm)[:, :, None]
    sh = ((s % 4) * 8)[None, None, :]
    first = (s < 4)[None, None, :]
    sc = tl.where(first, (w_sc >> sh) & 0x3F, ((w_lo >> sh) & 0x0F) | ((w_sc >> (sh + 2)) & 0x30))
    mn = tl.where(first, (w_mn >> sh) & 0x3F, ((w_lo >> (sh + 4)) & 0x0F) | ((w_mn >> (sh + 2)) & 0x30))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _k_dot(blk, bm, xp, dxp, sp, xm, lo, hi):
    """Q4_K / Q5_K block sums from code words lo, hi int32 [R, G, 4, 8]: word i of chunk c covers values
    64c + 4i .. (lo, sub-block 2c) and 64c + 32 + 4i .. (hi, sub-block 2c + 1)."""
    c = tl.arange(0, 4)
    i = tl.arange(0, 8)
    xo = (16 * c)[:, None] + i[None, :]  # activation word of lo's values
    xp5 = xp[:, :, :, None, None] + xo[None, None, None, :, :]
    xm5 = xm[:, :, :, None, None]
    dl = tl.sum(_dp4a(lo[None], tl.load(xp5, mask=xm5, other=0), 0), axis=4)  # [BT, R, G, 4]
    dh = tl.sum(_dp4a(hi[None], tl.load(xp5 + 8, mask=xm5, other=0), 0), axis=4)
    w = _i32_at(blk, bm)  # fp16 d, fp16 dmin
    scl, mnl = _k_scale_min(blk, bm, 2 * c)
    sch, mnh = _k_scale_min(blk, bm, 2 * c + 1)
    g = (2 * c)[None, None, None, :]
    xm4 = xm[:, :, :, None]
    dxl = tl.load(dxp[:, :, :, None] + g, mask=xm4, other=0.0)
    dxh = tl.load(dxp[:, :, :, None] + g + 1, mask=xm4, other=0.0)
    sxl = tl.load(sp[:, :, :, None] + g, mask=xm4, other=0).to(tl.float32)
    sxh = tl.load(sp[:, :, :, None] + g + 1, mask=xm4, other=0).to(tl.float32)
    a = tl.sum(scl[None] * dxl * dl.to(tl.float32) + sch[None] * dxh * dh.to(tl.float32), axis=3)
    b = tl.sum(mnl[None] * dxl * sxl + mnh[None] * dxh * sxh, axis=3)
    return _half_lo(w)[None, :, :] * a - _half_hi(w)[None, :, :] * b


@triton.jit
def q4_k(blk, bm, xp, dxp, sp, xm):
    # fp16 d, fp16 dmin, 12 scale bytes, qs[128]: chunk c of 32 bytes, low nibbles values 64c + j, high
    # nibbles 64c + 32 + j
    c = tl.arange(0, 4)
    i = tl.arange(0, 8)
    w = _i32_at(blk[:, :, None, None] + 16 + (32 * c[:, None] + 4 * i[None, :])[None, None], bm[:, :, None, None])
    return _k_dot(blk, bm, xp, dxp, sp, xm, w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F)


@triton.jit
def q5_k(blk, bm, xp, dxp, sp, xm):
    # as q4_k, with qh[32] at 16 (bit 2c + h of byte j: bit 4 of value 64c + 32h + j) and qs at 48
    c = tl.arange(0, 4)
    i = tl.arange(0, 8)
    w = _i32_at(blk[:, :, None, None] + 48 + (32 * c[:, None] + 4 * i[None, :])[None, None], bm[:, :, None, None])
    qh = _i32_at(blk[:, :, None, None] + 16 + (4 * i)[None, None, None, :], bm[:, :, None, None])  # [R, G, 1, 8]
    sh = (2 * c)[None, None, :, None]
    lo = (w & 0x0F0F0F0F) | (((qh >> sh) << 4) & 0x10101010)
    hi = ((w >> 4) & 0x0F0F0F0F) | (((qh >> (sh + 1)) << 4) & 0x10101010)
    return _k_dot(blk, bm, xp, dxp, sp, xm, lo, hi)


@triton.jit
def _q6_signed(code):
    """Six-bit codes q (one per byte) -> int8 q - 32 per byte: q + 96 stays in its byte (< 160) and
    flipping bit 7 subtracts 128 modulo 256 (0x80808080 is -0x7F7F7F80 as int32)."""
    return (code + 0x60606060) ^ -0x7F7F7F80


@triton.jit
def q6_k(blk, bm, xp, dxp, sp, xm):
    # ql[128], qh[64], int8 scales[16], fp16 d at 208 (210-byte blocks: 16-bit loads). Value
    # 128a + 32t + j: ql byte 64a + 32(t % 2) + j (low nibble for t < 2, high for t >= 2), bits 2t of qh
    # byte 32a + j; (d · scale) · (q - 32) per 16 values. Words here [R, G, a, half, k]: bytes
    # 16 half + 4k of a 32-byte run.
    a = tl.arange(0, 2)
    h = tl.arange(0, 2)
    k = tl.arange(0, 4)
    run = (16 * h[:, None] + 4 * k[None, :])[None, None, None, :, :]  # [1, 1, 1, 2, 4]
    base = blk[:, :, None, None, None]
    m5 = bm[:, :, None, None, None]
    a5 = a[None, None, :, None, None]
    ql0 = _u16_words(base + 64 * a5 + run, m5)
    ql1 = _u16_words(base + 64 * a5 + 32 + run, m5)
    qh = _u16_words(base + 128 + 32 * a5 + run, m5)
    d = _f16_at(blk + 208, bm)[None, :, :]
    # activation words of group 4a + t, [BT, RR, G, a, half, k]
    xp6 = xp[:, :, :, None, None, None] + (32 * a[:, None, None] + 4 * h[None, :, None] + k[None, None, :])[None, None,
                                                                                                             None]
    xm6 = xm[:, :, :, None, None, None]
    gx = (4 * a)[None, None, None, :, None]  # group of t = 0, [1, 1, 1, 2, 1]
    xm5 = xm[:, :, :, None, None]
    sc = blk[:, :, None, None] + 192 + (8 * a[:, None] + h[None, :])[None, None]  # scale of t = 0, [R, G, 2, 2]
    acc = tl.zeros(xp6.shape[:3], tl.float32)
    for t in tl.static_range(4):
        if t == 0:
            code = (ql0 & 0x0F0F0F0F) | ((qh << 4) & 0x30303030)
        elif t == 1:
            code = (ql1 & 0x0F0F0F0F) | ((qh << 2) & 0x30303030)
        elif t == 2:
            code = ((ql0 >> 4) & 0x0F0F0F0F) | (qh & 0x30303030)
        else:
            code = ((ql1 >> 4) & 0x0F0F0F0F) | ((qh >> 2) & 0x30303030)
        xw = tl.load(xp6 + 8 * t, mask=xm6, other=0)
        dot = tl.sum(_dp4a(_q6_signed(code)[None], xw, 0), axis=5)  # [BT, R, G, a, half]
        s = tl.load(sc + 2 * t, mask=bm[:, :, None, None], other=0).to(tl.int8, bitcast=True).to(tl.float32)
        dx = tl.load(dxp[:, :, :, None, None] + gx + t, mask=xm5, other=0.0)
        acc += tl.sum(tl.sum(s[None] * dx * dot.to(tl.float32), axis=4), axis=3)
    return d * acc


@triton.jit
def iq4_xs(blk, bm, xp, dxp, sp, xm):
    # fp16 d, uint16 scales_h, scales_l[4], qs[128] at 8: chunk s of 16 bytes, low nibbles values 32s + j,
    # high nibbles 32s + 16 + j (level indices); (d · (scale - 32)) · Σ level·xq per 32 values
    s = tl.arange(0, 8)
    i = tl.arange(0, 4)
    w = _i32_at(blk[:, :, None, None] + 8 + (16 * s[:, None] + 4 * i[None, :])[None, None], bm[:, :, None, None])
    lo, hi = iq4_levels(w)  # [R, G, 8, 4]
    xp5 = xp[:, :, :, None, None] + (8 * s[:, None] + i[None, :])[None, None, None]
    xm5 = xm[:, :, :, None, None]
    dot = _dp4a(hi[None], tl.load(xp5 + 4, mask=xm5, other=0), _dp4a(lo[None], tl.load(xp5, mask=xm5, other=0), 0))
    dot = tl.sum(dot, axis=4)  # [BT, R, G, 8]
    w0 = _i32_at(blk, bm)  # fp16 d, scales_h
    w_lo = _i32_at(blk + 4, bm)[:, :, None]
    sv = s[None, None, :]
    ls = (((w_lo >> (4 * sv)) & 0x0F) | (((w0[:, :, None] >> (16 + 2 * sv)) & 0x03) << 4)) - 32
    dx = tl.load(dxp[:, :, :, None] + s[None, None, None, :], mask=xm[:, :, :, None], other=0.0)
    return _half_lo(w0)[None, :, :] * tl.sum(ls.to(tl.float32)[None] * dx * dot.to(tl.float32), axis=3)


@triton.jit
def _k2_tile(blk, bm, xp, xm, off: tl.constexpr, ALIGN4: tl.constexpr):
    """Q2_K / Q3_K: the 2-bit code words of the 64 qs bytes at ``off`` as [R, G, a, half, k] (bytes
    32a + 16 half + 4k), and the activation pointers [BT, RR, G, a, half, k] of their t = 0 values
    (value 128a + 32t + 16 half + 4k ..: group 4a + t, word 4 half + k)."""
    a = tl.arange(0, 2)
    h = tl.arange(0, 2)
    k = tl.arange(0, 4)
    run = (16 * h[:, None] + 4 * k[None, :])[None, None, None, :, :]
    ptr = blk[:, :, None, None, None] + off + 32 * a[None, None, :, None, None] + run
    m5 = bm[:, :, None, None, None]
    if ALIGN4:
        qs = _i32_at(ptr, m5)
    else:
        qs = _u16_words(ptr, m5)
    xp6 = xp[:, :, :, None, None, None] + (32 * a[:, None, None] + 4 * h[None, :, None] + k[None, None, :])[None, None,
                                                                                                             None]
    return qs, xp6, xm[:, :, :, None, None, None]


@triton.jit
def q2_k(blk, bm, xp, dxp, sp, xm):
    # scales[16] (low nibble scale, high nibble min), qs[64], fp16 d, fp16 dmin (84-byte blocks, 4-byte
    # aligned): (d sc) q - dmin m per 16 values, value 128a + 32t + i from bits 2t of qs byte 32a + i. The
    # min term needs Σxq per 16 values: dp4a of the activation words with 0x01010101.
    qs, xp6, xm6 = _k2_tile(blk, bm, xp, xm, 16, True)
    a = tl.arange(0, 2)
    h = tl.arange(0, 2)
    sc_ptr = blk[:, :, None, None] + (8 * a[:, None] + h[None, :])[None, None]  # sub-block 8a + h (t = 0)
    gx = (4 * a)[None, None, None, :, None]
    acc_d = tl.zeros(xp6.shape[:3], tl.float32)
    acc_m = tl.zeros(xp6.shape[:3], tl.float32)
    for t in tl.static_range(4):
        xw = tl.load(xp6 + 8 * t, mask=xm6, other=0)
        dot = tl.sum(_dp4a(((qs >> (2 * t)) & 0x03030303)[None], xw, 0), axis=5).to(tl.float32)
        sx = tl.sum(_dp4a(xw * 0 + 0x01010101, xw, 0), axis=5).to(tl.float32)  # an int32 tensor: the
        # interpreter shifts a Python int without wrapping
        sb = tl.load(sc_ptr + 2 * t, mask=bm[:, :, None, None], other=0).to(tl.int32)
        dx = tl.load(dxp[:, :, :, None, None] + gx + t, mask=xm[:, :, :, None, None], other=0.0)
        acc_d += tl.sum(tl.sum((sb & 0xF).to(tl.float32)[None] * dx * dot, axis=4), axis=3)
        acc_m += tl.sum(tl.sum((sb >> 4).to(tl.float32)[None] * dx * sx, axis=4), axis=3)
    w = _i32_at(blk + 80, bm)
    return _half_lo(w)[None, :, :] * acc_d - _half_hi(w)[None, :, :] * acc_m


@triton.jit
def q3_k(blk, bm, xp, dxp, sp, xm):
    # hmask[32], qs[64] (2-bit codes as Q2_K), 12 scale bytes, fp16 d (110-byte blocks, 2-byte aligned):
    # (d (scale - 32)) (q - 4 (1 - hbit)) per 16 values; value 128a + 32t + i: bit 4a + t of hmask byte i.
    # The code c = low | hbit << 2 in [0, 8) becomes the int8 c - 4 per byte: (c + 124) ^ 0x80.
    qs, xp6, xm6 = _k2_tile(blk, bm, xp, xm, 32, False)
    a = tl.arange(0, 2)
    h = tl.arange(0, 2)
    k = tl.arange(0, 4)
    hm = _u16_words(blk[:, :, None, None, None] + (16 * h[:, None] + 4 * k[None, :])[None, None, None, :, :],
                    bm[:, :, None, None, None])  # [R, G, 1, 2, 4]
    a5 = a[None, None, :, None, None]
    gx = (4 * a)[None, None, None, :, None]
    m4 = bm[:, :, None, None]
    acc = tl.zeros(xp6.shape[:3], tl.float32)
    for t in tl.static_range(4):
        code = ((qs >> (2 * t)) & 0x03030303) | (((hm >> (4 * a5 + t)) & 0x01010101) << 2)
        xw = tl.load(xp6 + 8 * t, mask=xm6, other=0)
        dot = tl.sum(_dp4a(((code + 0x7C7C7C7C) ^ -0x7F7F7F80)[None], xw, 0), axis=5).to(tl.float32)
        # six-bit scale of sub-block s = 8a + 2t + h: low nibble (a) of byte 2t + h, high 2 bits
        # (2a + (2t + h) // 4) of byte 8 + (2t + h) % 4
        j = 2 * t + h[None, None, None, :]  # [1, 1, 1, 2]
        lo = tl.load(blk[:, :, None, None] + 96 + j, mask=m4, other=0).to(tl.int32)
        hi = tl.load(blk[:, :, None, None] + 104 + j % 4, mask=m4, other=0).to(tl.int32)
        aa = a[None, None, :, None]
        sc = ((lo >> (4 * aa)) & 0x0F) | (((hi >> (2 * (2 * aa + j // 4))) & 0x03) << 4)
        dx = tl.load(dxp[:, :, :, None, None] + gx + t, mask=xm[:, :, :, None, None], other=0.0)
        acc += tl.sum(tl.sum((sc - 32).to(tl.float32)[None] * dx * dot, axis=4), axis=3)
    return _f16_at(blk + 108, bm)[None, :, :] * acc
