"""group_pairs (one-launch grouping of a decode batch's (token, slot) pairs by expert) against torch's
stable sort (mmq_moe.sort_by_expert), which it must equal exactly: integer outputs, no tolerance (equality
with a permutation also shows that every slot of ``order`` was written). Routings: random with ids outside [0, E)
(other ranks' experts, -1), every pair on one expert, more pairs than one chunk of the kernel, E not a
power of two."""

from __future__ import annotations

import pytest
import torch

from glmtg.kernels.gguf.mmq_moe import sort_by_expert
from glmtg.kernels.gguf.moe_groups import MAX_PAIRS, group_pairs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize(("t", "k", "e"), [(3, 2, 5), (5, 8, 128), (17, 8, 128), (64, 8, 128), (7, 3, 13)])
def test_equals_the_stable_sort(t: int, k: int, e: int) -> None:
    gen = torch.Generator().manual_seed(t * 100 + e)
    ids = torch.randint(-2, e + 3, (t, k), generator=gen)
    order, ends = group_pairs(ids, e)
    ref_order, ref_ends = sort_by_expert(ids, e)
    assert torch.equal(order, ref_order) and torch.equal(ends, ref_ends)
    assert order.dtype == torch.int64 and ends.dtype == torch.int32


def test_one_expert_and_int32_ids() -> None:
    ids = torch.full((17, 4), 3, dtype=torch.int32)
    ids[::2, 1] = 0
    order, ends = group_pairs(ids, 6)
    ref_order, ref_ends = sort_by_expert(ids, 6)
    assert torch.equal(order, ref_order) and torch.equal(ends, ref_ends)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="ids"):
        group_pairs(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="num_experts"):
        group_pairs(torch.zeros(3, 2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="at most"):
        group_pairs(torch.zeros(MAX_PAIRS + 1, 1, dtype=torch.int64), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("t", (1, 2, 8, 33, 64))
def test_equals_the_stable_sort_on_gpu(t: int) -> None:
    ids = torch.rand(t, 128, device="cuda").argsort(dim=1)[:, :8]
    ids[0, 0] = -1  # an expert held elsewhere
    order, ends = group_pairs(ids, 128)
    ref_order, ref_ends = sort_by_expert(ids, 128)
    assert torch.equal(order, ref_order) and torch.equal(ends, ref_ends)
