"""CUDA graphs of the serve runner's decode step: one per batch size, over static, padded input buffers.

A decode forward of B rows (one token each, every row at its own position with its own pages) costs the
same launches whatever the rows hold, so it is captured once per size of a set (``graph_sizes``) and
replayed: the rows are copied into static buffers (token ids, start positions, page tables) of the
smallest captured size >= B (``bucket_for``), and the rows past B are padding (``decode_inputs``): token 0
at position 0 of a scratch page that the runner keeps out of the block manager's pool, so a padding row
writes its K/V there and attends over that one token; its logits are never read. A real row's page-table
entries past its own pages also name the scratch page (a read of them would see nothing of another sequence).

Sampling stays outside the graph (per-row seeds and steps, as on the eager path), and so do prefill chunks.
The pure parts (sizes, bucket choice, padded inputs, the static buffers) run on any device; only capture and
replay need CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from glmtg.graph_capture import capture_graph
from glmtg.kv_cache import KVCache

__all__ = ["DEFAULT_GRAPH_SIZES", "DecodeBuffers", "DecodeGraphs", "bucket_for", "decode_inputs", "graph_sizes"]

# Powers of two: a batch pads by less than 2x, and a handful of graphs covers every batch up to 64.
DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def graph_sizes(max_num_seqs: int, sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """The batch sizes to capture, ascending, none above ``max_num_seqs``.

    ``sizes`` None: ``DEFAULT_GRAPH_SIZES`` below ``max_num_seqs`` plus ``max_num_seqs`` itself, so every
    decode batch the scheduler can form has a graph. Given sizes are deduplicated and those above
    ``max_num_seqs`` dropped (no batch reaches them); a batch above the largest kept one runs eagerly.
    """
    if not _is_int(max_num_seqs) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be a positive int, got {max_num_seqs!r}")
    if sizes is None:
        return tuple(s for s in DEFAULT_GRAPH_SIZES if s < max_num_seqs) + (max_num_seqs,)
    if isinstance(sizes, (str, bytes)) or not all(_is_int(s) and s >= 1 for s in sizes):
        raise ValueError(f"graph_sizes must be positive ints, got {sizes!r}")
    kept = sorted({s for s in sizes if s <= max_num_seqs})
    if not kept:
        raise ValueError(f"graph_sizes {list(sizes)!r} holds no size <= max_num_seqs {max_num_seqs}")
    return tuple(kept)


def bucket_for(rows: int, sizes: Sequence[int]) -> int | None:
    """The smallest of ``sizes`` (ascending) that holds ``rows`` rows, or None when none does (run eagerly)."""
    for size in sizes:
        if size >= rows:
            return size
    return None


def decode_inputs(tokens: Sequence[int], starts: Sequence[int], tables: Sequence[Sequence[int]], size: int,
                  max_pages: int, scratch_page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors of one padded decode batch: ids int64 [size], lengths int32 [size], tables int32
    [size, max_pages].

    Row i < len(tokens) is the real row i (its token at position ``starts[i]``, its pages, then
    ``scratch_page`` to the end); rows past them are padding: token 0 at position 0 with every entry the
    scratch page, so they write and read nothing but that page.
    """
    rows = len(tokens)
    if not 1 <= rows <= size:
        raise ValueError(f"a decode batch of {rows} rows does not fit a graph of {size}")
    # numpy on the host: a row's table is one slice assignment, not a tensor built per row (every step)
    ids = np.zeros(size, dtype=np.int64)
    ids[:rows] = tokens
    lengths = np.zeros(size, dtype=np.int32)
    lengths[:rows] = starts
    table = np.full((size, max_pages), scratch_page, dtype=np.int32)
    for i, blocks in enumerate(tables):
        if len(blocks) > max_pages:
            raise ValueError(f"tables[{i}] has {len(blocks)} pages, more than max_pages {max_pages}")
        table[i, :len(blocks)] = blocks
    return torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(table)


