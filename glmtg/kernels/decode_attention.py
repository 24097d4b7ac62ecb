"""Split-KV decode attention for any GQA ratio.

One program owns one KV head of one sequence over one slice of its context, and puts *all* query
rows that read that KV head (GROUP heads x Sq new tokens) into a single tile, so every K/V byte is
loaded once per step whatever the ratio (12, 24, 6, 5, 1...). Padding rows up to the tile height are
masked. A second kernel merges the slices by log-sum-exp (flash-decoding).

Deep q4_0 caches on Hopper stream through a hand-written CUDA loop instead (decode_quant_cuda, see
plan_launch), which writes the same partials for the same merge kernel.

The launch grid depends only on shapes and on the context length the caller *declares*
(``max_context``), never on the values in ``lengths``: each program derives its slice from the live
length on the device, so one decode step can be captured in a CUDA graph and replayed as lengths grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glmtg.kernels import decode_quant_cuda

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GROUP = 128
LOG2E = 1.4426950408889634
MERGE_SPLIT_BLOCK = 256  # partials the merge loads at once; more splits than this take two passes
CUDA_WARPS_PER_SM = 8  # plan of the CUDA loop for quantized caches (see plan_launch)
CUDA_MIN_TOKENS = 64


@triton.jit
def _load(ptrs, mask, other, MASKED: tl.constexpr):
    """tl.load, predicated only where the tile may run past the slice (its last tile)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    else:
        return tl.load(ptrs)


@triton.jit
def _slicing(Lengths, b, capacity, NUM_SPLITS, BLOCK_N: tl.constexpr):
    """(live length, tokens per slice) of sequence b; the attention and merge kernels must agree.

    The length is clamped so that a bad value can never address memory outside the cache.
    """
    length = tl.minimum(tl.maximum(tl.load(Lengths + b), 0), capacity)
    return length, tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _token_slots(PageTable, b, offs_n, mask_n, stride_pt_b, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                 MASKED: tl.constexpr):
    """(page, slot) of each token, int64: the storage row it lives in, shared by K, V and their scales.

    Contiguous caches have one "page" per sequence. Tokens of one tile may straddle pages when
    PAGE_SIZE < BLOCK_N, so paged caches translate per token; the page-table reads stay in L1/L2.
    """
    if PAGED:
        page = _load(PageTable + b * stride_pt_b + offs_n // PAGE_SIZE, mask_n, 0, MASKED).to(tl.int64)
        slot = (offs_n % PAGE_SIZE).to(tl.int64)
    else:
        slot = offs_n.to(tl.int64)
        page = slot * 0 + b
    return page, slot


@triton.jit
def _fp8_to_f16(codes):
    """e4m3 codes as fp16 (exact), two per cvt, converted where loaded (IN_ROWS of _q8_0_to_f16)."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b16 lo, hi;
        mov.b32 {lo, hi}, $2;
        cvt.rn.f16x2.e4m3x2 $0, lo;
        cvt.rn.f16x2.e4m3x2 $1, hi;
        }
        """,
        constraints="=r,=r,r",
        args=[codes],
        dtype=tl.float16, is_pure=False, pack=4,
    )


@triton.jit
def _word_byte_order(j):
    """Byte index at position j when each 4-byte word's bytes come in the order 0, 2, 1, 3.

    That is the order in which _q4_0_to_f16 emits a word's nibbles (one LOP3 per two values needs the
    two bytes 16 bits apart); the plain path loads its bytes in the same order so both give one tile.
    """
    return (j // 4) * 4 + (j % 2) * 2 + (j // 2) % 2


@triton.jit
def _q4_0_order(offs):
    """Head-dim index of position ``offs`` of a dequantized q4_0 tile.

    Unpacking joins each byte's two nibbles side by side, in _word_byte_order, so a 32-value block
    comes out as (q[0], q[16], q[2], q[18], q[1], q[17], q[3], q[19], ...). Rather than shuffle the
    tile, the kernel reads q in this order (for K) and writes output columns in this order (for V): a
    dot product does not care.
    """
    return (offs // 32) * 32 + _word_byte_order((offs % 32) // 2) + (offs % 2) * 16


@triton.jit
def _q8_0_to_f16(codes, d, IN_ROWS: tl.constexpr):
    """int8 codes times their fp16 block scale, as fp16, without int->float conversion instructions.

    sm_90 converts int8 -> float at a quarter of the FP32 rate (16 per clock per SM), which made the
    q8_0 loop compute-bound. Here each byte b becomes the fp16 bit pattern 0x6400 | (b + 128), i.e.
    1024 + b + 128 exactly, by one byte permute per two values; subtracting 1152 leaves b exactly, and
    one packed multiply applies the scale (rounded once, as fp16(b * d) would be).

    IN_ROWS declares the op impure, so that Triton converts the tile where it is loaded, in rows, and
    hands the fp16 tile to the dot through shared memory (stmatrix/ldmatrix, transposed for V). A pure
    op it moves past the layout change to the narrow codes, and V's transposed 8-bit operand is then
    gathered from shared memory byte by byte (64 LDS.U8 + packing per 16-token tile). In rows, the
    one-warp q8_0 loop has 562 instructions instead of 779 (212 registers instead of 244) but ran
    slower at depth on the H100 (96/8 64k 69.8 vs 63.4 us: a second shared-memory round trip in a
    latency-bound loop), so it is an option (DecodeLaunch.dequant_in_rows), off by default.
    """
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t, k, bias;
        xor.b32 t, $4, 0x80808080;
        mov.b32 k, 0x64646464;
        mov.b32 bias, 0x64806480;
        prmt.b32 $0, t, k, 0x4140;
        prmt.b32 $1, t, k, 0x4342;
        sub.rn.f16x2 $0, $0, bias;
        sub.rn.f16x2 $1, $1, bias;
        mul.rn.f16x2 $0, $0, $2;
        mul.rn.f16x2 $1, $1, $3;
        }
        """,
        constraints="=r,=r,r,r,r",
        args=[d, codes],
        dtype=tl.float16, is_pure=not IN_ROWS, pack=4,
    )


@triton.jit
def _q4_0_to_f16(packed, d):
    """(low, high) nibbles of q4_0 bytes as fp16 (q - 8) * d, bytes in _word_byte_order.

    One LOP3 per two values, (word & 0x000F000F) | 0x6400_6400, reads 1024 + q in both halves
    (bytes 0 and 2; the word shifted right by 8 gives bytes 1 and 3); subtracting 1032 leaves q - 8.
    High nibbles the same with mask 0x00F000F0: 1024 + 16 q, and one fma by 1/16 and -72 gives q - 8.
    All exact; the scale multiply rounds once, as fp16(q * d) would.
    """
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 odd, bias, sixteenth, hi_bias;
        mov.b32 bias, 0x64086408;
        mov.b32 sixteenth, 0x2C002C00;
        mov.b32 hi_bias, 0xD480D480;
        shr.b32 odd, $6, 8;
        lop3.b32 $0, $6, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $1, odd, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $2, $6, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 $3, odd, 0x00F000F0, 0x64006400, 0xEA;
        sub.rn.f16x2 $0, $0, bias;
        sub.rn.f16x2 $1, $1, bias;
        fma.rn.f16x2 $2, $2, sixteenth, hi_bias;
        fma.rn.f16x2 $3, $3, sixteenth, hi_bias;
        mul.rn.f16x2 $0, $0, $4;
        mul.rn.f16x2 $1, $1, $5;
        mul.rn.f16x2 $2, $2, $4;
        mul.rn.f16x2 $3, $3, $5;
        }
        """,
        constraints="=r,=r,=r,=r,r,r,r",
        args=[d, packed],
        dtype=(tl.float16, tl.float16), is_pure=True, pack=4,
    )


