"""Block decoders for the 256-value k-quant types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_XS, inside a
Triton kernel; ``decode.decode_blocks`` dispatches to them (its docstring states the interface).

Each takes uint8 pointers ``blk`` [R, G] to block starts and ``mask`` [R, G] and returns fp32 [R, G, 256]
in natural value order. How they are written, and why:

- bit-exactness: each value is formed with gguf.quants' fp32 operations in gguf's order: the sub-block
  scale ``d * sc`` (and min ``dmin * m``) first, then ``scale * q`` (``- min``). For finite fp16 scales
  every product but Q6_K's last is exact in fp32, and Q6_K's has no subtraction after it, so each value is
  its exact expression rounded once. The GPU compiler may contract ``a * b - c`` into an FMA; with the
  product exact that rounds to the same value, so FMA contraction is the only difference we allow and it
  changes no finite result (Inf/NaN scales give NaN or Inf either way). The interpreter (CPU) contracts
  nothing: bit-exact outright.
- codes: each code byte is loaded once, in memory order, as an [A, B] tile per block (vector loads; a
  byte several values share, such as Q5_K's qh, once per thread that needs it). Its fields (low and high
  nibble, or the four 2-bit fields) become separate tensors with fixed shifts, which ``tl.join`` pairs in
  the same thread; a permute and a reshape then put the values in natural order by relabelling the
  layout, without moving data. The machine code is what decides (sm_90 SASS of a GEMV step over 4 x 4
  blocks, 32 values a thread): 384 instructions for Q4_K and 512 for Q6_K, against 456 and 1080 when each
  value addresses its own byte (the bytes then come in through narrower loads and shuffles), and worse
  still when the fields are spread over a broadcast axis (a shared-memory round trip). Codes are unpacked
  in int32 and converted from int32 (``_code_float``); offsets (``- 32``, ...) go on in fp32, exactly.
- scales: the per-sub-block scales are decoded once per block as [R, G, n_sub] and reach the values
  through a broadcast over a [R, G, n_sub, 256 / n_sub] view, never by loading scale bytes per value.
  Header fields at 4-byte aligned offsets of types whose size is a multiple of 4 (Q4_K 144, Q5_K 176,
  Q2_K 84 and IQ4_XS 136 bytes: every block then starts 4-byte aligned, tensors being 16-byte aligned) are
  loaded as 32-bit words; Q6_K (210) and Q3_K (110) blocks are only 2-byte aligned.
- IQ4_XS's 16 non-linear levels are computed in the kernel (a quartic in the code, rounded: see
  IQ4_POLY_*) rather than read from ``aux``: fp32 arithmetic instead of a gather per value or a chain of
  integer selects, and no dependence on ``tables.lookup_table``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# IQ4_XS's 16 levels as a polynomial in the code q: the minimax quartic through (q, gguf_blocks.IQ4_LEVELS[q]),
# its coefficients rounded to fp32, is within 0.433 of every level, evaluated in fp32 with or without FMA
# contraction; rounding it to the nearest integer gives the levels exactly (the test checks every code).
# 7 fp32 instructions a value, against about 11 integer ones for a lookup in packed constants.
IQ4_POLY_4: tl.constexpr = tl.constexpr(0.0015860428102314472)
IQ4_POLY_3: tl.constexpr = tl.constexpr(0.03108643926680088)
IQ4_POLY_2: tl.constexpr = tl.constexpr(-1.37192702293396)
IQ4_POLY_1: tl.constexpr = tl.constexpr(24.173830032348633)
IQ4_POLY_0: tl.constexpr = tl.constexpr(-126.56700897216797)


@triton.jit
def _u32_at(ptr, mask):
    """The little-endian uint32 at byte pointers ``ptr`` (4-byte aligned); 0 where masked."""
    return tl.load(ptr.to(tl.pointer_type(tl.uint32)), mask=mask, other=0)


@triton.jit
def _half_lo(w):
    """The fp16 in the low 16 bits of uint32 ``w``, widened to fp32."""
    return (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _half_hi(w):
    """The fp16 in the high 16 bits of uint32 ``w``, widened to fp32."""
    return (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f16_at(ptr, mask):
    """The fp16 at byte pointers ``ptr`` (2-byte aligned) as fp32; 0 where masked."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _code_float(code, BIAS: tl.constexpr):
    """int32 codes (small, >= 0) as fp32 ``code - BIAS``, exactly. Converted from int32 on purpose: sm_90
    compiles a 32-bit source to I2FP, a 16-bit one (what uint8 arithmetic would leave) to the slower I2F;
    the bias goes on in fp32, off the integer pipe that unpacking already loads."""
    return code.to(tl.float32) - BIAS


