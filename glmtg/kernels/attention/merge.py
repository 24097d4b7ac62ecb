"""The merge of split-KV partials (flash-decoding): one output per query row from the slices'
normalised partial outputs and log2-domain log-sum-exps, written by kernel.py or the CUDA loop."""

from __future__ import annotations

import triton
import triton.language as tl

from glmtg.kernels.attention.kernel import _slicing

MERGE_SPLIT_BLOCK = 256  # partials the merge loads at once; more splits than this take two passes


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
    # The attention kernel's slicing, to visit only the slices that ran.
    b, hkv, length, chunk = _slicing(Lengths, bh, capacity, NUM_SPLITS, NUM_KV_HEADS, BLOCK_N)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # launched early; the partials are only valid past this point
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch and prefetch its weights now
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