@triton.jit
def _block_scales(Scale, scale_rows, m, BLOCKS: tl.constexpr, MASKED: tl.constexpr):
    """The fp16 block scales [n, BLOCKS] of n token rows, read as int32 words (two scales each).

    Loads narrower than 32 bits are neither vectorized nor software-pipelined by Triton (cp.async moves
    4, 8 or 16 bytes), so 2-byte scale loads stalled every iteration of the q4_0 loop. ``Scale`` is the
    scale tensor viewed as int32, ``scale_rows`` counted in words; the low half of a word is the
    even block (little-endian).
    """
    # Each word is read once per block it holds (two 4-byte loads of one address hit the same sector)
    # and split by shifts: the tl.join + tl.reshape form of this miscompiled with 16-token tiles on
    # sm_90 (the same pattern as the q4_0 fault noted in decode_attention()).
    offs_b = tl.arange(0, BLOCKS)
    words = _load(Scale + scale_rows[:, None] + (offs_b // 2)[None, :], m, 0, MASKED)
    halves = (words >> ((offs_b % 2) * 16)[None, :]) & 0xFFFF
    return halves.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _load_kv_tile(Data, Scale, rows, scale_rows, mask_n,
                  HEAD_DIM: tl.constexpr, FORMAT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  ASM_DEQUANT: tl.constexpr, MASKED: tl.constexpr = True):
    """Load a [BLOCK_N, HEAD_DIM] tile and dequantize it in registers to the dtype of the dot.

    Every load is a plain contiguous row segment (codes) or a short row of block scales; scales are
    broadcast in registers. fp8's per-row scale is not applied here: the caller folds it into the
    [rows, BLOCK_N] scores (K) or probabilities (V), which is HEAD_DIM / BLOCK_M times less work.
    Rows past the slice read as 0 (codes and scales alike): V rows beyond the context may hold
    anything (even NaN), and 0 * NaN would poison the accumulator even where p == 0.
    ASM_DEQUANT (GPU, fp16 dots): q8_0/q4_0 codes go to fp16 by bit tricks in inline PTX rather than
    through int -> fp32 -> fp16 conversions; the interpreter (CPU tests) takes the plain path (0).
    1: the compiler places the conversion; 2: q8_0 and fp8 tiles are converted where loaded, in rows
    (see _q8_0_to_f16).
    """
    m = mask_n[:, None]
    BLOCKS: tl.constexpr = HEAD_DIM // 32
    if FORMAT == 0:  # f16 / bf16 / f32, stored as the queries are
        offs_d = tl.arange(0, HEAD_DIM)
        return _load(Data + rows[:, None] + offs_d[None, :], m, 0.0, MASKED)
    elif FORMAT == 3:  # fp8 e4m3 codes; the row scale is applied by the caller
        offs_d = tl.arange(0, HEAD_DIM)
        codes = _load(Data + rows[:, None] + offs_d[None, :], m, 0.0, MASKED)
        if ASM_DEQUANT == 2:
            return _fp8_to_f16(codes)
        return codes.to(DOT_DTYPE)
    else:
        n: tl.constexpr = rows.shape[0]
        d = _block_scales(Scale, scale_rows, m, BLOCKS, MASKED)
        if ASM_DEQUANT:
            if FORMAT == 1:  # q8_0: int8 codes, fp16 d per 32 values
                offs_d = tl.arange(0, HEAD_DIM)
                codes = _load(Data + rows[:, None] + offs_d[None, :], m, 0, MASKED)
                d_full = tl.reshape(tl.broadcast_to(d[:, :, None], (n, BLOCKS, 32)), (n, HEAD_DIM))
                return _q8_0_to_f16(codes, d_full, ASM_DEQUANT == 2)
            else:  # q4_0: byte j of a block = q[j] | q[j + 16] << 4
                offs_h = tl.arange(0, HEAD_DIM // 2)
                packed = _load(Data + rows[:, None] + offs_h[None, :], m, 0, MASKED)
                d_half = tl.reshape(tl.broadcast_to(d[:, :, None], (n, BLOCKS, 16)), (n, HEAD_DIM // 2))
                lo, hi = _q4_0_to_f16(packed, d_half)
                return tl.reshape(tl.join(lo, hi), (n, HEAD_DIM))
        d = d.to(tl.float32)
        if FORMAT == 1:  # q8_0: int8 codes, fp16 d per 32 values
            offs_d = tl.arange(0, HEAD_DIM)
            codes = _load(Data + rows[:, None] + offs_d[None, :], m, 0, MASKED).to(tl.float32)
        else:  # q4_0: 16 bytes per block, byte j = q[j] | q[j + 16] << 4, value (q - 8) * d
            offs_h = _word_byte_order(tl.arange(0, HEAD_DIM // 2))  # the asm path's tile order
            packed = _load(Data + rows[:, None] + offs_h[None, :], m, 0, MASKED).to(tl.int32)
            codes = tl.join((packed & 0xF) - 8, (packed >> 4) - 8).to(tl.float32)  # [N, D/2, 2]
        codes = tl.reshape(codes, (n, BLOCKS, 32))
        return tl.reshape(codes * d[:, :, None], (n, HEAD_DIM)).to(DOT_DTYPE)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
                 stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
                 stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
                 SQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                 PAGED: tl.constexpr, K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr, IEEE_DOT: tl.constexpr,
                 ASM_DEQUANT: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over tokens [n0, n0 + BLOCK_N); MASKED for a tile that may pass ``end``."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < end
    page, slot = _token_slots(PageTable, b, offs_n, mask_n, stride_pt_b, PAGE_SIZE, PAGED, MASKED)
    k_rows = page * stride_kp + hkv * stride_kh + slot * stride_kn  # element offsets of each token row
    k_scale_rows = page * stride_ksp + hkv * stride_ksh + slot * stride_ksn
    k = _load_kv_tile(K, KScale, k_rows, k_scale_rows, mask_n, HEAD_DIM, K_FORMAT, q.dtype,
                      ASM_DEQUANT, MASKED)
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if K_FORMAT == 3:  # fp8: the row scale multiplies the scores, not every loaded value
        s = s * _load(KScale + k_scale_rows, mask_n, 0.0, MASKED)[None, :]
    s = s * scale_log2
    if SQ > 1:
        s = tl.where(offs_n[None, :] <= last_key[:, None], s, float("-inf"))
    if MASKED:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row may see no key yet (causal rows, empty slice): keep exp2 away from -inf - -inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_rows = page * stride_vp + hkv * stride_vh + slot * stride_vn
    v_scale_rows = page * stride_vsp + hkv * stride_vsh + slot * stride_vsn
    v = _load_kv_tile(V, VScale, v_rows, v_scale_rows, mask_n, HEAD_DIM, V_FORMAT, q.dtype,
                      ASM_DEQUANT, MASKED)
    if V_FORMAT == 3:  # fp8: the row scale multiplies the probabilities
        p = p * _load(VScale + v_scale_rows, mask_n, 0.0, MASKED)[None, :]
    if IEEE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _decode_attention_kernel(
    Q, K, V, KScale, VScale, Out, Lse, PartialO, PartialLse, Lengths, PageTable,
    stride_qb, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh,
    stride_kp, stride_kh, stride_kn,
    stride_vp, stride_vh, stride_vn,
    stride_ksp, stride_ksh, stride_ksn,
    stride_vsp, stride_vsh, stride_vsn,
    stride_pt_b,
    scale_log2,
    capacity,
    NUM_SPLITS,
    SQ: tl.constexpr, GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr,
    DIRECT_OUT: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE_DOT: tl.constexpr, USE_PDL: tl.constexpr,
    FP16_DOT: tl.constexpr, ASM_DEQUANT: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    m_tile = tl.program_id(2)
    b = bh // NUM_KV_HEADS
    hkv = bh % NUM_KV_HEADS

    length, chunk = _slicing(Lengths, b, capacity, NUM_SPLITS, BLOCK_N)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    if not DIRECT_OUT:
        if start >= end:
            return  # the merge kernel knows this slice is empty and never reads it

    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * SQ
    tok = rows // GROUP  # rows are token-major: row = tok * GROUP + g
    q_head = hkv * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qs + q_head.to(tl.int64) * stride_qh
    # Sq > 1 (speculative verification): new token t sits at position length - SQ + t.
    last_key = length - SQ + tok

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # q4_0 tiles come out in nibble order (see _q4_0_order): q is read, and the output written, in it.
    q_cols = _q4_0_order(offs_d) if K_FORMAT == 2 else offs_d
    out_cols = _q4_0_order(offs_d) if V_FORMAT == 2 else offs_d
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    q = tl.load(Q + q_rows[:, None] + q_cols[None, :], mask=row_valid[:, None], other=0.0)
    if FP16_DOT:
        q = q.to(tl.float16)
    # Whole tiles run without per-token predicates (fewer instructions in the loop); only the slice's
    # last, partial tile is masked. Slices start on a tile boundary (see _slicing).
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            SQ, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT, False)
    if full_end < end:
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, full_end, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            SQ, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT, True)

    if USE_PDL:
        # Streaming is done: let the merge kernel launch now; it waits for our stores itself.
        tl.extra.cuda.gdc_launch_dependents()
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse2 = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("-inf"))
    o_rows = b.to(tl.int64) * stride_ob + tok.to(tl.int64) * stride_os + q_head.to(tl.int64) * stride_oh
    lse_off = (b * SQ + tok) * (NUM_KV_HEADS * GROUP) + q_head
    if DIRECT_OUT:
        out = acc / l_safe[:, None]
        tl.store(Out + o_rows[:, None] + out_cols[None, :], out.to(Out.dtype.element_ty), mask=row_valid[:, None])
        if WRITE_LSE:
            tl.store(Lse + lse_off, lse2 / 1.4426950408889634, mask=row_valid)
    else:
        part = (bh.to(tl.int64) * NUM_SPLITS + split) * M_PAD + rows
        tl.store(PartialO + part[:, None] * HEAD_DIM + out_cols[None, :], acc / l_safe[:, None],
                 mask=row_valid[:, None])
        tl.store(PartialLse + part, lse2, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    Out, Lse, PartialO, PartialLse, Lengths,
    stride_ob, stride_os, stride_oh,
    capacity,
    NUM_SPLITS,
    SQ: tl.constexpr, GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, M_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_PASS: tl.constexpr, WRITE_LSE: tl.constexpr, USE_PDL: tl.constexpr,
):
    # One program per (KV head, query row, slice of head_dim): many small programs, each loading all
    # of its partials at once, so the merge costs one round trip rather than one per split.
    bh = tl.program_id(0)
    row = tl.program_id(1)
    d_blk = tl.program_id(2)
    b = bh // NUM_KV_HEADS
    hkv = bh % NUM_KV_HEADS
    # The attention kernel's slicing, to visit only the slices that ran.
    length, chunk = _slicing(Lengths, b, capacity, NUM_SPLITS, BLOCK_N)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # launched early; the partials are only valid past this point
    n_active = tl.cdiv(length, tl.maximum(chunk, 1))

    offs_d = d_blk * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, SPLIT_BLOCK)
    base = bh.to(tl.int64) * NUM_SPLITS * M_PAD + row
    if ONE_PASS:
        # All partials fit one block: issue the log-sum-exps and the outputs together (one round trip
        # to L2 rather than two, ~0.5 us of every split launch's tail).
        live = offs_s < n_active
        part = base + offs_s.to(tl.int64) * M_PAD
        lse = tl.load(PartialLse + part, mask=live, other=float("-inf"))
        o = tl.load(PartialO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0)
        m_all = tl.max(lse, 0)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        w = tl.math.exp2(lse - m_safe)
        acc = tl.sum(w[:, None] * o, 0)
        denom = tl.sum(w, 0)
    else:
        m_all = float("-inf")
        for s0 in range(0, n_active, SPLIT_BLOCK):
            splits = s0 + offs_s
            lse = tl.load(PartialLse + base + splits.to(tl.int64) * M_PAD, mask=splits < n_active,
                          other=float("-inf"))
            m_all = tl.maximum(m_all, tl.max(lse, 0))
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        denom = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, n_active, SPLIT_BLOCK):
            splits = s0 + offs_s
            live = splits < n_active
            part = base + splits.to(tl.int64) * M_PAD
            w = tl.math.exp2(tl.load(PartialLse + part, mask=live, other=float("-inf")) - m_safe)
            o = tl.load(PartialO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0)
            acc += tl.sum(w[:, None] * o, 0)
            denom += tl.sum(w, 0)

    tok = row // GROUP
    q_head = hkv * GROUP + row % GROUP
    out = acc / tl.where(denom > 0.0, denom, 1.0)
    o_off = b.to(tl.int64) * stride_ob + tok * stride_os + q_head * stride_oh
    tl.store(Out + o_off + offs_d, out.to(Out.dtype.element_ty))
    if WRITE_LSE:
        if d_blk == 0:
            lse2 = tl.where(denom > 0.0, m_safe + tl.math.log2(tl.where(denom > 0.0, denom, 1.0)),
                            float("-inf"))
            tl.store(Lse + (b * SQ + tok) * (NUM_KV_HEADS * GROUP) + q_head, lse2 / 1.4426950408889634)


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile shape and split count of one launch (all derived from shapes, never from lengths)."""

    block_m: int
    m_tiles: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int
    pdl: bool = False  # programmatic dependent launch of the merge kernel (Hopper+, CUDA only)
    # Quantized K and V: dot products in fp16 rather than q's dtype (fp8 -> fp16 converts cheaply on
    # sm_90, fp8 -> bf16 does not: fp8 64k 86 -> 69 us on the H100). Queries are rounded to fp16, which
    # assumes |q| < 65504 (true of normed, rotated GLM queries); codes * scales gain mantissa bits.
    fp16_dot: bool = True
    # q8_0/q4_0 codes -> fp16 by bit tricks in inline PTX (CUDA only, with fp16 dots); see _q8_0_to_f16.
    asm_dequant: bool = True
    # q8_0/fp8 tiles converted where loaded, so V reaches the dot by ldmatrix.trans rather than byte
    # gathers: fewer instructions, but slower at depth on the H100 when last measured (_q8_0_to_f16).
    dequant_in_rows: bool = False
    # Register cap per thread (CUDA): lets more one-warp programs share an SM; None = the compiler's choice.
    maxnreg: int | None = None
    # The CUDA loop for quantized K and V (decode_quant_cuda): one warp per slice, 16-token steps.
    cuda_loop: bool = False


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: keep the split machinery exercised with a few slices
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def plan_launch(
    batch: int, num_kv_heads: int, rows: int, head_dim: int, max_context: int, device: torch.device,
    *, num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, ctas_per_sm: int | None = None, min_tokens_per_split: int | None = None,
    pdl: bool | None = None, cache_format: str | None = None, cuda_loop: bool = False,
    block_m: int | None = None,
) -> DecodeLaunch:
    """Choose tile sizes and the split count from shapes and the declared context.

    The programs of one launch should fill the GPU in a single wave: ``ctas_per_sm`` programs per
    SM (two when there are at least 8 KV heads to share out, one otherwise, since fewer slices mean
    fewer partials to merge), rounded *down* so that no second, mostly idle wave is started. Slices
    never get shorter than ``min_tokens_per_split`` tokens of the declared context (128 while the
    whole launch fits one program per SM, else 256): each slice costs a partial write and a merge
    read, which would dominate short contexts. Measured on the H100 in
    bench/results/decode_attention_tune.json.

    ``cache_format`` names the quantized format of the cache ("q4_0" or "q8_0" if either K or V uses
    one, else "fp8"), whose loops are bound by dequantization latency rather than by memory
    (bench/results/quant_tune_2026-11-25.json). At head_dim 128, q8_0/q4_0 run one-warp programs,
    eight per SM, when the context gives at least four per SM (no cross-warp reductions or barriers in
    the loop, and independent warps hide each other's latency); otherwise, like fp8, four warps on
    128-token tiles with more programs per SM than bf16 uses where slices are long, bf16's plan where not.

    ``cuda_loop`` says that the CUDA kernel for quantized K and V can run these arguments
    (decode_quant_cuda.supports). It is planned where it was measured faster than the Triton kernel
    (H100; bench/results/cuda_variants_2026-11-25.json, cuda_plan_q4_0_2026-11-25.json): q4_0 caches
    at head_dim 128, up to 32 rows, contexts of 8k or more and at least 128k tokens over all (sequence,
    KV head, 16-row tile) triples. Loop vs Triton, us: 96/8 at 16k 23.5 vs 30.4, at 64k 53.0 vs 75.6; 48/4 at 64k
    33.5 vs 48.6; 24/2 at 64k 24.9 vs 30.3; 12/1 at 128k 27.1 vs 32.2; 48/2 (two 16-row tiles) at 32k
    25.0 vs 28.9, at 64k 32.6 vs 51.2. Below 128k tokens Triton was as
    fast or faster (48/4 at 16k 18.8 vs 17.3, 12/1 at 64k 22.0 vs 17.5, 24/2 at 16k a tie). One warp
    per 16 rows and slice, ``CUDA_WARPS_PER_SM`` slices per SM (its ~230 registers a thread allow eight), slices of
    at least ``CUDA_MIN_TOKENS`` tokens. q8_0 and fp8 keep Triton: its one-warp programs beat the loop
    wherever both were timed (q8_0 96/8 at 16k 22.5 vs 26.3 us, 24/2 at 64k 22.6 vs 28.0; fp8 96/8 at
    64k 61.3 vs 65.5). ``DecodeLaunch(cuda_loop=True)`` (cuda_loop_launch) runs any format.
    """
    _check(cache_format is None or cache_format in KV_FORMATS,
           f"cache_format must be None or one of {KV_FORMATS}, got {cache_format!r}")
    m_cap = 128 if head_dim <= 128 else 64
    _check(block_m is None or (block_m >= 16 and block_m & (block_m - 1) == 0 and block_m <= m_cap),
           f"block_m must be a power of two in [16, {m_cap}], got {block_m!r}")
    tuned = (num_splits, block_n, num_warps, num_stages, ctas_per_sm, min_tokens_per_split) != (None,) * 6
    if (block_m is None and cache_format == "q8_0" and head_dim == 128 and 16 < rows <= 32 and not tuned
            and batch * num_kv_heads * max_context >= 65536):
        # Groups of 17-32 rows (48/2: 24) in two 16-row tiles, so that one-warp programs run them: at 48/2
        # 32k 19.3 vs 21.8 us, 64k 32.2 vs 39.4, 128k 50.7 vs 61.9; at 16k the 32-row tile stays faster.
        block_m = 16
    if block_m is None:
        block_m = max(16, triton.next_power_of_2(min(rows, m_cap)))
    m_tiles = triton.cdiv(rows, block_m)
    sms = _sm_count(device)
    work = batch * num_kv_heads * m_tiles
    if pdl is None:
        pdl = _pdl_default(device)
    quantized = cache_format in ("q8_0", "q4_0", "fp8")
    loop_work = batch * num_kv_heads * triton.cdiv(rows, decode_quant_cuda.ROWS)  # the loop's warps per slice
    if (cuda_loop and cache_format == "q4_0" and head_dim == decode_quant_cuda.HEAD_DIM
            and rows <= 2 * decode_quant_cuda.ROWS and not tuned and max_context >= 8192
            and loop_work * max_context >= 131072):
        return cuda_loop_launch(batch, num_kv_heads, max_context, device, rows=rows, pdl=pdl)
    # Measured and GPU-tested at head_dim 128 (GLM's); other head dims keep the bf16 plan.
    if cache_format in ("q8_0", "q4_0") and head_dim == 128 and block_m <= 16 and not tuned:
        # Tokens per tile: the fastest of the one-warp sweeps for each format. Eight programs per SM:
        # the one-warp programs take 230-245 registers a thread, so no more than eight fit.
        tile, per_sm = (16, 8) if cache_format == "q8_0" else (32, 8)
        one_warp_splits = max(1, min(per_sm * sms // work, triton.cdiv(max_context, 256)))
        # q8_0 one-warp programs beat the four-warp plan from one per SM (24/2 at 64k, 512 programs:
        # 22.6 vs 35.2 us; 12/1 at 64k, 256: 18.3 vs 19.9; bench/results/quant_tune_q8_0_one_warp_*);
        # q4_0's threshold stays where it was measured.
        if one_warp_splits * work >= (sms if cache_format == "q8_0" else 4 * sms):
            return DecodeLaunch(block_m, m_tiles, tile, one_warp_splits, 1, 3, pdl)
    # Quantized caches take more programs per SM and 128-token tiles, but only where the slices the
    # bf16 plan would cut are long (>= 256 tokens): at short contexts the extra slices cost more in
    # partials and merging than they win (measured: 12/1 at 16k 12.4 -> 15.0 us with them).
    deep_quantized = (quantized and head_dim == 128 and num_splits is None and ctas_per_sm is None
                      and max_context // _splits(work, 2 if work >= 8 else 1, sms, max_context, None) >= 256)
    if num_splits is None:
        if ctas_per_sm is None:
            ctas_per_sm = (2 if cache_format == "fp8" and work >= 8 else 4) if deep_quantized else (2 if work >= 8 else 1)
        num_splits = _splits(work, ctas_per_sm, sms, max_context, min_tokens_per_split)
    long_slices = max_context // num_splits >= 3072
    if block_n is None:
        if deep_quantized:
            block_n = 128
        else:
            block_n = {64: 128, 128: 128 if long_slices else 64, 256: 32}[head_dim]
    if num_warps is None:
        num_warps = 4 if block_m <= 64 else 8
    if num_stages is None:
        num_stages = 3 if deep_quantized else (2 if (long_slices or head_dim > 128) else 3)
    return DecodeLaunch(block_m, m_tiles, block_n, num_splits, num_warps, num_stages, pdl)


def cuda_loop_launch(batch: int, num_kv_heads: int, max_context: int, device: torch.device, *,
                     rows: int = decode_quant_cuda.ROWS, warps_per_sm: int = CUDA_WARPS_PER_SM,
                     min_tokens_per_split: int = CUDA_MIN_TOKENS, pdl: bool | None = None) -> DecodeLaunch:
    """A launch of the CUDA loop (decode_quant_cuda), whatever the format: ``warps_per_sm`` one-warp
    slices per SM, each of at least ``min_tokens_per_split`` tokens; ``rows`` query rows per KV head
    (GQA group x new tokens) take ceil(rows / 16) warps per slice. plan_launch picks it where it was
    measured faster; benchmarks and tests call it directly for every format."""
    _check(min(batch, num_kv_heads, max_context, rows, warps_per_sm, min_tokens_per_split) >= 1,
           f"cuda_loop_launch needs positive sizes, got batch={batch}, num_kv_heads={num_kv_heads}, "
           f"max_context={max_context}, rows={rows}, warps_per_sm={warps_per_sm}, "
           f"min_tokens_per_split={min_tokens_per_split}")
    m_tiles = triton.cdiv(rows, decode_quant_cuda.ROWS)
    work = batch * num_kv_heads * m_tiles
    splits = max(1, min(warps_per_sm * _sm_count(device) // work, triton.cdiv(max_context, min_tokens_per_split)))
    return DecodeLaunch(decode_quant_cuda.ROWS, m_tiles, decode_quant_cuda.TILE, splits, 1, 1,
                        _pdl_default(device) if pdl is None else pdl, cuda_loop=True)


def _pdl_default(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9


def plan_format(k_format: str | None, v_format: str | None) -> str | None:
    """The ``cache_format`` to plan a launch for: the costlier to dequantize of K's and V's formats."""
    return next((f for f in ("q4_0", "q8_0", "fp8") if f in (k_format, v_format)), None)


def _splits(work: int, ctas_per_sm: int, sms: int, max_context: int, min_tokens_per_split: int | None) -> int:
    num_splits = max(1, (ctas_per_sm * sms) // work)
    if min_tokens_per_split is None:
        min_tokens_per_split = 128 if num_splits * work <= sms else 256
    return max(1, min(num_splits, triton.cdiv(max_context, min_tokens_per_split)))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


# Cache formats the kernel reads: data dtype, stored values per token row (as a function of D),
# and the scale tensor's dtype and trailing shape.
_FORMATS = {
    "q8_0": (1, torch.int8, lambda d: d, torch.float16, lambda d: (d // 32,)),
    "q4_0": (2, torch.uint8, lambda d: d // 2, torch.float16, lambda d: (d // 32,)),
    "fp8": (3, torch.float8_e4m3fn, lambda d: d, torch.float32, lambda d: ()),
}
KV_FORMATS = ("f16", "bf16", "q8_0", "q4_0", "fp8")


def _check_store(name: str, data: torch.Tensor, scale: torch.Tensor | None, fmt: str | None,
                 q: torch.Tensor) -> int:
    """Validate one cache tensor (and its scales); return the kernel's format code."""
    _check(isinstance(data, torch.Tensor) and data.dim() == 4,
           f"{name} must be a 4-D tensor [B or pages, Hkv, tokens, D], got {_shape(data)}")
    _check(data.device == q.device, f"{name} is on {data.device} but q is on {q.device}")
    head_dim = q.shape[3]
    if fmt is None or fmt in ("f16", "bf16"):
        _check(fmt is None or data.dtype == {"f16": torch.float16, "bf16": torch.bfloat16}[fmt],
               f"{name} dtype {data.dtype} does not hold format {fmt!r}")
        _check(data.dtype == q.dtype, f"{name} dtype {data.dtype} must equal q dtype {q.dtype} "
               "(or name a quantized format)")
        _check(scale is None, f"{name} is a plain float cache and takes no scale tensor")
        _check(data.shape[3] == head_dim, f"{name} head_dim {data.shape[3]} != q head_dim {head_dim}")
        _check(data.stride(3) == 1, f"{name} must have a contiguous last dimension, strides {data.stride()}")
        return 0
    _check(fmt in _FORMATS, f"{name} format must be one of {KV_FORMATS}, got {fmt!r}")
    code, dtype, row_len, scale_dtype, scale_tail = _FORMATS[fmt]
    _check(q.dtype in (torch.float16, torch.bfloat16), f"a {fmt} cache needs fp16 or bf16 queries, got {q.dtype}")
    _check(data.dtype == dtype, f"{name} ({fmt}) must be {dtype}, got {data.dtype}")
    _check(data.shape[3] == row_len(head_dim),
           f"{name} ({fmt}) rows must hold {row_len(head_dim)} values for head_dim {head_dim}, got {data.shape[3]}")
    _check(data.stride(3) == 1, f"{name} must have a contiguous last dimension, strides {data.stride()}")
    want = (*data.shape[:3], *scale_tail(head_dim))
    _check(isinstance(scale, torch.Tensor) and scale.dtype == scale_dtype and tuple(scale.shape) == want,
           f"{name} ({fmt}) needs a {scale_dtype} scale tensor of shape {want}, got "
           f"{scale.dtype if isinstance(scale, torch.Tensor) else None} {_shape(scale)}")
    _check(scale.device == q.device, f"{name} scale is on {scale.device} but q is on {q.device}")
    _check(len(scale_tail(head_dim)) == 0 or scale.stride(3) == 1, f"{name} scale must have a contiguous last dimension")
    return code


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    page_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_format: str | None = None,
    v_format: str | None = None,
    scale: float | None = None,
    max_context: int | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    validate: bool = True,
    launch: DecodeLaunch | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of Sq new tokens per sequence over their KV cache.

    q: [B, Sq, Hq, D]. Contiguous cache: k_cache/v_cache [B, Hkv, Nmax, D]. Paged cache:
    [num_pages, Hkv, page_size, D] with ``page_table`` int32 [B, max_pages]. ``lengths`` int32 [B]
    on q's device counts the cached tokens of each sequence *including* the Sq new ones, which are
    causal among themselves. Returns out [B, Sq, Hq, D] in q's dtype, and with ``return_lse`` the
    natural-log log-sum-exp of the scaled scores, fp32 [B, Sq, Hq].

    Quantized caches (glmtg.kv_cache's planar layout) are read directly and dequantized in
    registers: ``k_format``/``v_format`` "q8_0" (int8 codes [.., D], fp16 ``*_scale`` [.., D/32]),
    "q4_0" (uint8 [.., D/2] packed as llama.cpp's blocks, fp16 scale [.., D/32]) or "fp8"
    (float8_e4m3fn [.., D], fp32 scale per row [..]). K and V formats may differ.

    ``max_context`` (default: the cache capacity) sets the split count; it should be the longest
    context the caller will run with these shapes. ``validate`` reads ``lengths`` and the page table
    on the host to reject bad values; it is skipped during CUDA-graph capture (the kernel still
    clamps lengths to the cache, so a bad value can never read outside it).
    """
    _check(isinstance(q, torch.Tensor) and q.dim() == 4, f"q must be a 4-D tensor [B, Sq, Hq, D], got {_shape(q)}")
    _check(q.dtype in SUPPORTED_DTYPES, f"q dtype {q.dtype} is not one of {SUPPORTED_DTYPES}")
    batch, sq, num_q_heads, head_dim = q.shape
    _check(head_dim in SUPPORTED_HEAD_DIMS, f"head_dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
    _check(batch >= 1 and sq >= 1, f"q must have B >= 1 and Sq >= 1, got {tuple(q.shape)}")
    _check(q.stride(3) == 1, f"q must have a contiguous last dimension, strides {q.stride()}")
    k_code = _check_store("k_cache", k_cache, k_scale, k_format, q)
    v_code = _check_store("v_cache", v_cache, v_scale, v_format, q)
    _check(v_cache.shape[:3] == k_cache.shape[:3],
           f"v_cache shape {tuple(v_cache.shape)} must match k_cache shape {tuple(k_cache.shape)} in the first 3 dims")
    _check(isinstance(lengths, torch.Tensor) and lengths.device == q.device,
           f"lengths is on {getattr(lengths, 'device', None)} but q is on {q.device}")
    num_kv_heads = k_cache.shape[1]
    _check(num_kv_heads >= 1 and num_q_heads % num_kv_heads == 0,
           f"q heads ({num_q_heads}) must be a multiple of cache KV heads ({num_kv_heads})")
    group = num_q_heads // num_kv_heads
    _check(group <= MAX_GROUP, f"GQA group {group} exceeds the supported maximum {MAX_GROUP}")
    _check(lengths.dtype == torch.int32 and lengths.shape == (batch,),
           f"lengths must be int32 of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}")

    if page_table is None:
        _check(k_cache.shape[0] == batch, f"contiguous k_cache batch {k_cache.shape[0]} != q batch {batch}")
        page_size = capacity = k_cache.shape[2]
        page_table_arg, stride_pt = lengths, 0  # never read when PAGED is off
    else:
        _check(page_table.device == q.device, f"page_table is on {page_table.device} but q is on {q.device}")
        _check(page_table.dtype == torch.int32 and page_table.dim() == 2 and page_table.shape[0] == batch,
               f"page_table must be int32 [B={batch}, max_pages], got {page_table.dtype} {tuple(page_table.shape)}")
        _check(page_table.stride(1) == 1, "page_table must have a contiguous last dimension")
        page_size = k_cache.shape[2]
        _check(page_size >= 1, "page size (k_cache.shape[2]) must be >= 1")
        capacity = page_table.shape[1] * page_size
        page_table_arg, stride_pt = page_table, page_table.stride(0)
    if max_context is None:
        max_context = capacity
    _check(isinstance(max_context, int) and max_context >= 1, f"max_context must be a positive int, got {max_context!r}")

    if validate and not _capturing(q.device):
        lens = lengths.cpu()
        _check(bool((lens >= sq).all()), f"every length must be >= Sq={sq} (the new tokens are in the cache), got min {int(lens.min())}")
        _check(bool((lens <= capacity).all()), f"lengths exceed the cache capacity {capacity}: max {int(lens.max())}")
        if page_table is not None:
            pages_needed = (lens + page_size - 1) // page_size
            pt = page_table.cpu()
            used = torch.arange(pt.shape[1])[None, :] < pages_needed[:, None]
            bad = used & ((pt < 0) | (pt >= k_cache.shape[0]))
            _check(not bool(bad.any()), f"page_table holds page indices outside [0, {k_cache.shape[0]}) for live tokens")

    rows = group * sq
    # Only asked where it can matter: the planner's choice, or a launch that names the CUDA loop.
    cuda_loop = (launch is None or launch.cuda_loop) and decode_quant_cuda.usable(
        q, k_cache, v_cache, k_scale, v_scale, k_format, v_format, page_size if page_table is not None else None)
    if launch is None:
        launch = plan_launch(batch, num_kv_heads, rows, head_dim, max_context, q.device,
                             cache_format=plan_format(k_format, v_format), cuda_loop=cuda_loop)
    _check(not launch.cuda_loop or cuda_loop,
           f"launch.cuda_loop needs K and V in q8_0/q4_0/fp8, head_dim 128, <= {decode_quant_cuda.MAX_ROWS} "
           "rows per KV head, fp16/bf16 queries, 16-byte aligned rows and power-of-two pages on a Hopper GPU")
    _check(launch.m_tiles * launch.block_m >= rows and (not launch.cuda_loop or launch.block_m == decode_quant_cuda.ROWS),
           f"launch covers {launch.m_tiles} x {launch.block_m} query rows per KV head, but there are {rows} "
           f"(GQA group {group} x Sq {sq})" + (f"; the CUDA loop takes {decode_quant_cuda.ROWS}-row tiles"
                                              if launch.cuda_loop else ""))
    if out is None:
        out = torch.empty_like(q)
    else:
        _check(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device and out.stride(3) == 1,
               "out must match q in shape, dtype and device, with a contiguous last dimension")
    # Measured on the H100: q4_0 tiles of 16 tokens come out wrong from the compiled kernel (the
    # interpreter is right); 32 and more are exact (tests/kernels/test_decode_attention_quant.py).
    # Likely the tl.join + tl.reshape of the nibbles: the same pattern broke 16-token q8_0 tiles when
    # it split their block scales (see _block_scales).
    _check(not (2 in (k_code, v_code) and q.device.type == "cuda" and launch.block_n < 32 and not launch.cuda_loop),
           f"a q4_0 cache needs block_n >= 32 on the GPU, got {launch.block_n}")
    lse = torch.empty((batch, sq, num_q_heads), dtype=torch.float32, device=q.device) if return_lse else out
    m_pad = launch.m_tiles * launch.block_m
    direct = launch.num_splits == 1 and not launch.cuda_loop
    if direct:
        partial_o = partial_lse = out  # unused
    else:
        partial_o = torch.empty((batch * num_kv_heads, launch.num_splits, m_pad, head_dim),
                                dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch * num_kv_heads, launch.num_splits, m_pad),
                                  dtype=torch.float32, device=q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    k_scale_arg = _scale_words("k_scale", k_scale, k_code) if k_code else k_cache
    v_scale_arg = _scale_words("v_scale", v_scale, v_code) if v_code else v_cache
    fp16_dot = launch.fp16_dot and k_code != 0 and v_code != 0
    if launch.cuda_loop:
        decode_quant_cuda.launch(q, k_cache, v_cache, k_scale, v_scale, k_format, v_format, lengths,
                                 page_table, partial_o, partial_lse, scale_log2=float(scale) * LOG2E,
                                 capacity=capacity, num_splits=launch.num_splits)
    else:
        _decode_attention_kernel[(launch.num_splits, batch * num_kv_heads, launch.m_tiles)](
            q, k_cache, v_cache, k_scale_arg, v_scale_arg, out, lse, partial_o, partial_lse, lengths, page_table_arg,
            q.stride(0), q.stride(1), q.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *_scale_strides(k_scale_arg, k_code), *_scale_strides(v_scale_arg, v_code),
            stride_pt,
            float(scale) * LOG2E,
            capacity,
            launch.num_splits,
            SQ=sq, GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, M_PAD=m_pad,
            PAGE_SIZE=page_size, PAGED=page_table is not None, K_FORMAT=k_code, V_FORMAT=v_code,
            DIRECT_OUT=direct, WRITE_LSE=return_lse, IEEE_DOT=q.dtype == torch.float32,
            USE_PDL=launch.pdl and not direct, FP16_DOT=fp16_dot,
            # the interpreter has no PTX
            ASM_DEQUANT=(2 if launch.dequant_in_rows else 1) if fp16_dot and launch.asm_dequant and q.device.type == "cuda" else 0,
            num_warps=launch.num_warps, num_stages=launch.num_stages,
            **({"maxnreg": launch.maxnreg} if launch.maxnreg and q.device.type == "cuda" else {}),
        )
    if not direct:
        block_d = 32
        split_block = min(MERGE_SPLIT_BLOCK, triton.next_power_of_2(launch.num_splits))
        extra = {"launch_pdl": True} if launch.pdl else {}
        _merge_splits_kernel[(batch * num_kv_heads, rows, head_dim // block_d)](
            out, lse, partial_o, partial_lse, lengths,
            out.stride(0), out.stride(1), out.stride(2),
            capacity,
            launch.num_splits,
            SQ=sq, GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_N=launch.block_n, M_PAD=m_pad,
            SPLIT_BLOCK=split_block, BLOCK_D=block_d, ONE_PASS=launch.num_splits <= split_block,
            WRITE_LSE=return_lse, USE_PDL=launch.pdl,
            num_warps=4, **extra,
        )
    return (out, lse) if return_lse else out


def _scale_words(name: str, scale: torch.Tensor, code: int) -> torch.Tensor:
    """q8_0/q4_0 block scales as int32 words (two fp16 scales each; see _block_scales), fp8 as is."""
    if code not in (1, 2):
        return scale
    try:
        return scale.view(torch.int32)
    except RuntimeError:
        raise ValueError(f"{name} must be 4-byte aligned per row (even strides and storage offset), "
                         f"got strides {scale.stride()} and offset {scale.storage_offset()}") from None


def _scale_strides(scale: torch.Tensor, code: int) -> tuple[int, int, int]:
    return (scale.stride(0), scale.stride(1), scale.stride(2)) if code else (0, 0, 0)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
