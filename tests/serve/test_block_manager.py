"""BlockManager: reference counts, the free list, and the prefix cache's hash chain.

Everything is exact integer bookkeeping, so every check is an equality.
"""

from __future__ import annotations

import random

import pytest

from glmtg.serve.block_manager import BlockManager
from glmtg.serve.sequence import SamplingSpec, Sequence


def seq(tokens, rid="s"):
    return Sequence(rid, list(tokens), SamplingSpec(), 1)


def computed(bm, s):
    """Allocate s and mark its whole history as written (what a finished prefill leaves)."""
    assert bm.allocate(s)
    bm.mark_computed(s, s.num_tokens)
    return s


def test_allocate_free_and_usage():
    bm = BlockManager(num_blocks=5, block_size=4)
    a = seq(range(9))  # 3 pages
    assert bm.allocate(a) and len(a.block_table) == 3 and a.num_computed == 0
    assert (bm.num_used, bm.num_free, bm.usage) == (3, 2, 0.6)
    b = seq(range(100, 109))
    assert not bm.allocate(b)  # needs 3, 2 free: nothing changes
    assert b.block_table == [] and bm.num_free == 2
    bm.free(a)
    assert a.block_table == [] and bm.num_used == 0 and bm.allocate(b)


def test_prefix_hit_shares_full_blocks_but_not_the_last_tokens_block():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=20, block_size=4)
    p = [rng.randrange(1000) for _ in range(13)]  # 3 full blocks + 1 token
    a = computed(bm, seq(p, "a"))
    b = seq(p, "b")
    assert bm.allocate(b)
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert b.num_computed == 12 and [bm.ref_count(x) for x in b.block_table] == [2, 2, 2, 1]
    c = seq(p[:12], "c")  # exactly 3 blocks: the third holds the last token, so it is computed again
    assert bm.allocate(c) and c.num_computed == 8 and c.block_table[:2] == a.block_table[:2]
    assert c.block_table[2] not in a.block_table
    bm.free(a)
    bm.free(b)
    bm.free(c)
    assert bm.num_used == 0


def test_blocks_are_cached_only_once_computed():
    bm = BlockManager(num_blocks=20, block_size=4)
    p = list(range(1, 18))
    a = seq(p, "a")
    assert bm.allocate(a)
    bm.mark_computed(a, 6)  # one full block written, the second half-written
    b = seq(p, "b")
    assert bm.allocate(b) and b.num_computed == 4 and b.block_table[0] == a.block_table[0]


def test_same_tokens_after_a_different_prefix_do_not_hit():
    bm = BlockManager(num_blocks=20, block_size=2)
    computed(bm, seq([1, 2, 3, 4, 5], "a"))
    b = seq([9, 9, 3, 4, 5], "b")  # block 1 equals a's block 1, but the chain differs
    assert bm.allocate(b) and b.num_computed == 0


def test_freed_blocks_stay_cached_until_their_page_is_reused():
    bm = BlockManager(num_blocks=6, block_size=4)
    p = list(range(50, 59))  # 3 pages; 2 full blocks reusable
    a = computed(bm, seq(p, "a"))
    pages = list(a.block_table)
    bm.free(a)
    b = seq(p, "b")
    assert bm.allocate(b) and b.num_computed == 8 and b.block_table[:2] == pages[:2]
    assert bm.num_used == 3
    bm.free(b)
    # 3 of the 6 pages are taken fresh: the never-used and the tail pages go before the cached prefix.
    filler = seq(range(200, 212), "f")
    assert bm.allocate(filler) and not set(pages[:2]) & set(filler.block_table)
    c = seq(p, "c")
    assert bm.allocate(c) and c.num_computed == 8  # prefix pages untouched so far
    bm.free(c)
    bm.free(filler)
    big = seq(range(300, 324), "g")  # takes every page: the cache entries die with their pages
    assert bm.allocate(big)
    bm.free(big)
    d = seq(p, "d")
    assert bm.allocate(d) and d.num_computed == 0


def test_prefix_cache_off():
    bm = BlockManager(num_blocks=10, block_size=2, enable_prefix_cache=False)
    computed(bm, seq([1, 2, 3, 4, 5], "a"))
    b = seq([1, 2, 3, 4, 5], "b")
    assert bm.allocate(b) and b.num_computed == 0


def test_append_slot_and_mark_computed_bounds():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(range(4))
    assert bm.allocate(a) and len(a.block_table) == 1
    bm.mark_computed(a, 4)
    a.token_ids.append(7)
    assert bm.append_slot(a) and len(a.block_table) == 2
    assert bm.append_slot(a) and len(a.block_table) == 2  # already covered: no new page
    with pytest.raises(ValueError, match="num_computed"):
        bm.mark_computed(a, 9)
    b = seq(range(10, 15))
    assert bm.allocate(b) is False and bm.num_free == 1
    b.token_ids[:] = [1]
    assert bm.allocate(b)
    b.token_ids += [2, 3, 4, 5]
    assert not bm.append_slot(b)


@pytest.mark.parametrize("kwargs, name", [({"num_blocks": 0, "block_size": 4}, "num_blocks"),
                                          ({"num_blocks": 4, "block_size": 0}, "block_size")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(**kwargs)
