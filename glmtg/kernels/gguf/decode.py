"""Block decoders: raw GGUF block bytes -> fp32 values, inside a Triton kernel.

Interface shared by every type (so the kernels that call them are written once):

    decode_blocks(blk, mask, aux, FMT, BS) -> fp32 [R, G, BS]

- ``blk``: uint8 pointers [R, G] to the first byte of R x G blocks (R rows, G blocks of each row);
- ``mask``: bool [R, G], False for blocks that must not be read (their values come back 0);
- ``aux``: pointer to the type's lookup table on the device (``lookup_table``), or any pointer for types
  without one;
- ``FMT``: the gguf type id of the format (``BlockFormat.gguf_type``), a constexpr;
- ``BS``: the format's block size (values per block), a constexpr;
- the result holds each block's values in their natural order (value j of block g of row r at [r, g, j]),
  computed as ``gguf.quants.dequantize`` computes them (same fp32 operations in the same order) so that the
  values are bit-exact with it.

Every GGUF block size is even and every type size is even, and tensors start 16-byte aligned, so each
block's leading fp16 scale sits at an even address: ``_f16_at`` loads it as one 2-byte word.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

# Whether the kernels run compiled (True) or in Triton's interpreter, decided as triton.jit decides it (at
# import). The interpreter cannot run inline PTX: there the decoders take the plain path, equal bit for bit.
_PTX: tl.constexpr = tl.constexpr(not knobs.runtime.interpret)

from glmtg.kernels.gguf import decode_iq
from glmtg.kernels.gguf.decode_kquants import _iq4_xs, _q2_k, _q3_k, _q4_k, _q5_k, _q6_k

# gguf type ids (gguf.GGMLQuantizationType), the FMT values the dispatcher branches on.
F32: tl.constexpr = tl.constexpr(0)
F16: tl.constexpr = tl.constexpr(1)
Q4_0: tl.constexpr = tl.constexpr(2)
Q4_1: tl.constexpr = tl.constexpr(3)
Q5_0: tl.constexpr = tl.constexpr(6)
Q5_1: tl.constexpr = tl.constexpr(7)
Q8_0: tl.constexpr = tl.constexpr(8)
IQ4_NL: tl.constexpr = tl.constexpr(20)
BF16: tl.constexpr = tl.constexpr(30)

# The formats (glmtg.formats names) ``decode_blocks`` decodes; the launchers check against it.
DECODED: tuple[str, ...] = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "q4_k",
                            "q6_k", "q5_k", "iq4_xs", "q3_k", "q2_k", "iq2_xxs", "iq3_xxs", "iq1_m", "iq2_xs",
                            "iq3_s", "iq2_s", "iq1_s")


@triton.jit
def _f16_at(ptr, mask):
    """The fp16 at byte pointers ``ptr`` (2-byte aligned) as fp32; 0 where masked."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _uint_f32(q, bias: tl.constexpr):
    """Unsigned integers ``q`` (< 2^23, any integer type) minus ``bias``, as exact fp32.

    Not by an int -> float conversion: that instruction (I2F) runs at 16 lanes per clock per SM on sm_80 /
    sm_90, an eighth of an FMA, and one per weight value would bound a GEMV far below memory bandwidth.
    The float with exponent 2^23 and q as mantissa bits is 2^23 + q; subtracting 2^23 + bias is exact."""
    f = (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
    return f - (8388608.0 + bias)


@triton.jit
def _byte_f32(b, SIGNED: tl.constexpr):
    """uint8 bytes ``b`` -> fp32 2^23 + u, u the byte (or, if SIGNED, the int8 it holds + 128), exactly:
    subtract 2^23 (+ 128) for the value (``_uint_f32``'s trick). Compiled, PTX does four bytes at a time:
    one XOR of the packed word (SIGNED) and one PRMT per byte, which places it under the exponent byte
    0x4B (selector 0x744i: byte i of the word, zeros, then byte 7 of 0x4B000000)."""
    if _PTX:
        flip: tl.constexpr = "xor.b32 w, $4, 0x80808080;" if SIGNED else "mov.b32 w, $4;"
        v = tl.inline_asm_elementwise(
            "{ .reg .b32 w; " + flip + " prmt.b32 $0, w, 0x4B000000, 0x7440; prmt.b32 $1, w, 0x4B000000, 0x7441; "
            "prmt.b32 $2, w, 0x4B000000, 0x7442; prmt.b32 $3, w, 0x4B000000, 0x7443; }",
            "=r,=r,=r,=r,r", [b], dtype=tl.float32, is_pure=True, pack=4)
    else:
        u = (b ^ 0x80) if SIGNED else b
        v = (u.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _bytes(blk, mask, start: tl.constexpr, n: tl.constexpr):
    """Bytes [start, start + n) of every block: uint8 [R, G, n]."""
    j = tl.arange(0, n)
    return tl.load(blk[:, :, None] + start + j[None, None, :], mask=mask[:, :, None], other=0)


@triton.jit
def _float_blocks(blk, mask, FMT: tl.constexpr):
    # F32 / F16 / BF16: "blocks" of one value.
    if FMT == 0:
        v = tl.load(blk.to(tl.pointer_type(tl.float32)), mask=mask, other=0.0)
    elif FMT == 1:
        v = tl.load(blk.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)
    else:
        bits = tl.load(blk.to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.uint32) << 16
        v = bits.to(tl.float32, bitcast=True)
    return v[:, :, None]


@triton.jit
def _q8_0(blk, mask):
    # fp16 d, int8 q[32]: d * q
    d = _f16_at(blk, mask)
    return d[:, :, None] * (_byte_f32(_bytes(blk, mask, 2, 32), True) - (8388608.0 + 128.0))


@triton.jit
def _q4_0(blk, mask):
    # fp16 d, uint8 qs[16]: value j < 16 is the low nibble of qs[j], value j + 16 the high one; (q - 8) * d
    d = _f16_at(blk, mask)
    q = _nibbles32(blk, mask, 2, 0x4B000000)  # 2^23 + q as float bits (_uint_f32)
    return d[:, :, None] * (q.to(tl.float32, bitcast=True) - (8388608.0 + 8.0))


def _nibbles_ptx(top: str, selector: str) -> str:
    """PTX of ``_nibbles32``: $4 four bytes, $5 their shifts (0 or 4) -> $0..$3 the nibbles over ``top``."""
    body = ("{ .reg .b32 m, h, t; shr.b32 m, $5, 2; and.b32 m, m, 0x01010101; mul.lo.u32 m, m, 255; "
            "shr.b32 h, $4, 4; lop3.b32 t, h, $4, m, 0xE4; and.b32 t, t, 0x0F0F0F0F; ")
    return body + " ".join(f"prmt.b32 ${i}, t, {top}, {selector}{i};" for i in range(4)) + " }"


_NIBBLES_MAGIC_PTX: tl.constexpr = tl.constexpr(_nibbles_ptx("0x4B000000", "0x744"))


@triton.jit
def _nibbles32(blk, mask, start: tl.constexpr, OR: tl.constexpr):
    """The 32 four-bit codes of bytes [start, start + 16) of every block, each ORed with the constant OR
    (0, or 0x4B000000 for ``_uint_f32``'s float trick), int32 [R, G, 32]: value j < 16 is the low nibble of
    byte j, value j + 16 its high nibble (the q4_0 / q4_1 / q5 / iq4_nl order).

    Compiled, with OR = 0x4B000000, PTX does four values at a time: their bytes and shifts (0 or 4) arrive
    packed in one register each; a byte mask from the shifts picks the high or low nibble of every byte (one
    LOP3), and one PRMT per value places the nibble byte under the exponent byte 0x4B (selector 0x744i)."""
    j = tl.arange(0, 32)
    byte = tl.load(blk[:, :, None] + start + (j % 16)[None, None, :], mask=mask[:, :, None], other=0)
    shift = ((j // 16) * 4).to(tl.uint8)[None, None, :]
    tl.static_assert((OR == 0) or (OR == 0x4B000000), "OR must be 0 or 0x4B000000")
    # (Plain nibbles, OR = 0, feed table lookups: there the PTX path counted more instructions, not fewer.)
    if _PTX and OR == 0x4B000000:
        v = tl.inline_asm_elementwise(_NIBBLES_MAGIC_PTX, "=r,=r,=r,=r,r,r", [byte, shift], dtype=tl.int32,
                                      is_pure=True, pack=4)
    else:
        v = ((byte.to(tl.int32) >> shift.to(tl.int32)) & 0xF) | OR
    return v


@triton.jit
def _q5_high(qh):
    """Bit 4 of the 32 q5 codes, int32 [R, G, 32]: bit j of ``qh`` (int32 [R, G], each block's
    little-endian qh word) moved to bit 4 of value j; OR it onto the block's ``_nibbles32``."""
    j = tl.arange(0, 32)
    return ((qh[:, :, None] >> j[None, None, :]) << 4) & 0x10


@triton.jit
def _q4_1(blk, mask):
    # fp16 d, fp16 m, uint8 qs[16]: d * q + m. d * q is exact (11 + 4 significant bits), so a fused
    # multiply-add gives gguf's two-rounding result bit for bit.
    d = _f16_at(blk, mask)
    m = _f16_at(blk + 2, mask)
    q = _nibbles32(blk, mask, 4, 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return d[:, :, None] * q + m[:, :, None]


@triton.jit
def _q5_0(blk, mask):
    # fp16 d, uint8 qh[4] (bit j: bit 4 of value j), uint8 qs[16] (low nibbles): d * (q - 16).
    # qh sits at offset 2 of a 22-byte block, 2-byte aligned only: two 16-bit loads.
    d = _f16_at(blk, mask)
    lo = tl.load((blk + 2).to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.int32)
    hi = tl.load((blk + 4).to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.int32)
    q = _nibbles32(blk, mask, 6, 0x4B000000) | _q5_high(lo | (hi << 16))  # 2^23 + q as float bits
    return d[:, :, None] * (q.to(tl.float32, bitcast=True) - (8388608.0 + 16.0))


@triton.jit
def _q5_1(blk, mask):
    # fp16 d, fp16 m, uint32 qh (24-byte blocks: 4-byte aligned), uint8 qs[16]: d * q + m (d * q exact:
    # 11 + 5 significant bits, so a fused multiply-add changes nothing).
    d = _f16_at(blk, mask)
    m = _f16_at(blk + 2, mask)
    qh = tl.load((blk + 4).to(tl.pointer_type(tl.int32)), mask=mask, other=0)
    q = _nibbles32(blk, mask, 8, 0x4B000000) | _q5_high(qh)  # 2^23 + q as float bits
    return d[:, :, None] * (q.to(tl.float32, bitcast=True) - 8388608.0) + m[:, :, None]


@triton.jit
def _iq4_nl(blk, mask, aux):
    # fp16 d, uint8 qs[16] (nibbles index the 16 non-linear levels, ``aux`` = tables.lookup_table): d * level.
    # A masked block reads code 0: a valid table entry, times d = 0.
    d = _f16_at(blk, mask)
    level = tl.load(aux + _nibbles32(blk, mask, 2, 0))
    return d[:, :, None] * level


@triton.jit
def decode_blocks(blk, mask, aux, FMT: tl.constexpr, BS: tl.constexpr):
    """Decode [R, G] blocks of type ``FMT`` into fp32 [R, G, BS] (see the module docstring)."""
    if FMT == 8:
        v = _q8_0(blk, mask)
    elif FMT == 2:
        v = _q4_0(blk, mask)
    elif FMT == 3:
        v = _q4_1(blk, mask)
    elif FMT == 6:
        v = _q5_0(blk, mask)
    elif FMT == 7:
        v = _q5_1(blk, mask)
    elif FMT == 20:
        v = _iq4_nl(blk, mask, aux)
    elif FMT == 12:
        v = _q4_k(blk, mask)
    elif FMT == 14:
        v = _q6_k(blk, mask)
    elif FMT == 13:
        v = _q5_k(blk, mask)
    elif FMT == 23:
        v = _iq4_xs(blk, mask)
    elif FMT == 11:
        v = _q3_k(blk, mask)
    elif FMT == 10:
        v = _q2_k(blk, mask)
    elif FMT == 16:
        v = decode_iq.iq2_xxs(blk, mask, aux)
    elif FMT == 18:
        v = decode_iq.iq3_xxs(blk, mask, aux)
    elif FMT == 29:
        v = decode_iq.iq1_m(blk, mask, aux)
    elif FMT == 17:
        v = decode_iq.iq2_xs(blk, mask, aux)
    elif FMT == 21:
        v = decode_iq.iq3_s(blk, mask, aux)
    elif FMT == 22:
        v = decode_iq.iq2_s(blk, mask, aux)
    elif FMT == 19:
        v = decode_iq.iq1_s(blk, mask, aux)
    else:
        tl.static_assert((FMT == 0) or (FMT == 1) or (FMT == 30), "no block decoder for this gguf type")
        v = _float_blocks(blk, mask, FMT)
    return v