@triton.jit
def _grid_bytes(blk, mask, start: tl.constexpr, A: tl.constexpr, B: tl.constexpr, STEP: tl.constexpr):
    """int32 [R, G, A, B]: element (a, b) is byte start + a * STEP + b of each block (STEP = B: A x B bytes
    in memory order; STEP > B: A runs of B bytes, STEP apart)."""
    a = tl.arange(0, A)
    b = tl.arange(0, B)
    offs = start + a[:, None] * STEP + b[None, :]
    byte = tl.load(blk[:, :, None, None] + offs[None, None, :, :], mask=mask[:, :, None, None], other=0)
    return byte.to(tl.int32)


@triton.jit
def _bits_to(x, FROM: tl.constexpr, WIDTH: tl.constexpr, TO: tl.constexpr):
    """Bits FROM .. FROM + WIDTH of int32 ``x`` (>= 0) moved to bits TO .. TO + WIDTH, the rest 0: one shift
    and one mask (which the compiler merges with the OR that follows)."""
    if FROM >= TO:
        y = x >> (FROM - TO)
    else:
        y = x << (TO - FROM)
    return y & (((1 << WIDTH) - 1) << TO)


@triton.jit
def _interleave(lo, hi):
    """[R, G, A, B] twice -> [R, G, A * 2 * B]: for each a, row a of lo then row a of hi (values (a, h, b)).

    tl.join pairs the two in the same thread, so the nibble (or field) each value takes is fixed per
    register; the permute and reshape only relabel that layout (no data movement, per the sm_90 SASS)."""
    R: tl.constexpr = lo.shape[0]
    G: tl.constexpr = lo.shape[1]
    A: tl.constexpr = lo.shape[2]
    B: tl.constexpr = lo.shape[3]
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 2, 4, 3)), [R, G, A * 2 * B])


@triton.jit
def _interleave4(c0, c1, c2, c3):
    """[R, G, A, B] four times -> [R, G, A * 4 * B]: for each a, row a of c0, c1, c2, then c3."""
    R: tl.constexpr = c0.shape[0]
    G: tl.constexpr = c0.shape[1]
    A: tl.constexpr = c0.shape[2]
    B: tl.constexpr = c0.shape[3]
    lo = tl.reshape(_interleave(c0, c1), [R, G, A, 2 * B])
    hi = tl.reshape(_interleave(c2, c3), [R, G, A, 2 * B])
    return _interleave(lo, hi)


