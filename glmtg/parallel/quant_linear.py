"""Tensor-parallel linears over GGUF blocks: ``QuantLinear`` with each rank holding part of the raw bytes.

- ``QuantColumnParallelLinear``: a rank's output rows of every shard, cut out of the raw uint8 rows
  [rows, row_bytes] (rows are whole in any format, so any format splits this way).
- ``QuantRowParallelLinear``: a rank's input features, which must start and end on block boundaries of the
  weight's format: bytes [b0 * type_size, b1 * type_size) of every row hold exactly blocks [b0, b1). The
  partial products are summed across ranks (one all-reduce) as ``RowParallelLinear``'s are.

Widths that N ranks do not split into equal whole blocks (GLM-4.5-Air's 1408 = 44 blocks of 32 over 8 ranks)
are cut by ``block_partition``: whole blocks per rank, counts differing by at most one. The matching
column-parallel gate/up take the same cut of the inner width (``partition_columns``), so rank r's gate/up
rows are exactly the down columns it holds.

Like the float ones, both take whole checkpoint tensors (raw blocks) in ``load_shard`` and list whole shapes
in ``slots``, so every loader (``load_tensor``) hands every rank the same tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from glmtg.formats import REGISTRY
from glmtg.layers.linear import Shards
from glmtg.layers.quant_linear import QuantLinear
from glmtg.parallel.group import TPGroup
from glmtg.parallel.linear import ShardRowCuts, WholeInputSlots


def block_partition(n_blocks: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges [b0, b1) of ``n_blocks`` blocks, in rank order, sizes differing by at most
    one (the first ``n_blocks % parts`` ranges one longer). A range may be empty when parts > n_blocks:
    callers that cannot hold nothing check ``partition_columns``."""
    for what, n, low in (("n_blocks", n_blocks, 0), ("parts", parts, 1)):
        if not isinstance(n, int) or isinstance(n, bool) or n < low:
            raise ValueError(f"{what} must be an int >= {low}, got {n!r}")
    q, rem = divmod(n_blocks, parts)
    bounds = [r * q + min(r, rem) for r in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def partition_columns(width: int, block: int, tp: TPGroup, what: str) -> slice:
    """Rank ``tp.rank``'s columns of a ``width``-wide input cut into whole blocks of ``block`` values
    (``block_partition``); ValueError naming ``what`` when blocks do not tile ``width``. With fewer blocks
    than ranks the last ranks get an empty slice (see ``QuantRowParallelLinear`` for what they hold)."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if width % block:
        raise ValueError(f"{what} ({width}) is not a whole number of blocks of {block}")
    b0, b1 = block_partition(width // block, tp.world_size)[tp.rank]
    return slice(b0 * block, b1 * block)


def slice_block_columns(raw: torch.Tensor, fmt: str, cols: slice) -> torch.Tensor:
    """Raw blocks uint8 [..., row_bytes] of ``fmt`` -> the blocks holding values ``cols`` of every row
    (a view). ValueError unless ``cols`` starts and ends on the format's block boundaries."""
    record = REGISTRY[fmt]
    bs, ts = record.block_size, record.type_size
    if cols.start % bs or cols.stop % bs or not 0 <= cols.start < cols.stop:
        raise ValueError(f"cols [{cols.start}, {cols.stop}) must start and end on {fmt}'s blocks of {bs} values")
    if raw.dim() < 1 or raw.dtype != torch.uint8 or cols.stop // bs * ts > raw.shape[-1]:
        raise ValueError(f"raw must be uint8 [..., row_bytes] holding values [0, {cols.stop}) in {fmt}, got "
                         f"{raw.dtype} {tuple(raw.shape)}")
    return raw[..., cols.start // bs * ts:cols.stop // bs * ts]


class QuantColumnParallelLinear(ShardRowCuts, QuantLinear):
    """Rank ``tp.rank``'s rows ``cuts[name]`` of every shard ``name`` of a [out, in] linear in GGUF blocks.

    ``out`` gives the whole shards (as QuantLinear's), ``cuts`` each shard's rows this rank keeps (the
    attention's by whole heads, gate/up by ``partition_columns`` of the inner width); the output's named
    shards stay in order so ``split`` works as on the whole linear. No communication.
    """

    def __init__(self, in_features: int, out: int | Shards, *, cuts: Mapping[str | None, slice], bias: bool,
                 formats: str | Mapping[str | None, str], dtype: torch.dtype, tp: TPGroup,
                 backend: str = "auto") -> None:
        full = ((None, out),) if isinstance(out, int) else tuple(out)
        if not isinstance(cuts, Mapping) or set(cuts) != {name for name, _ in full}:
            raise ValueError(f"cuts must give rows for each shard {[n for n, _ in full]}, got {cuts!r}")
        for name, rows in full:
            c = cuts[name]
            if not isinstance(c, slice) or c.step not in (None, 1) or not 0 <= c.start < c.stop <= rows:
                raise ValueError(f"cuts[{name!r}] must be a non-empty slice of [0, {rows}), got {c!r}")
        local = [(name, cuts[name].stop - cuts[name].start) for name, _ in full]
        super().__init__(in_features, local[0][1] if isinstance(out, int) else local, bias=bias,
                         formats=formats, dtype=dtype, backend=backend)
        self.tp = tp
        self.full_shards = full
        self._cuts = dict(cuts)


class QuantRowParallelLinear(WholeInputSlots, QuantLinear):
    """Rank ``tp.rank``'s input features ``cols`` (block-aligned in every shard's format) of a [out, in]
    linear in GGUF blocks.

    ``cols`` empty (a width of fewer blocks than ranks: the tiny preset's shared expert, 1 block of 32): the
    rank holds one block of zero bytes (scale 0: every value exactly 0) and takes a block-wide input, so its
    partial product is exactly zero while it still runs the same steps and all-reduces as the others. (An
    absent module would need its own slots and a zero output path; one idle block costs nothing.)

    ``forward`` gives this rank's partial product; with ``reduce`` the sum across ranks (every rank gets
    it), else the partial sum for the caller to fold into its own all-reduce (the MoE's). The bias (if any)
    is kept by rank 0 only (the others hold zeros) and added to its partial product, so any sum of the
    partials carries it once; a ``residual`` is added once too (rank 0 only) with ``reduce``, by every
    rank without (it is then the caller's partial sum). ``parity`` as ``RowParallelLinear``'s.
    """

    parity = 0

    def __init__(self, in_features: int, out: int | Shards, *, cols: slice, bias: bool,
                 formats: str | Mapping[str | None, str], dtype: torch.dtype, tp: TPGroup,
                 backend: str = "auto", reduce: bool = True) -> None:
        if not isinstance(cols, slice) or cols.step not in (None, 1) or not 0 <= cols.start <= cols.stop <= in_features:
            raise ValueError(f"cols must be a slice of [0, {in_features}), got {cols!r}")
        per_shard = set(formats.values()) if isinstance(formats, Mapping) else {formats}
        for fmt in per_shard:
            bs = REGISTRY[fmt].block_size if fmt in REGISTRY else None
            if bs is not None and (cols.start % bs or cols.stop % bs):
                raise ValueError(f"format {fmt} has blocks of {bs} values, which do not tile this rank's input "
                                 f"features [{cols.start}, {cols.stop})")
        width = cols.stop - cols.start
        if not width:
            if len(per_shard) != 1 or next(iter(per_shard)) not in REGISTRY:
                raise ValueError(f"a rank without input features needs one block format, got {formats!r}")
            width = REGISTRY[next(iter(per_shard))].block_size
        super().__init__(width, out, bias=bias, formats=formats, dtype=dtype, backend=backend)
        self.tp = tp
        self.reduce = reduce
        self.full_in_features = in_features
        self._cols = cols

    def load_shard(self, param: str, shard: str | None, value: torch.Tensor) -> None:
        """"weight": the whole raw blocks [rows, row_bytes of in_features]; this rank keeps the bytes of its
        blocks. "bias": kept by rank 0, zeros elsewhere (see the class docstring)."""
        if param == "weight":
            fmt = self.storage(shard)[1]
            want = REGISTRY[fmt].blocks_bytes(self.full_in_features)
            if value.dim() != 2 or value.dtype != torch.uint8 or value.shape[1] != want:
                raise ValueError(f"weight: expected raw {fmt} blocks [rows, {want}] of {self.full_in_features} "
                                 f"input features, got {value.dtype} {tuple(value.shape)}")
            if self._cols.start == self._cols.stop:  # no columns here: one block of zeros (class docstring)
                value = value.new_zeros(value.shape[0], REGISTRY[fmt].type_size)
            else:
                value = slice_block_columns(value, fmt, self._cols).contiguous()
        elif param == "bias" and self.tp.rank:
            value = torch.zeros_like(value)
        super().load_shard(param, shard, value)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in/N] (this rank's features) -> [..., out] (the sum with ``reduce``, else the partial)."""
        once = residual if not self.reduce or self.tp.rank == 0 else None
        y = super().forward(x, residual=once)
        return self.tp.all_reduce(y, self.parity) if self.reduce else y

    def from_int8(self, blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
        """QuantLinear's int8 decode product of this rank's activations, summed as ``forward``'s."""
        once = residual if not self.reduce or self.tp.rank == 0 else None
        y = super().from_int8(blocks, dtype, residual=once)
        return self.tp.all_reduce(y, self.parity) if self.reduce else y
