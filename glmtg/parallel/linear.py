"""Tensor-parallel linears: the ``Linear`` seam with each rank holding a slice of the weight.

Both take the whole checkpoint tensor in ``load_shard`` and keep their part, so loaders hand every rank the
same tensors; ``slots`` lists the whole (checkpoint) shapes for the same reason. A loader that can read part
of a tensor (safetensors' ``get_slice``) asks ``kept(param, shard)`` for the index of the whole tensor the rank
keeps and hands that part to ``load_kept``, so a rank never holds the whole tensor.

- ``ColumnParallelLinear``: every named shard's output rows cut evenly, rank r keeping part r of each (q, k
  and v each by whole heads, gate and up each by the same intermediate columns), so the output's named shards
  stay in order and ``split`` works as on the whole linear. No communication.
- ``RowParallelLinear``: the input features cut evenly (the input is a column-parallel output); each rank's
  product is a partial sum, summed across ranks by ``forward`` (``reduce=True``) or left to the caller, who
  folds several partial sums into one all-reduce (the MoE's routed and shared experts).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from glmtg.layers.linear import DenseLinear, Shards
from glmtg.parallel.group import TPGroup


class ShardRowCuts:
    """``slots`` and ``load_shard`` of a linear holding rows ``_cuts[name]`` of each whole shard
    (``full_shards``): a checkpoint gives the whole shards, and each rank keeps its rows of them."""

    full_shards: tuple[tuple[str | None, int], ...]
    _cuts: dict[str | None, slice]
    in_features: int
    has_bias: bool

    def slots(self) -> Iterator[tuple[str, str | None, tuple[int, ...]]]:
        """The checkpoint's (whole) shapes: every rank is given the same tensors."""
        for name, rows in self.full_shards:
            yield "weight", name, (rows, self.in_features)
            if self.has_bias:
                yield "bias", name, (rows,)

    def load_shard(self, param: str, shard: str | None, value: torch.Tensor) -> None:
        """Keep this rank's rows of the whole shard ``shard`` (all shards stacked for None)."""
        if shard is None and len(self.full_shards) > 1:
            for name, part in zip(self._cuts, value.split([r for _, r in self.full_shards])):
                self.load_shard(param, name, part)
            return
        key = shard if shard is not None else self.full_shards[0][0]
        if key not in self._cuts:
            raise ValueError(f"shard must be one of {list(self._cuts)}, got {shard!r}")
        rows = dict(self.full_shards)[key]
        if value.dim() < 1 or value.shape[0] != rows:
            raise ValueError(f"{param} of shard {key!r}: expected {rows} rows, got shape {tuple(value.shape)}")
        super().load_shard(param, key, value[self._cuts[key]].contiguous())  # type: ignore[misc]

    def kept(self, param: str, shard: str | None) -> tuple[slice, ...]:
        """The index into the whole checkpoint tensor of ``param``'s ``shard`` that this rank keeps: its rows
        (weight and bias alike)."""
        if shard not in self._cuts:
            raise ValueError(f"shard must be one of {list(self._cuts)}, got {shard!r}")
        return (self._cuts[shard],)

    def load_kept(self, param: str, shard: str | None, value: torch.Tensor) -> None:
        """Write ``whole[kept(param, shard)]``, already cut by the caller (``load_shard`` of the whole tensor
        stores the same)."""
        self.kept(param, shard)  # the shard's name checked
        super().load_shard(param, shard, value)  # type: ignore[misc]


class ColumnParallelLinear(ShardRowCuts, DenseLinear):
    """Rank ``tp.rank``'s rows of every shard of a [out, in] linear ``out`` (an int or named shards)."""

    def __init__(self, in_features: int, out: int | Shards, *, bias: bool, dtype: torch.dtype, tp: TPGroup) -> None:
        full = ((None, out),) if isinstance(out, int) else tuple(out)
        cuts = {name: tp.part(rows, f"rows of shard {name!r}" if name else "out_features") for name, rows in full}
        local = [(name, cuts[name].stop - cuts[name].start) for name, _ in full]
        super().__init__(in_features, local[0][1] if isinstance(out, int) else local, bias=bias, dtype=dtype)
        self.tp = tp
        self.full_shards = full
        self._cuts = cuts



class WholeInputSlots:
    """``slots`` of a linear holding some of the input features: a checkpoint gives the whole [rows,
    full_in_features] weight (the rank keeps its columns when it loads it)."""

    shards: Shards
    has_bias: bool
    full_in_features: int

    def slots(self) -> Iterator[tuple[str, str | None, tuple[int, ...]]]:
        for name, rows in self.shards:
            yield "weight", name, (rows, self.full_in_features)
            if self.has_bias:
                yield "bias", name, (rows,)


class RowParallelLinear(WholeInputSlots, DenseLinear):
    """Rank ``tp.rank``'s input features of a [out, in] linear; the bias (if any) is added once to the sum.
    ``parity``: the sum's place in its layer (``TPGroup.all_reduce``): 0 for o_proj, 1 for an MLP's down."""

    parity = 0

    def __init__(self, in_features: int, out: int, *, bias: bool, dtype: torch.dtype, tp: TPGroup,
                 reduce: bool = True) -> None:
        cols = tp.part(in_features, "in_features")
        super().__init__(cols.stop - cols.start, out, bias=bias, dtype=dtype)
        self.tp = tp
        self.reduce = reduce
        self.full_in_features = in_features
        self._cols = cols

    def load_shard(self, param: str, shard: str | None, value: torch.Tensor) -> None:
        """Keep this rank's columns of the whole weight; the bias is kept whole (added once, after the sum)."""
        if param == "weight":
            if value.dim() != 2 or value.shape[1] != self.full_in_features:
                raise ValueError(f"weight: expected {self.full_in_features} input features, "
                                 f"got shape {tuple(value.shape)}")
            value = value[:, self._cols].contiguous()
        super().load_shard(param, shard, value)

    def kept(self, param: str, shard: str | None) -> tuple[slice, ...]:
        """The index into the whole checkpoint tensor ``param`` that this rank keeps: the weight's input
        columns, the whole bias (``()``)."""
        return (slice(None), self._cols) if param == "weight" else ()

    def load_kept(self, param: str, shard: str | None, value: torch.Tensor) -> None:
        """Write ``whole[kept(param, shard)]``, already cut by the caller (``load_shard`` of the whole tensor
        stores the same)."""
        DenseLinear.load_shard(self, param, shard, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in/N] (this rank's features) -> [..., out]: the whole product with ``reduce``; without it
        this rank's partial sum, carrying the bias on rank 0 only so that the caller's sum has it once."""
        y = F.linear(x, self.weight)
        if self.reduce:
            self.tp.all_reduce(y, self.parity)
            return y if self.bias is None else y + self.bias
        if self.bias is not None and self.tp.rank == 0:
            y = y + self.bias
        return y
