"""(token, slot) pairs of a decode batch grouped by expert in one launch: ``sort_by_expert``'s result
(mmq_moe.py) without its ~10 small torch kernels.

Why: the grouped expert GEMM needs the pairs in expert order and each expert's end offset. torch does that
with a compare/where, a stable sort, a searchsorted and a cast: a dozen tiny launches a layer, tens of µs
of a decode step whose weight-read bound is ~1 ms (8 layers, 8 tokens). Here one program counts the pairs
of each expert (one-hot [BLOCK_P, BLOCK_E] chunks summed over rows), takes the running sum as the ends,
and places each pair at its expert's start plus the pairs of that expert before it (an exclusive cumsum
down the chunk, chunks in order): a stable counting sort. Pairs whose id is outside [0, E) go last, in
order, as ``sort_by_expert`` puts them. One program walks all pairs, so it is for decode batches (up to
``MAX_PAIRS``), not prefill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, describe

# One program walks the pairs in chunks: beyond a decode batch (64 tokens x top 8) the torch sort is faster.
MAX_PAIRS = 512
_CELLS = 16384  # one-hot cells of a chunk: [128 pairs, 128 experts] over 8 warps, 64 a thread


@triton.jit
def _group_kernel(Ids, Order, Ends, P, E, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    ee = tl.arange(0, BLOCK_E)
    pp = tl.arange(0, BLOCK_P)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, P, BLOCK_P):  # pass 1: pairs per expert
        ids = tl.load(Ids + start + pp, mask=start + pp < P, other=-1)
        hot = (ids[:, None] == ee[None, :]).to(tl.int32)  # an id outside [0, E) matches no column < E
        counts += tl.sum(hot, axis=0)
    ends = tl.cumsum(counts, axis=0)
    tl.store(Ends + ee, ends, mask=ee < E)
    total = tl.sum(tl.where(ee < E, counts, 0), axis=0)
    running = ends - counts  # the next free slot of each expert
    stray = total  # the next free slot of the pairs of no expert
    for start in range(0, P, BLOCK_P):  # pass 2: each pair's place, in pair order
        p = start + pp
        ids = tl.load(Ids + p, mask=p < P, other=-1)
        valid = (ids >= 0) & (ids < E)
        hot = (ids[:, None] == ee[None, :]).to(tl.int32) * (ee < E).to(tl.int32)[None, :]
        before = tl.cumsum(hot, axis=0) - hot  # pairs of the same expert earlier in this chunk
        place = tl.sum((running[None, :] + before) * hot, axis=1)
        lost = ((~valid) & (p < P)).to(tl.int32)
        place = tl.where(valid, place, stray + tl.cumsum(lost, axis=0) - lost)
        tl.store(Order + place, p.to(tl.int64), mask=p < P)
        running += tl.sum(hot, axis=0)
        stray += tl.sum(lost, axis=0)


def group_pairs(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] (int32 / int64, at most MAX_PAIRS pairs) -> (order int64 [T·k]: pair indices t·k + slot in
    expert order, stable; ends int32 [E]: pairs routed to experts <= e), as ``mmq_moe.sort_by_expert`` and
    equal to it; ids outside [0, num_experts) sort last, in order. One launch, no host sync."""
    check(isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.dtype in (torch.int32, torch.int64),
          lambda: f"ids must be an int32/int64 tensor [T, k], got {describe(ids)}")
    check(isinstance(num_experts, int) and num_experts >= 1,
          lambda: f"num_experts must be a positive int, got {num_experts!r}")
    pairs = ids.numel()
    check(pairs <= MAX_PAIRS, lambda: f"ids holds {pairs} pairs; group_pairs takes at most {MAX_PAIRS}")
    flat = ids.reshape(-1).contiguous()
    order = torch.empty(pairs, dtype=torch.int64, device=ids.device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    if pairs == 0:
        return order, ends.zero_()
    block_e = triton.next_power_of_2(num_experts)
    block_p = max(1, min(triton.next_power_of_2(pairs), _CELLS // block_e))
    _group_kernel[(1,)](flat, order, ends, pairs, num_experts, BLOCK_P=block_p, BLOCK_E=block_e,
                        num_warps=8 if ids.is_cuda else 4)
    return order, ends
