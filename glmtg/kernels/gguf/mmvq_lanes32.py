"""Lane-shared block reads for the 32-value GGUF types (Q4_0, Q5_0, Q8_0) at one token, and the dense GEMV
that uses them: the "lanes-q4" variants of mmvq (mmvq.py), and the block readers of the routed-expert
lanes kernels (mmvq_moe_lanes.py).

Why: the base kernel (mmvq._mmvq_kernel, words.py) gives each thread whole blocks and assembles a block's
code words from 16-bit loads (an 18-byte Q4_0 block is only 2-byte aligned): 9 load instructions a Q4_0
block, and each warp instruction touches the same 2 bytes of 32 blocks 18 bytes apart (~5 cache lines for
64 useful bytes). Per byte of weight the L1 then sees ~9x the requests of a plain read, and the measured
rate sits near 2 TB/s (bench/DECISIONS.md H1, H5). Here a block is read by L neighbouring lanes (L = 1, 2
or 4), each owning NW = NQ / L consecutive code words (NQ: 4 for Q4_0 / Q5_0, 8 for Q8_0), read as NW + 1
aligned 32-bit loads funnel-shifted by 0 or 16 bits (mmvq_lanes._funnel), and the lane's activation words
as one vector load (two for the 4-bit types: the low and the high nibbles' values): a Q4_0 block takes
5 + 2 + 3 loads (codes, activations, d / dx / Σxq) at L = 1 where the base kernel takes 9 + 4 + 2, and
at L > 1 the lanes of one block read adjacent words. Counts: bench/results/gguf_gemv/2026-11-28-lanes-sass.md
(global loads a value: Q4_0 0.25 at L = 1 against the base kernel's 0.47).

Layout: every tensor of a block step is [L, B] (B blocks on a flat axis, as mmvq; the lane axis first, so
Triton's coalescing puts a block's L lanes next to each other). The lanes' integer dots are summed across
the L lanes (exact int32) before any scale, so each block's term d · dx · (Σ q·xq - c·Σxq) is the same fp32
value as words.block_dot's, in the same order of products: with the same blocks a step and rows a program
as the base kernel, the fp32 accumulation is the same too (equal results in the interpreter; on a GPU
``tl.sum``'s tree over a different register layout may differ in the last bits). Left: the dot's layout
after the lane sum is not the one Triton gives the [B] scale loads, so each step of the dense kernel
converts one int32 [B] through shared memory (STS / BAR / LDS in the loop, as the base kernel has too);
the one-warp MoE kernels convert by shuffles.

Alignment: a block starts 2-byte aligned; the caller's byte offsets must be exact from a 4-byte aligned
base (rows of an even number of blocks, whole expert matrices, steps of an even number of blocks: then
every block keeps its 0 / 16-bit shift from step to step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels.gguf.mmvq_lanes import _funnel, _ld, _q4_k_step, store_row
from glmtg.kernels.gguf.words_common import _dp4a
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release

# The formats the 32-value lane readers take.
LANES32_FORMATS: tuple[str, ...] = ("q4_0", "q5_0", "q8_0")
# mmvq's variants (GLMTG_MMVQ_VARIANT, mmvq_lanes.VARIANTS) that send these formats here, and their L
# (lanes a block); each also runs the "lanes" kernel for Q6_K / Q4_K.
LANES32_VARIANTS: dict[str, int] = {"lanes-q4": 2, "lanes-q4-narrow": 1, "lanes-q4-wide": 4, "lanes-q4-auto": 0}


def lanes32_auto(fmt_name: str) -> int:
    """L of the "-auto" variants: per format, the fewest sm_90 instructions a value (bench/gguf_gemv.py --sass
    --mmvq, at the default launches): Q4_0 and Q5_0 a lane a block (1.6-1.7 and 2.6-2.8 a value, against
    2.1-2.3 and 3.5-3.7 at L = 2), Q8_0 two (2.0, against 2.2-2.5 at L = 1: its 8 code words on one lane
    take 9 loads and 8 funnel shifts). Not measured yet."""
    return 2 if fmt_name == "q8_0" else 1


def lanes32_split(variant: str, fmt_name: str, tokens: int, nb: int) -> int:
    """L (1, 2 or 4) if mmvq runs this module's kernel for ``fmt_name`` at ``tokens`` with rows of ``nb``
    blocks under ``variant`` (already checked to be one of mmvq_lanes.VARIANTS), else 0. Rows of an odd
    number of blocks are not 4-byte aligned: those keep the base kernel."""
    if not (fmt_name in LANES32_FORMATS and tokens == 1 and nb % 2 == 0 and variant in LANES32_VARIANTS):
        return 0
    return LANES32_VARIANTS[variant] or lanes32_auto(fmt_name)


def default_config(split: int) -> tuple[int, int, int]:
    """(block_n, values per step, num_warps) of the dense kernel, the same for every L: 2 rows x 4096 values a
    step on 4 warps (256 blocks a step: 2 blocks' loads a thread in flight, each block's on L lanes; the
    base kernel's measured launch, 4 rows x 4096 on 4 warps, keeps 4 blocks a thread). Reasoned, not
    measured yet: bench/gguf_gemv.py --mmvq --sweep times one-warp launches and more rows."""
    return 2, 4096, 4


@triton.jit
def _spread4(qh, s):
    """Bits s .. s + 3 of int32 ``qh`` (``s`` a tensor) to bit 4 of bytes 0 .. 3 (words._spread4's multiply)."""
    return (((qh >> s) & 0xF) * 0x2040810) & 0x10101010


@triton.jit
def _words(p, sh, m, NW: tl.constexpr, MASKED: tl.constexpr):
    """The NW (1, 2, 4 or 8) int32 words at 2-byte aligned byte addresses, [L, B, NW] (the words on a register
    axis, in order): ``p`` [L, B] points at the aligned word at or below each run, ``sh`` is 0 or 16.
    NW + 1 aligned 32-bit loads and NW funnel shifts (mmvq_lanes._run, for any NW)."""
    a0 = _ld(p, m, MASKED)
    a1 = _ld(p + 1, m, MASKED)
    w0 = _funnel(a0, a1, sh)
    if NW == 1:
        w = tl.expand_dims(w0, 2)
    else:
        a2 = _ld(p + 2, m, MASKED)
        w1 = _funnel(a1, a2, sh)
        if NW == 2:
            w = tl.join(w0, w1)
        else:
            a3 = _ld(p + 3, m, MASKED)
            a4 = _ld(p + 4, m, MASKED)
            w2 = _funnel(a2, a3, sh)
            w3 = _funnel(a3, a4, sh)
            if NW == 4:
                # join(join(w0, w2), join(w1, w3))[u, v] = w[2u + v]: row-major, the words in order
                w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [w0.shape[0], w0.shape[1], 4])
            else:
                a5 = _ld(p + 5, m, MASKED)
                a6 = _ld(p + 6, m, MASKED)
                a7 = _ld(p + 7, m, MASKED)
                a8 = _ld(p + 8, m, MASKED)
                w4 = _funnel(a4, a5, sh)
                w5 = _funnel(a5, a6, sh)
                w6 = _funnel(a6, a7, sh)
                w7 = _funnel(a7, a8, sh)
                # [a, b, c] = w[4a + 2b + c]
                w = tl.reshape(tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)),
                                       tl.join(tl.join(w1, w5), tl.join(w3, w7))), [w0.shape[0], w0.shape[1], 8])
    return w


