"""Causal prefill attention: the Triton kernel, FlashAttention-2 style, over a cache in any KV format.

A chunk of S new tokens per sequence (positions length - S .. length - 1, their K/V already appended)
attends causally over its sequence's cached prefix and itself. One program owns BLOCK_M query rows of
one KV head of one sequence; the rows are (token, head-in-group) pairs, token-major, so every K/V tile
it loads feeds all GROUP query heads that read it (GLM: 12 per KV head) and the cache is streamed once
per group rather than once per query head. K/V tiles are read in the cache's stored format and
dequantized in registers by the decode kernel's helpers (kernel._load_kv_tile), with fp32 accumulation of
tl.dot on the tensor cores. The online-softmax step is _prefill_tile (FA2_STEP, the default) or, for A/B
measurement, the decode kernel's own (kernel._attend_tile).

Per program, keys below the first row's position are visible to every row: those tiles run without
masks. Only the few tiles on the diagonal take the causal (and end-of-context) mask. Lengths are read on
the device, so the grid and the compiled variant depend on shapes only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from glmtg.kernels.attention.kernel import _FP8, _Q4_0, _attend_tile, _load, _load_kv_tile, _q4_0_order, _token_slots

# _attend_tile masks keys after each row's last_key only when its SQ constexpr is > 1 (its decode meaning:
# several new tokens, causal among themselves). The prefill kernel passes these two values.
_NO_CAUSAL_MASK = tl.constexpr(1)
_CAUSAL_MASK = tl.constexpr(2)


@triton.jit
def _prefill_tile(q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
                  stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
                  stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                  K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr, IEEE_DOT: tl.constexpr, ASM_DEQUANT: tl.constexpr,
                  NATIVE_FP8: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N), FlashAttention-2's form of kernel._attend_tile.

    Compute-bound, unlike decode, so the step trims ALU work around the dots: the softmax scale rides in
    the exp2's FMA instead of a separate multiply and subtract of the scores (sm_90 PTX of the bf16 loop:
    2697 lines against 2782, 36 fewer sub.f32 and 60 fewer mul.f32 per thread), and P @ V accumulates
    into the rescaled accumulator in place (the compiler made the same of the decode form: 172 registers
    either way). CAUSAL masks keys after each row's ``last_key``; MASKED, keys at or past ``end`` (which
    are never loaded).
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < end
    page, slot = _token_slots(PageTable, b, offs_n, mask_n, stride_pt_b, PAGE_SIZE, PAGED, MASKED)
    k_rows = page * stride_kp + hkv * stride_kh + slot * stride_kn
    k_scale_rows = page * stride_ksp + hkv * stride_ksh + slot * stride_ksn
    k = _load_kv_tile(K, KScale, k_rows, k_scale_rows, mask_n, HEAD_DIM, K_FORMAT, q.dtype,
                      ASM_DEQUANT, MASKED, NATIVE_FP8)
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    # Scores stay unscaled (the scale is positive, so maxima and masks commute with it) and the scale is
    # applied inside exp2's argument, one FMA per score; fp8's K row scale is per key column and is folded
    # with it into one multiply.
    if K_FORMAT == _FP8:
        s = s * (_load(KScale + k_scale_rows, mask_n, 0.0, MASKED) * scale_log2)[None, :]
        sc = 1.0
    else:
        sc = scale_log2
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= last_key[:, None], s, float("-inf"))
    if MASKED:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * sc)
    # A row may see no key yet (a padding row past the chunk): keep exp2 away from -inf - -inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s * sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v_rows = page * stride_vp + hkv * stride_vh + slot * stride_vn
    v_scale_rows = page * stride_vsp + hkv * stride_vsh + slot * stride_vsn
    v = _load_kv_tile(V, VScale, v_rows, v_scale_rows, mask_n, HEAD_DIM, V_FORMAT, q.dtype,
                      ASM_DEQUANT, MASKED, NATIVE_FP8)
    if V_FORMAT == _FP8:  # the row scale multiplies the probabilities
        p = p * _load(VScale + v_scale_rows, mask_n, 0.0, MASKED)[None, :]
    if IEEE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def _tile(q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
          stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
          stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
          HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
          K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr, IEEE_DOT: tl.constexpr, ASM_DEQUANT: tl.constexpr,
          NATIVE_FP8: tl.constexpr, FA2_STEP: tl.constexpr, MASKED: tl.constexpr):
    """One key tile with the prefill's own online-softmax step (FA2_STEP) or the decode kernel's; MASKED: the
    diagonal tiles (causal mask per row, keys past ``end`` not loaded)."""
    if FA2_STEP:
        return _prefill_tile(
            q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT, NATIVE_FP8,
            MASKED, MASKED)
    else:
        return _attend_tile(
            q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            _CAUSAL_MASK if MASKED else _NO_CAUSAL_MASK, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT,
            IEEE_DOT, ASM_DEQUANT, NATIVE_FP8, MASKED)


@triton.jit
def _prefill_attention_kernel(
    Q, K, V, KScale, VScale, Out, Lengths, PageTable,
    stride_qb, stride_qs, stride_qh,
    stride_ob, stride_os, stride_oh,
    stride_kp, stride_kh, stride_kn,
    stride_vp, stride_vh, stride_vn,
    stride_ksp, stride_ksh, stride_ksn,
    stride_vsp, stride_vsh, stride_vsn,
    stride_pt_b,
    scale_log2,
    capacity,
    SQ,  # new tokens per sequence: a plain argument, so that every chunk length shares one compiled kernel
    GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr,
    IEEE_DOT: tl.constexpr, FP16_DOT: tl.constexpr, ASM_DEQUANT: tl.constexpr, NATIVE_FP8: tl.constexpr,
    FA2_STEP: tl.constexpr = True,
):
    # Causal work grows with the row tile: launch the heaviest tiles first so the short ones fill the tail.
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NUM_KV_HEADS
    hkv = bh % NUM_KV_HEADS
    # Clamped so that a bad length can never address memory outside the cache.
    length = tl.minimum(tl.maximum(tl.load(Lengths + b), 0), capacity)
    start = length - SQ  # position of the chunk's first token

    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * SQ
    tok = rows // GROUP  # rows are token-major: row = tok * GROUP + g
    q_head = hkv * GROUP + rows % GROUP
    last_key = start + tok  # each row sees keys at positions <= its own
    tok_first = (m_tile * BLOCK_M) // GROUP
    tok_last = tl.minimum((m_tile * BLOCK_M + BLOCK_M - 1) // GROUP, SQ - 1)

    offs_d = tl.arange(0, HEAD_DIM)
    # q4_0 tiles come out in nibble order (kernel._q4_0_order): q is read, and the output written, in it.
    q_cols = _q4_0_order(offs_d) if K_FORMAT == _Q4_0 else offs_d
    out_cols = _q4_0_order(offs_d) if V_FORMAT == _Q4_0 else offs_d
    q_rows = b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qs + q_head.to(tl.int64) * stride_qh
    q = tl.load(Q + q_rows[:, None] + q_cols[None, :], mask=row_valid[:, None], other=0.0)
    if FP16_DOT:  # the in-register dequantization of q8_0/q4_0/fp8 yields fp16 tiles
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys [0, start + tok_first] are visible to every row of the tile (and all lie below ``length``):
    # whole tiles of them run without any mask.
    end = tl.minimum(start + tok_last + 1, length)
    full_end = tl.maximum(start + tok_first + 1, 0) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _tile(
            q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT, NATIVE_FP8, FA2_STEP,
            False)
    # The diagonal: causal mask per row, and keys at or past ``end`` never loaded (they may hold anything).
    for n0 in range(full_end, end, BLOCK_N):
        m_i, l_i, acc = _tile(
            q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT, NATIVE_FP8, FA2_STEP,
            True)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a row with no key (bad length) writes 0, not NaN
    out = acc / l_safe[:, None]
    o_rows = b.to(tl.int64) * stride_ob + tok.to(tl.int64) * stride_os + q_head.to(tl.int64) * stride_oh
    tl.store(Out + o_rows[:, None] + out_cols[None, :], out.to(Out.dtype.element_ty), mask=row_valid[:, None])
