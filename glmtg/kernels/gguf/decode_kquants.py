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
- codes: every value's code byte is addressed per value (``blk + offset(j)``), with offsets that run in
  contiguous stretches of 16-64 bytes, as ``decode._q4_0`` does. The compiler proves the contiguity and
  loads each thread's bytes with vector loads straight into the layout the values are used in. Loading
  each byte exactly once as a [.., 32] tensor and spreading its nibbles over a new axis instead costs a
  shared-memory round trip to re-lay the codes out and 1.5-3x the registers (measured in the sm_90 PTX);
  here a byte feeding two values is read twice from L1, but fetched from memory once. Codes are unpacked
  in int32 and converted from int32 (``_code_float``); offsets (``- 32``, ...) go on in fp32, exactly.
- scales: the per-sub-block scales are decoded once per block as [R, G, n_sub] and reach the values
  through a broadcast over a [R, G, n_sub, 256 / n_sub] view, never by loading scale bytes per value.
  Header fields at 4-byte aligned offsets of types whose size is a multiple of 4 (Q4_K 144, Q5_K 176,
  Q2_K 84 and IQ4_XS 136 bytes: every block then starts 4-byte aligned, tensors being 16-byte aligned) are
  loaded as 32-bit words; Q6_K (210) and Q3_K (110) blocks are only 2-byte aligned.
- IQ4_XS's 16 non-linear levels are computed in the kernel (selects among 4 int32 constants packing the
  levels + 128, a byte extract, - 128) rather than read from ``aux``: no gather per value, no table on the
  device, no dependence on ``tables.lookup_table``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from glmtg.formats.gguf_blocks import IQ4_LEVELS


def _packed_levels(k: int) -> int:
    """IQ4_LEVELS[4k .. 4k + 3] + 128 (0 .. 255) as the bytes of one little-endian int32 (byte i: level 4k + i)."""
    word = sum((IQ4_LEVELS[4 * k + i] + 128) << (8 * i) for i in range(4))
    return word - (1 << 32) if word >= 1 << 31 else word


_IQ4_W0: tl.constexpr = tl.constexpr(_packed_levels(0))
_IQ4_W1: tl.constexpr = tl.constexpr(_packed_levels(1))
_IQ4_W2: tl.constexpr = tl.constexpr(_packed_levels(2))
_IQ4_W3: tl.constexpr = tl.constexpr(_packed_levels(3))


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
def _code_bits(blk, mask, offs, shift, BITS: tl.constexpr):
    """Per value j of every block: bits shift[j] .. shift[j] + BITS of byte offs[j], as int32 [R, G, 256]."""
    byte = tl.load(blk[:, :, None] + offs[None, None, :], mask=mask[:, :, None], other=0)
    return (byte.to(tl.int32) >> shift[None, None, :]) & ((1 << BITS) - 1)


@triton.jit
def _nibbles(blk, mask, start: tl.constexpr, HALF: tl.constexpr):
    """4-bit codes packed as chunks of HALF bytes, each chunk's low nibbles (HALF values) then its high
    nibbles (the next HALF): value j is nibble (j // HALF) % 2 of byte start + HALF * (j // (2 * HALF))
    + j % HALF. int32 [R, G, 256]."""
    j = tl.arange(0, 256)
    offs = start + HALF * (j // (2 * HALF)) + j % HALF
    return _code_bits(blk, mask, offs, 4 * ((j // HALF) % 2), 4)


@triton.jit
def _crumbs(blk, mask, start: tl.constexpr):
    """2-bit codes packed as 2 chunks of 32 bytes, each giving 4 x 32 values (bits 0-1 of its bytes, then
    bits 2-3, ...): value j is bits 2 * ((j // 32) % 4) of byte start + 32 * (j // 128) + j % 32."""
    j = tl.arange(0, 256)
    offs = start + 32 * (j // 128) + j % 32
    return _code_bits(blk, mask, offs, 2 * ((j // 32) % 4), 2)


@triton.jit
def _high_bits(blk, mask, start: tl.constexpr):
    """One bit per value from 32 bytes: value j is bit j // 32 of byte start + j % 32. int32 [R, G, 256]."""
    j = tl.arange(0, 256)
    return _code_bits(blk, mask, start + j % 32, j // 32, 1)


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
    return _k_affine(blk, mask, _nibbles(blk, mask, 16, 32))


@triton.jit
def _q5_k(blk, mask):
    # fp16 d, fp16 dmin, 12 scale bytes, qh[32] (bit k of byte i: bit 4 of value 32k + i), qs[128] as Q4_K
    q = _nibbles(blk, mask, 48, 32) | (_high_bits(blk, mask, 16) << 4)
    return _k_affine(blk, mask, q)


@triton.jit
def _q6_k(blk, mask):
    # ql[128] (2 halves of 64 bytes: 64 low nibbles then 64 high), qh[64] (2 halves of 32 bytes, 4 two-bit
    # fields each), int8 scales[16], fp16 d: (d * scale) * ((ql | qh << 4) - 32) per 16-value sub-block
    q = _code_float(_nibbles(blk, mask, 0, 64) | (_crumbs(blk, mask, 128) << 4), 32)
    s = tl.arange(0, 16)
    scales = tl.load(blk[:, :, None] + 192 + s[None, None, :], mask=mask[:, :, None], other=0)
    dl = _f16_at(blk + 208, mask)[:, :, None] * scales.to(tl.int8, bitcast=True).to(tl.float32)
    return _per_sub(dl, q, 16)


@triton.jit
def _iq4_level(q):
    """IQ4_LEVELS[q] as fp32 for int32 codes q in [0, 16): byte q % 4 of packed word q // 4 (the level + 128)."""
    word = tl.where((q & 8) != 0, tl.where((q & 4) != 0, _IQ4_W3, _IQ4_W2),
                    tl.where((q & 4) != 0, _IQ4_W1, _IQ4_W0))
    return _code_float((word >> (8 * (q & 3))) & 0xFF, 128)


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
    q = _iq4_level(_nibbles(blk, mask, 8, 16))
    return _per_sub(dl, q, 8)


@triton.jit
def _q3_k(blk, mask):
    # hmask[32] (bit k of byte i: value 32k + i has no -4 offset), qs[64] (2-bit codes as Q2_K), 12 scale
    # bytes, fp16 d: (d * (scale - 32)) * (q - 4 * !hbit) per 16-value sub-block
    q = _code_float(_crumbs(blk, mask, 32) | (_high_bits(blk, mask, 0) << 2), 4)  # ql - 4 + 4 * hbit
    # six-bit scale s: low nibble (s // 8) of byte s % 8, high 2 bits (s // 4) of byte 8 + s % 4
    s = tl.arange(0, 16)[None, None, :]
    lo = tl.load(blk[:, :, None] + 96 + s % 8, mask=mask[:, :, None], other=0)
    hi = tl.load(blk[:, :, None] + 104 + s % 4, mask=mask[:, :, None], other=0)
    sc = ((lo >> (4 * (s // 8)).to(tl.uint8)) & 0x0F) | (((hi >> (2 * (s // 4)).to(tl.uint8)) & 0x03) << 4)
    dl = _f16_at(blk + 108, mask)[:, :, None] * (sc.to(tl.int32) - 32).to(tl.float32)
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
    return _per_sub_affine(dl, ml, _code_float(_crumbs(blk, mask, 16), 0), 16)
