"""Split-KV decode attention for any GQA ratio: the Triton kernel (merge.py combines its slices).

One program owns one KV head of one sequence over one slice of its context, and puts *all* query
rows that read that KV head (GROUP heads x Sq new tokens) into a single tile, so every K/V byte is
loaded once per step whatever the ratio (12, 24, 6, 5, 1...). Padding rows up to the tile height are
masked. Each program derives its slice from the live length on the device (_slicing), so the grid
depends on shapes only and one decode step can be captured in a CUDA graph and replayed as lengths grow.

Cache formats are glmtg.formats' records; the kernel branches on their KernelCode (K_FORMAT, V_FORMAT).
"""

from __future__ import annotations

import triton
import triton.language as tl

from glmtg.formats import KernelCode

# The formats' kernel codes, as constexprs the kernel bodies can read.
_FLOAT = tl.constexpr(int(KernelCode.FLOAT))
_Q8_0 = tl.constexpr(int(KernelCode.Q8_0))
_Q4_0 = tl.constexpr(int(KernelCode.Q4_0))
_FP8 = tl.constexpr(int(KernelCode.FP8))


@triton.jit
def _load(ptrs, mask, other, MASKED: tl.constexpr):
    """tl.load, predicated only where the tile may run past the slice (its last tile)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    else:
        return tl.load(ptrs)


@triton.jit
def _slicing(Lengths, bh, capacity, NUM_SPLITS, NUM_KV_HEADS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(sequence b, KV head, live length, tokens per slice) of program row ``bh`` = b * NUM_KV_HEADS + head;
    the attention and merge kernels must agree.

    The length is clamped so that a bad value can never address memory outside the cache.
    """
    b = bh // NUM_KV_HEADS
    hkv = bh % NUM_KV_HEADS
    length = tl.minimum(tl.maximum(tl.load(Lengths + b), 0), capacity)
    return b, hkv, length, tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N


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
def _q8_0_to_f16(codes, d):
    """int8 codes times their fp16 block scale, as fp16, without int->float conversion instructions.

    sm_90 converts int8 -> float at a quarter of the FP32 rate (16 per clock per SM), which made the
    q8_0 loop compute-bound. Here each byte b becomes the fp16 bit pattern 0x6400 | (b + 128), i.e.
    1024 + b + 128 exactly, by one byte permute per two values; subtracting 1152 leaves b exactly, and
    one packed multiply applies the scale (rounded once, as fp16(b * d) would be).

    The op is pure, so Triton may move it past the layout change to the narrow codes (V's transposed
    operand is then gathered from shared memory as bytes); converting in rows instead was measured
    slower at depth (bench/DECISIONS.md).
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
        dtype=tl.float16, is_pure=True, pack=4,
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
def _fp8_bits_to_f16(codes):
    """float8_e4m3fn bit patterns (uint8) -> fp16, exactly, without the fp8 conversion instruction.

    GPUs before sm_89 have no e4m3 conversion (Triton refuses the fp8e4nv type there), so the cache is
    read as bytes: sign to bit 15 and exponent-mantissa to bits 13..7 give fp16 with the exponent bias
    7 instead of 15, and one multiply by 2^8 fixes it (subnormals included; NaN codes, which the append
    kernel never writes, read as 480).
    """
    c = codes.to(tl.int32)
    bits = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    return bits.to(tl.int16).to(tl.float16, bitcast=True) * 256.0


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
    # sm_90 (the same pattern as the q4_0 fault checked in launch.py).
    offs_b = tl.arange(0, BLOCKS)
    words = _load(Scale + scale_rows[:, None] + (offs_b // 2)[None, :], m, 0, MASKED)
    halves = (words >> ((offs_b % 2) * 16)[None, :]) & 0xFFFF
    return halves.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _load_kv_tile(Data, Scale, rows, scale_rows, mask_n,
                  HEAD_DIM: tl.constexpr, FORMAT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  ASM_DEQUANT: tl.constexpr, MASKED: tl.constexpr = True, NATIVE_FP8: tl.constexpr = True):
    """Load a [BLOCK_N, HEAD_DIM] tile and dequantize it in registers to the dtype of the dot.

    Every load is a plain contiguous row segment (codes) or a short row of block scales; scales are
    broadcast in registers. fp8's per-row scale is not applied here: the caller folds it into the
    [rows, BLOCK_N] scores (K) or probabilities (V), which is HEAD_DIM / BLOCK_M times less work.
    Rows past the slice read as 0 (codes and scales alike): V rows beyond the context may hold
    anything (even NaN), and 0 * NaN would poison the accumulator even where p == 0.
    ASM_DEQUANT (GPU, fp16 dots): q8_0/q4_0 codes go to fp16 by bit tricks in inline PTX rather than
    through int -> fp32 -> fp16 conversions; the interpreter (CPU tests) takes the plain path.
    NATIVE_FP8 (sm_89+ and the interpreter): fp8 codes are float8_e4m3fn and converted by Triton's cast;
    otherwise they are their uint8 bits and converted by _fp8_bits_to_f16.
    """
    m = mask_n[:, None]
    BLOCKS: tl.constexpr = HEAD_DIM // 32
    if FORMAT == _FLOAT:  # f16 / bf16 / f32, stored as the queries are
        offs_d = tl.arange(0, HEAD_DIM)
        return _load(Data + rows[:, None] + offs_d[None, :], m, 0.0, MASKED)
    elif FORMAT == _FP8:  # e4m3 codes; the row scale is applied by the caller
        offs_d = tl.arange(0, HEAD_DIM)
        if NATIVE_FP8:
            codes = _load(Data + rows[:, None] + offs_d[None, :], m, 0.0, MASKED)
            return codes.to(DOT_DTYPE)
        else:
            codes = _load(Data + rows[:, None] + offs_d[None, :], m, 0, MASKED)
            return _fp8_bits_to_f16(codes).to(DOT_DTYPE)
    else:
        n: tl.constexpr = rows.shape[0]
        d = _block_scales(Scale, scale_rows, m, BLOCKS, MASKED)
        if ASM_DEQUANT:
            if FORMAT == _Q8_0:  # int8 codes, fp16 d per 32 values
                offs_d = tl.arange(0, HEAD_DIM)
                codes = _load(Data + rows[:, None] + offs_d[None, :], m, 0, MASKED)
                d_full = tl.reshape(tl.broadcast_to(d[:, :, None], (n, BLOCKS, 32)), (n, HEAD_DIM))
                return _q8_0_to_f16(codes, d_full)
            else:  # q4_0: byte j of a block = q[j] | q[j + 16] << 4
                offs_h = tl.arange(0, HEAD_DIM // 2)
                packed = _load(Data + rows[:, None] + offs_h[None, :], m, 0, MASKED)
                d_half = tl.reshape(tl.broadcast_to(d[:, :, None], (n, BLOCKS, 16)), (n, HEAD_DIM // 2))
                lo, hi = _q4_0_to_f16(packed, d_half)
                return tl.reshape(tl.join(lo, hi), (n, HEAD_DIM))
        d = d.to(tl.float32)
        if FORMAT == _Q8_0:  # int8 codes, fp16 d per 32 values
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
                 ASM_DEQUANT: tl.constexpr, NATIVE_FP8: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over tokens [n0, n0 + BLOCK_N); MASKED for a tile that may pass ``end``."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < end
    page, slot = _token_slots(PageTable, b, offs_n, mask_n, stride_pt_b, PAGE_SIZE, PAGED, MASKED)
    k_rows = page * stride_kp + hkv * stride_kh + slot * stride_kn  # element offsets of each token row
    k_scale_rows = page * stride_ksp + hkv * stride_ksh + slot * stride_ksn
    k = _load_kv_tile(K, KScale, k_rows, k_scale_rows, mask_n, HEAD_DIM, K_FORMAT, q.dtype,
                      ASM_DEQUANT, MASKED, NATIVE_FP8)
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if K_FORMAT == _FP8:  # the row scale multiplies the scores, not every loaded value
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
                      ASM_DEQUANT, MASKED, NATIVE_FP8)
    if V_FORMAT == _FP8:  # the row scale multiplies the probabilities
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
    FP16_DOT: tl.constexpr, ASM_DEQUANT: tl.constexpr, NATIVE_FP8: tl.constexpr = True,
    WAIT_PDL: tl.constexpr = False,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    m_tile = tl.program_id(2)
    if WAIT_PDL:
        # launched early (glmtg/kernels/pdl.py): q and the cache's newest rows are written by the kernel before
        tl.extra.cuda.gdc_wait()
    b, hkv, length, chunk = _slicing(Lengths, bh, capacity, NUM_SPLITS, NUM_KV_HEADS, BLOCK_N)
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
    q_cols = _q4_0_order(offs_d) if K_FORMAT == _Q4_0 else offs_d
    out_cols = _q4_0_order(offs_d) if V_FORMAT == _Q4_0 else offs_d
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
            SQ, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT, NATIVE_FP8, False)
    if full_end < end:
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, full_end, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            SQ, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT, NATIVE_FP8, True)

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