class DecodeBuffers:
    """Static decode inputs for up to ``max_size`` rows, with one KVCache view of ``cache`` per size.

    A graph captured over ``view(size)`` reads these tensors at fixed addresses; ``load`` copies a batch
    (padding included) into the first ``size`` rows without reallocating anything. The buffers start as
    padding, so a warm-up or capture over them writes only the scratch page.
    """

    def __init__(self, cache: KVCache, max_size: int, scratch_page: int) -> None:
        if not _is_int(scratch_page) or not 0 <= scratch_page < cache.num_pages:
            raise ValueError(f"scratch_page must be a page of the pool [0, {cache.num_pages}), got {scratch_page!r}")
        self.cache = cache
        self.max_pages = cache.max_pages
        self.scratch_page = scratch_page
        self.ids = torch.zeros(max_size, dtype=torch.long, device=cache.device)
        self.lengths = torch.zeros(max_size, dtype=torch.int32, device=cache.device)
        self.tables = torch.full((max_size, self.max_pages), scratch_page, dtype=torch.int32, device=cache.device)
        self._views: dict[int, KVCache] = {}

    def view(self, size: int) -> tuple[torch.Tensor, KVCache]:
        """(ids [size, 1], the pool seen through rows [:size]): the inputs of a forward of ``size`` rows."""
        if size not in self._views:
            self._views[size] = self.cache.rows(self.lengths[:size], self.tables[:size])
        return self.ids[:size].view(size, 1), self._views[size]

    def load(self, tokens: Sequence[int], starts: Sequence[int], tables: Sequence[Sequence[int]],
             size: int) -> None:
        """Copy a batch into rows [:size], padding the rest of them (see ``decode_inputs``)."""
        ids, lengths, table = decode_inputs(tokens, starts, tables, size, self.max_pages, self.scratch_page)
        self.ids[:size].copy_(ids)
        self.lengths[:size].copy_(lengths)
        self.tables[:size].copy_(table)


class DecodeGraphs:
    """One captured decode forward per size of ``sizes`` over ``DecodeBuffers``; ``replays`` counts replays.

    ``model`` is called as the runner's eager path calls it (``attn_backend``, ``last_only``, no host
    validation: the runner checked every row on the host), so a replay computes what that call computes.
    """

    def __init__(self, model: torch.nn.Module, cache: KVCache, sizes: Sequence[int], scratch_page: int,
                 attn_backend: str) -> None:
        self.model = model
        self.sizes = tuple(sorted(sizes))
        self.attn_backend = attn_backend
        self.buffers = DecodeBuffers(cache, self.sizes[-1], scratch_page)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.replays = 0

    def forward(self, size: int) -> torch.Tensor:
        """The step a graph holds: the model over rows [:size] of the buffers; fp32 logits [size, 1, vocab]."""
        ids, view = self.buffers.view(size)
        return self.model(ids, view, attn_backend=self.attn_backend, last_only=True, validate=False)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every size, smallest first, into one memory pool (the graphs never run at once).

        Smallest first: a path that a warm-up takes only outside a capture (the GGUF experts' host-synced
        loop for many pairs, glmtg/layers/quant_experts.py) leaves the kernel the capture takes for a large
        size uncompiled; the small sizes' warm-ups have compiled it by then, so no capture compiles a kernel.
        """
        device = self.buffers.ids.device
        pool = torch.cuda.graph_pool_handle()
        for size in self.sizes:
            def step(size: int = size) -> None:
                self._outputs[size] = self.forward(size)
            self._graphs[size] = capture_graph(step, device, pool)
        torch.cuda.synchronize(device)

    def run(self, tokens: Sequence[int], starts: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor | None:
        """Logits [rows, vocab] (fp32) of a decode batch by replay, or None when no graph holds that many rows.

        The result is a view of the graph's output: read it before the next replay.
        """
        size = bucket_for(len(tokens), self.sizes)
        if size is None:
            return None
        self.buffers.load(tokens, starts, tables, size)
        out = self._replay(size)
        self.replays += 1
        return out[:len(tokens), -1]

    def _replay(self, size: int) -> torch.Tensor:
        """Replay the graph of ``size``; its output, fp32 logits [size, 1, vocab]."""
        self._graphs[size].replay()
        return self._outputs[size]
