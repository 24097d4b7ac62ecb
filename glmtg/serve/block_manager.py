"""KV page allocation with reference counts and a prefix cache.

The pool is num_blocks pages of block_size tokens; page p of a sequence's block table holds its
positions p*bs .. p*bs+bs-1. A page is shared (ref > 1) only when it is a full block that two
sequences have in common at the same place in their histories: the prefix cache finds it by a hash
chain (each full block's hash covers its tokens and the hash of the block before it, so equal hashes
mean equal prefixes). A block is registered only once its K/V have been computed, so a sequence never
reuses a page that another one has not finished writing. Shared pages are never written again: all
writes go to positions at or after a sequence's first uncached token, which lie past its shared blocks.

Freed pages go back to the free list but keep their hash until the page is handed out again, so
the prefix of a finished request (an earlier chat turn) stays reusable while the pool has room.
"""

from __future__ import annotations

import hashlib
from array import array

from glmtg.serve.sequence import Sequence


class _Block:
    """One page: how many sequences hold it, and (when full and computed) its chain hash and tokens."""

    __slots__ = ("hash", "ref", "tokens")

    def __init__(self) -> None:
        self.ref = 0
        self.hash: bytes | None = None
        self.tokens: tuple[int, ...] = ()


def chain_hash(previous: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """Hash of a full block given the hash of the block before it (None for the first block).

    blake2b rather than Python's hash(): 128 bits, so neither chance nor a crafted prompt makes two
    different prefixes share pages (a hit is also checked token for token).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(previous or b"\0" * 16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Hands out KV pages to sequences; see the module docstring for the rules."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._blocks = [_Block() for _ in range(num_blocks)]
        # An insertion-ordered dict used as an ordered set: pages are taken from the front and freed
        # to the back, so the page freed longest ago (the least useful cache entry) is reused first.
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages held by some sequence (cached but free pages count as free)."""
        return self.num_used / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Pages needed to hold num_tokens positions."""
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref

    def _cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Pages holding the longest cached run of full blocks at the start of token_ids.

        Blocks that contain the last token are never taken from the cache: the runner must compute
        that token to give the logits of the next one (and it must not write into a shared page).
        """
        if not self.enable_prefix_cache:
            return []
        bs = self.block_size
        hits: list[int] = []
        previous: bytes | None = None
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            previous = chain_hash(previous, tokens)
            block_id = self._by_hash.get(previous)
            if block_id is None or self._blocks[block_id].hash != previous \
                    or self._blocks[block_id].tokens != tokens:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Give seq pages for its whole history, reusing its cached prefix; False if they do not fit.

        On success seq.block_table is set and seq.num_computed is the number of tokens served from
        the cache (a multiple of block_size). On failure nothing changes.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.request_id!r} already holds pages")
        hits = self._cached_prefix(seq.token_ids)
        fresh = self.blocks_for(seq.num_tokens) - len(hits)
        # A cached page that no one holds sits in the free list, so taking it costs a free page too.
        idle_hits = sum(1 for b in hits if self._blocks[b].ref == 0)
        if fresh + idle_hits > len(self._free):
            return False
        for block_id in hits:
            block = self._blocks[block_id]
            if block.ref == 0:
                del self._free[block_id]
            block.ref += 1
        seq.block_table = hits + [self._take_free() for _ in range(fresh)]
        seq.num_computed = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        return True

    def _take_free(self) -> int:
        """Pop the oldest free page, dropping the cache entry it held."""
        block_id = next(iter(self._free))
        del self._free[block_id]
        block = self._blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
        block.hash, block.tokens, block.ref = None, (), 1
        return block_id

    def append_slot(self, seq: Sequence) -> bool:
        """Make seq's pages cover all its tokens (decode writes the last one); False if no page is free."""
        need = self.blocks_for(seq.num_tokens) - len(seq.block_table)
        if need > len(self._free):
            return False
        seq.block_table.extend(self._take_free() for _ in range(need))
        return True

    def free(self, seq: Sequence) -> None:
        """Release seq's pages. Tail pages are freed first so they are reused before the prefix pages."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref -= 1
            if block.ref == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0
        seq.num_hashed_blocks = 0

    def mark_computed(self, seq: Sequence, num_computed: int) -> None:
        """Record that seq's first num_computed tokens are in the cache; register blocks that filled up."""
        if not seq.num_computed <= num_computed <= len(seq.block_table) * self.block_size:
            raise ValueError(f"num_computed {num_computed} outside {seq.num_computed}.."
                             f"{len(seq.block_table) * self.block_size}")
        seq.num_computed = num_computed
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, num_computed // bs):
            previous = self._blocks[seq.block_table[i - 1]].hash if i > 0 else None
            block_id = seq.block_table[i]
            block = self._blocks[block_id]
            block.tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block.hash = chain_hash(previous, block.tokens)
            self._by_hash[block.hash] = block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_computed // bs)