@triton.jit
def blocks32(W, off, bm, XW, DX, XS, grp, FMT: tl.constexpr, L: tl.constexpr, MASKED: tl.constexpr):
    """Each block's Σ w·dx·xq, fp32 [B] (words.block_dot's value for one token).

    ``W``: uint8 pointer, 4-byte aligned (a scalar, or [B]); ``off`` int64 [B]: each block's byte offset from
    W (2-byte aligned); ``bm`` bool [B] (False: nothing read, 0; used only if MASKED); ``grp`` [B]: the
    block's activation group (XW word 8·grp, DX / XS element grp). The block's code words on L lanes; a
    lane's activation words are one vector load (two for the 4-bit types: low and high nibbles)."""
    QOFF: tl.constexpr = 6 if FMT == 6 else 2  # the code bytes (Q5_0: after d and the 4 high-bit bytes)
    NQ: tl.constexpr = 8 if FMT == 8 else 4  # code words a block
    NW: tl.constexpr = NQ // L  # code words a lane
    h = tl.arange(0, L)[:, None]  # [L, 1]
    a = off[None, :] + QOFF + 4 * NW * h  # [L, B]: byte offset of the lane's first code word
    sh = ((a & 3) * 8).to(tl.int32)  # 0 or 16
    W32 = W.to(tl.pointer_type(tl.int32))
    m2 = bm[None, :]
    m3 = bm[None, :, None]
    w = _words(W32 + (a >> 2), sh, m2, NW, MASKED)  # [L, B, NW]
    jw = NW * h[:, :, None] + tl.arange(0, NW)[None, None, :]  # [L, 1, NW]: the block's word of each
    xb = XW + 8 * grp[None, :, None] + jw  # its activation word (the low nibbles' for the 4-bit types)
    if FMT == 8:
        dot = _dp4a(w, _ld(xb, m3, MASKED), 0)
    else:
        lo = w & 0x0F0F0F0F  # values 4·jw + 0..3
        hi = (w >> 4) & 0x0F0F0F0F  # the same + 16
        if FMT == 6:
            # the 32 high bits (bytes 2..5) have the codes' alignment (4 bytes before them): one funnel
            pq = W32 + ((off[None, :] + 2 + 0 * h) >> 2)
            qh = _funnel(_ld(pq, m2, MASKED), _ld(pq + 1, m2, MASKED), sh)[:, :, None]
            lo = lo | _spread4(qh, 4 * jw)
            hi = hi | _spread4(qh, 4 * jw + 16)
        dot = _dp4a(hi, _ld(xb + 4, m3, MASKED), _dp4a(lo, _ld(xb, m3, MASKED), 0))
    dot = tl.sum(tl.sum(dot, axis=2), axis=0)  # [B]: exact int32, the block's Σ q·xq
    d = _ld((W + off).to(tl.pointer_type(tl.float16)), bm, MASKED).to(tl.float32)
    dx = _ld(DX + grp, bm, MASKED)
    if FMT == 8:
        v = d * dx * dot.to(tl.float32)
    else:
        sx = _ld(XS + grp, bm, MASKED)
        c: tl.constexpr = 16 if FMT == 6 else 8  # the codes' offset
        v = d * dx * (dot - c * sx).to(tl.float32)
    return v