@triton.jit
def _per_sub(scale, q, S: tl.constexpr):
    """scale fp32 [R, G, S] (one per sub-block of 256 / S values) times q fp32 [R, G, 256]."""
    R: tl.constexpr = q.shape[0]
    G: tl.constexpr = q.shape[1]
    v = scale[:, :, :, None] * tl.reshape(q, [R, G, S, 256 // S])
    return tl.reshape(v, [R, G, 256])


@triton.jit
def _per_sub_affine(scale, low, q, S: tl.constexpr):
    """scale * q - low per sub-block: scale, low fp32 [R, G, S], q fp32 [R, G, 256]."""
    R: tl.constexpr = q.shape[0]
    G: tl.constexpr = q.shape[1]
    v = scale[:, :, :, None] * tl.reshape(q, [R, G, S, 256 // S]) - low[:, :, :, None]
    return tl.reshape(v, [R, G, 256])


@triton.jit
def _k_scale_min(blk, mask):
    """The 8 six-bit scales and mins of a Q4_K / Q5_K block (12 bytes at offset 4) as int32 [R, G, 8].

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the
    mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble). Loaded as three
    words (the offsets are 4-aligned in blocks of 144 / 176 bytes); sub-block s reads byte s % 4 of each."""
    w_sc = _u32_at(blk + 4, mask)[:, :, None]
    w_mn = _u32_at(blk + 8, mask)[:, :, None]
    w_lo = _u32_at(blk + 12, mask)[:, :, None]
    s = tl.arange(0, 8)
    sh = ((s % 4) * 8)[None, None, :]
    first = (s < 4)[None, None, :]
    sc = tl.where(first, (w_sc >> sh) & 0x3F, ((w_lo >> sh) & 0x0F) | ((w_sc >> (sh + 2)) & 0x30))
    mn = tl.where(first, (w_mn >> sh) & 0x3F, ((w_lo >> (sh + 4)) & 0x0F) | ((w_mn >> (sh + 2)) & 0x30))
    return sc.to(tl.int32), mn.to(tl.int32)


@triton.jit
def _k_affine(blk, mask, q):
    """Q4_K / Q5_K: (d * sc) * q - (dmin * m) per 32-value sub-block; q int32 [R, G, 256]."""
    w = _u32_at(blk, mask)  # fp16 d, fp16 dmin
    sc, mn = _k_scale_min(blk, mask)
    dl = _half_lo(w)[:, :, None] * sc.to(tl.float32)
    ml = _half_hi(w)[:, :, None] * mn.to(tl.float32)
    return _per_sub_affine(dl, ml, _code_float(q, 0), 8)


@triton.jit
def _q4_k(blk, mask):
    # fp16 d, fp16 dmin, 12 scale bytes, qs[128]: 4 chunks of 32 bytes, each 32 low nibbles then 32 high
    b = _grid_bytes(blk, mask, 16, 4, 32, 32)
    return _k_affine(blk, mask, _interleave(b & 0x0F, b >> 4))


@triton.jit
def _q5_k_chunk(blk, mask, qh, C: tl.constexpr):
    """Q5_K's values 64C .. 64C + 63 as int32 [R, G, 1, 64], given its qh bytes (int32 [R, G, 1, 32])."""
    R: tl.constexpr = blk.shape[0]
    G: tl.constexpr = blk.shape[1]
    ql = _grid_bytes(blk, mask, 48 + 32 * C, 1, 32, 32)
    q = _interleave((ql & 0x0F) | _bits_to(qh, 2 * C, 1, 4), (ql >> 4) | _bits_to(qh, 2 * C + 1, 1, 4))
    return tl.reshape(q, [R, G, 1, 64])


@triton.jit
def _q5_k(blk, mask):
    # fp16 d, fp16 dmin, 12 scale bytes, qh[32] (bit k of byte i: bit 4 of value 32k + i), qs[128] as Q4_K
    # value 64c + 32h + i: nibble h of qs byte 32c + i, bit 4 from bit 2c + h of qh byte i
    qh = _grid_bytes(blk, mask, 16, 1, 32, 32)
    q0 = _q5_k_chunk(blk, mask, qh, 0)
    q1 = _q5_k_chunk(blk, mask, qh, 1)
    q2 = _q5_k_chunk(blk, mask, qh, 2)
    q3 = _q5_k_chunk(blk, mask, qh, 3)
    return _k_affine(blk, mask, _interleave4(q0, q1, q2, q3))


@triton.jit
def _q6_k(blk, mask):
    # ql[128] (2 halves of 64 bytes: 64 low nibbles then 64 high), qh[64] (2 halves of 32 bytes, 4 two-bit
    # fields each), int8 scales[16], fp16 d: (d * scale) * ((ql | qh << 4) - 32) per 16-value sub-block
    # value 128a + 32t + i (t < 4, i < 32): qh byte 32a + i bits 2t; ql byte 64a + 32 * (t % 2) + i, its
    # low nibble for t < 2, its high one for t >= 2
    ql0 = _grid_bytes(blk, mask, 0, 2, 32, 64)
    ql1 = _grid_bytes(blk, mask, 32, 2, 32, 64)
    qh = _grid_bytes(blk, mask, 128, 2, 32, 32)
    q = _interleave4((ql0 & 0x0F) | _bits_to(qh, 0, 2, 4), (ql1 & 0x0F) | _bits_to(qh, 2, 2, 4),
                     (ql0 >> 4) | _bits_to(qh, 4, 2, 4), (ql1 >> 4) | _bits_to(qh, 6, 2, 4))
    q = _code_float(q, 32)
    s = tl.arange(0, 16)
    scales = tl.load(blk[:, :, None] + 192 + s[None, None, :], mask=mask[:, :, None], other=0)
    dl = _f16_at(blk + 208, mask)[:, :, None] * scales.to(tl.int8, bitcast=True).to(tl.float32)
    return _per_sub(dl, q, 16)


@triton.jit
def _iq4_level(q):
    """IQ4_LEVELS[q] as fp32 for int32 codes q in [0, 16): a quartic through the 16 levels, rounded to the
    nearest integer (adding and subtracting 1.5 * 2^23 rounds any |p| < 2^22 exactly)."""
    x = q.to(tl.float32)
    p = (((IQ4_POLY_4 * x + IQ4_POLY_3) * x + IQ4_POLY_2) * x + IQ4_POLY_1) * x + IQ4_POLY_0
    return (p + 12582912.0) - 12582912.0


@triton.jit
def _iq4_xs(blk, mask):
    # fp16 d, uint16 scales_h (2 bits per sub-block), scales_l[4] (a nibble per sub-block), qs[128]: 8
    # chunks of 16 bytes, 16 low nibbles then 16 high; (d * (scale - 32)) * level[q] per 32 values
    w = _u32_at(blk, mask)  # fp16 d, scales_h
    w_lo = _u32_at(blk + 4, mask)[:, :, None]  # scales_l: sub-block s is bits 4s .. 4s + 3
    s = tl.arange(0, 8)[None, None, :]
    low = (w_lo >> (4 * s)) & 0x0F
    high = (w[:, :, None] >> (16 + 2 * s)) & 0x03
    dl = _half_lo(w)[:, :, None] * ((low | (high << 4)).to(tl.int32) - 32).to(tl.float32)
    b = _grid_bytes(blk, mask, 8, 8, 16, 16)
    q = _interleave(_iq4_level(b & 0x0F), _iq4_level(b >> 4))
    return _per_sub(dl, q, 8)


@triton.jit
def _q3_k(blk, mask):
    # hmask[32] (bit k of byte i: value 32k + i has no -4 offset), qs[64] (2-bit codes as Q2_K), 12 scale
    # bytes, fp16 d: (d * (scale - 32)) * (q - 4 * !hbit) per 16-value sub-block
    # value 128a + 32t + i: bits 2t of qs byte 32a + i, bit 2 from bit 4a + t of hmask byte i
    R: tl.constexpr = blk.shape[0]
    G: tl.constexpr = blk.shape[1]
    hm = _grid_bytes(blk, mask, 0, 1, 32, 32)
    ql = _grid_bytes(blk, mask, 32, 1, 32, 32)
    q0 = _interleave4((ql & 3) | _bits_to(hm, 0, 1, 2), _bits_to(ql, 2, 2, 0) | _bits_to(hm, 1, 1, 2),
                      _bits_to(ql, 4, 2, 0) | _bits_to(hm, 2, 1, 2), (ql >> 6) | _bits_to(hm, 3, 1, 2))
    ql = _grid_bytes(blk, mask, 64, 1, 32, 32)
    q1 = _interleave4((ql & 3) | _bits_to(hm, 4, 1, 2), _bits_to(ql, 2, 2, 0) | _bits_to(hm, 5, 1, 2),
                      _bits_to(ql, 4, 2, 0) | _bits_to(hm, 6, 1, 2), (ql >> 6) | _bits_to(hm, 7, 1, 2))
    q = _interleave(tl.reshape(q0, [R, G, 1, 128]), tl.reshape(q1, [R, G, 1, 128]))
    q = _code_float(q, 4)  # ql + 4 * hbit - 4
    # six-bit scale s: low nibble (s // 8) of byte s % 8, high 2 bits (s // 4) of byte 8 + s % 4
    s = tl.arange(0, 16)[None, None, :]
    lo = tl.load(blk[:, :, None] + 96 + s % 8, mask=mask[:, :, None], other=0).to(tl.int32)
    hi = tl.load(blk[:, :, None] + 104 + s % 4, mask=mask[:, :, None], other=0).to(tl.int32)
    sc = ((lo >> (4 * (s // 8))) & 0x0F) | (((hi >> (2 * (s // 4))) & 0x03) << 4)
    dl = _f16_at(blk + 108, mask)[:, :, None] * (sc - 32).to(tl.float32)
    return _per_sub(dl, q, 16)


@triton.jit
def _q2_k(blk, mask):
    # scales[16] (low nibble scale, high nibble min), qs[64] (2-bit codes), fp16 d, fp16 dmin:
    # (d * sc) * q - (dmin * m) per 16-value sub-block
    s = tl.arange(0, 16)
    scales = tl.load(blk[:, :, None] + s[None, None, :], mask=mask[:, :, None], other=0)
    w = _u32_at(blk + 80, mask)  # fp16 d, fp16 dmin
    dl = _half_lo(w)[:, :, None] * (scales & 0x0F).to(tl.float32)
    ml = _half_hi(w)[:, :, None] * (scales >> 4).to(tl.float32)
    b = _grid_bytes(blk, mask, 16, 2, 32, 32)  # value 128a + 32t + i: bits 2t of byte 32a + i
    q = _interleave4(b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6)
    return _per_sub_affine(dl, ml, _code_float(q, 0), 16)
