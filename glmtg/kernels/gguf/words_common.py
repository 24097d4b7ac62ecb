"""Word-level helpers of the int8-dot (MMVQ) kernels: dp4a, code words from 16-bit loads, activation
word pairs, and IQ4's level lookup four codes at a time. Each inline-PTX helper has a plain Triton path, taken
in the interpreter (which cannot run PTX), computing the same integers."""

from __future__ import annotations

import triton
import triton.language as tl

from glmtg.formats.gguf_blocks import IQ4_LEVELS
from glmtg.kernels.gguf.decode import _PTX
from glmtg.kernels.gguf.decode_kquants import _iq4_level


def _packed(levels: tuple[int, ...]) -> int:
    """Four int8 levels as one little-endian uint32 (level 0 in the low byte)."""
    return sum((v & 0xFF) << (8 * i) for i, v in enumerate(levels))


def _iq4_ptx() -> str:
    # The 16 levels are four words T0..T3 (levels 4i .. 4i + 3). PRMT picks bytes of a pair of words by the
    # selector's nibbles (low 3 bits: the byte of 8; we clear bit 3, which would ask for sign replication):
    # one PRMT looks a nibble up in T0:T1 (codes 0-7), one in T2:T3 (codes 8-15), and a third picks per
    # byte between the two by bit 3 of the code (selector nibble k | 4). Four codes per three PRMTs; two
    # more sort the eight results into the low-nibble and the high-nibble words.
    t = [hex(_packed(IQ4_LEVELS[4 * i:4 * i + 4])) for i in range(4)]
    return ("{ .reg .b32 s, h, a, b, c, t0, t1, q0, q1, q2, q3; "
            f"mov.b32 q0, {t[0]}; mov.b32 q1, {t[1]}; mov.b32 q2, {t[2]}; mov.b32 q3, {t[3]}; "
            "and.b32 s, $2, 0x77777777; and.b32 h, $2, 0x88888888; shr.b32 h, h, 1; or.b32 h, h, 0x32103210; "
            "prmt.b32 a, q0, q1, s; prmt.b32 b, q2, q3, s; prmt.b32 t0, a, b, h; "
            "shr.b32 s, s, 16; shr.b32 h, h, 16; "
            "prmt.b32 a, q0, q1, s; prmt.b32 b, q2, q3, s; prmt.b32 t1, a, b, h; "
            "prmt.b32 $0, t0, t1, 0x6420; prmt.b32 $1, t0, t1, 0x7531; }")


_IQ4_PTX: tl.constexpr = tl.constexpr(_iq4_ptx())


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
    """int32 words from 16-bit loads: the 4 bytes at each of ``ptr`` (2-byte aligned only), 0 where
    masked."""
    lo = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.int32)
    hi = tl.load((ptr + 2).to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _x2(xp, xm, j: tl.constexpr):
    """Activation words 2j and 2j + 1 of every block, by one 64-bit load (the words are 8-byte aligned)."""
    v = tl.load((xp + 2 * j).to(tl.pointer_type(tl.int64)), mask=xm, other=0)
    return v.to(tl.int32), (v >> 32).to(tl.int32)


@triton.jit
def iq4_levels(w):
    """IQ4 code words -> level words: ``w`` int32 holds 8 four-bit codes (byte k: code of its low nibble,
    code of its high nibble); returns (lo, hi), int32 words of the int8 levels of the four low-nibble codes
    and of the four high-nibble codes (byte k each)."""
    if _PTX:
        lo, hi = tl.inline_asm_elementwise(_IQ4_PTX, "=r,=r,r", [w], dtype=(tl.int32, tl.int32), is_pure=True,
                                           pack=1)
    else:
        lo = w * 0
        hi = w * 0
        for k in tl.static_range(4):
            lv = _iq4_level((w >> (8 * k)) & 0xF).to(tl.int32)
            hv = _iq4_level((w >> (8 * k + 4)) & 0xF).to(tl.int32)
            lo |= (lv & 0xFF) << (8 * k)
            hi |= (hv & 0xFF) << (8 * k)
    return lo, hi
