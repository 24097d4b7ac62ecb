"""Causal prefill attention: the Triton kernel, FlashAttention-2 style, over a cache in any KV format.

A chunk of S new tokens per sequence (positions length - S .. length - 1, their K/V already appended)
attends causally over its sequence's cached prefix and itself. One program owns BLOCK_M query rows of
one KV head of one sequence; the rows are (token, head-in-group) pairs, token-major, so every K/V tile
it loads feeds all GROUP query heads that read it (GLM: 12 per KV head) and the cache is streamed once
per group rather than once per query head. K/V tiles are read in the cache's stored format and
dequantized in registers by the decode kernel's tile step (kernel._attend_tile, which also does the
online softmax), with fp32 accumulation of tl.dot on the tensor cores.

Per program, keys below the first row's position are visible to every row: those tiles run without
masks. Only the few tiles on the diagonal take the causal (and end-of-context) mask. Lengths are read on
the device, so the grid and the compiled variant depend on shapes only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from glmtg.kernels.attention.kernel import _Q4_0, _attend_tile, _q4_0_order

# _attend_tile masks keys after each row's last_key only when its SQ constexpr is > 1 (its decode meaning:
# several new tokens, causal among themselves). The prefill kernel passes these two values.
_NO_CAUSAL_MASK = tl.constexpr(1)
_CAUSAL_MASK = tl.constexpr(2)


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
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            _NO_CAUSAL_MASK, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT,
            NATIVE_FP8, False)
    # The diagonal: causal mask per row, and keys at or past ``end`` never loaded (they may hold anything).
    for n0 in range(full_end, end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, n0, end, last_key, b, hkv, K, V, KScale, VScale, PageTable,
            stride_kp, stride_kh, stride_kn, stride_vp, stride_vh, stride_vn,
            stride_ksp, stride_ksh, stride_ksn, stride_vsp, stride_vsh, stride_vsn, stride_pt_b, scale_log2,
            _CAUSAL_MASK, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, K_FORMAT, V_FORMAT, IEEE_DOT, ASM_DEQUANT,
            NATIVE_FP8, True)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a row with no key (bad length) writes 0, not NaN
    out = acc / l_safe[:, None]
    o_rows = b.to(tl.int64) * stride_ob + tok.to(tl.int64) * stride_os + q_head.to(tl.int64) * stride_oh
    tl.store(Out + o_rows[:, None] + out_cols[None, :], out.to(Out.dtype.element_ty), mask=row_valid[:, None])