@triton.jit
def q4_k_blocks(W, off, bm, XW, DX, XS, grp, E: tl.constexpr, MASKED: tl.constexpr):
    """As ``blocks32`` for Q4_K (144-byte, 4-byte aligned blocks; ``grp`` the block's first of 8 groups):
    mmvq_lanes' reader, 4 · E lanes a block (lane (c, e): 32 / E bytes of qs chunk c)."""
    NH: tl.constexpr = 2 // E
    c = tl.arange(0, 4)
    i = (16 * NH // 4 * tl.arange(0, E))[None, :, None, None] + tl.arange(0, 4)[None, None, None, :]
    p_blk = W.to(tl.pointer_type(tl.int32)) + (off >> 2)  # [B]
    p_w = p_blk[None, None, :, None] + (4 + 8 * c)[:, None, None, None] + i
    p_x = XW + 8 * grp[None, None, :, None] + (16 * c)[:, None, None, None] + i
    p_dx = DX + grp[None, :] + (2 * c)[:, None]
    p_sx = XS + grp[None, :] + (2 * c)[:, None]
    return _q4_k_step(p_w, p_x, p_blk, p_dx, p_sx, c, bm, NH, MASKED)


@triton.jit
def _lanes32_kernel(XW, DX, XS, W, Y, Bias, Res, N, NB, ROW_BYTES,
                    FMT: tl.constexpr, TS: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, L: tl.constexpr = 2,
                    PDL: tl.constexpr = False):
    tl.static_assert((FMT == 2) or (FMT == 6) or (FMT == 8), "lanes32: q4_0, q5_0 or q8_0")
    tl.static_assert(G % 2 == 0, "lanes32: an even number of blocks a step (each block keeps its alignment)")
    wait_and_release(PDL)  # x (and the residual) come from the kernels before (glmtg/kernels/pdl.py)
    B: tl.constexpr = BLOCK_N * G
    idx = tl.arange(0, B)
    g = idx % G
    rows_in = tl.minimum(tl.program_id(0) * BLOCK_N + idx // G, N - 1)  # rows past N read row N - 1
    off = rows_in.to(tl.int64) * ROW_BYTES + g * TS  # loop-invariant; a step moves W by a scalar
    all_blocks = idx >= 0
    acc = tl.zeros((B,), tl.float32)
    full = NB // G
    for k in range(full):
        acc += blocks32(W + k * (G * TS), off, all_blocks, XW, DX, XS, g + k * G, FMT, L, False)
    if full * G < NB:  # the last, partial step
        acc += blocks32(W + full * (G * TS), off, (full * G + g) < NB, XW, DX, XS, g + full * G, FMT, L, True)
    store_row(tl.sum(tl.reshape(acc, [BLOCK_N, G]), axis=1), Y, Bias, Res, N, BLOCK_N, HAS_BIAS, HAS_RES)


def launch(codes: torch.Tensor, dx: torch.Tensor, sums: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
           bias: torch.Tensor | None, residual: torch.Tensor | None, fmt_type: int, type_size: int, nb: int,
           block_n: int, blocks_per_step: int, num_warps: int, split: int) -> None:
    """Run the dense kernel for one token (operands checked by mmvq): ``out`` [1, N]; ``split`` L from
    ``lanes32_split``. At least 2 blocks a step (an even number: every block keeps its alignment)."""
    n = weight.shape[0]
    _lanes32_kernel[(triton.cdiv(n, block_n),)](
        codes.view(torch.int32), dx, sums, weight, out, out if bias is None else bias,
        out if residual is None else residual, n, nb, weight.shape[1],
        FMT=fmt_type, TS=type_size, BLOCK_N=block_n, G=max(blocks_per_step, 2), HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, L=split, PDL=enabled(out.device), num_warps=num_warps,
        **launch_kwargs(out.device),
    )
