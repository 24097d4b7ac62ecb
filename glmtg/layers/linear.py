"""The projection seam: every matrix a layer multiplies its input by is a ``Linear``.

A Linear's output rows are made of named shards: q/k/v of the attention input projection, gate/up of a
SwiGLU. They are stored as one matrix, so a decode step reads them with one product instead of three or two
launches; a checkpoint holds each shard as its own tensor, and ``load_shard`` writes it into its rows when
the weights are assigned, never at run time.

``DenseLinear`` is the only kind today. A quantized linear (GGUF blocks) keeps this interface and packs the
incoming tensor in ``load_shard``. A tensor-parallel linear holds a slice of each shard's rows
(column-parallel) or of the input features (row-parallel); its ``load_shard`` cuts its part out of the
full shard it is given, so loaders stay the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from glmtg.layers.params import write_parameter

Shards = Sequence[tuple[str, int]]  # (name, rows) of each output block, in output order


class Linear(nn.Module):
    """y = x Wᵀ (+ b) with W's rows in named shards. Subclasses store W and implement forward/load_shard.

    ``out`` is the number of output rows (one unnamed shard) or the named shards. ``shard`` None in the
    methods below means the whole output.
    """

    def __init__(self, in_features: int, out: int | Shards, bias: bool) -> None:
        super().__init__()
        shards = ((None, out),) if isinstance(out, int) else tuple(out)
        if not shards or any(not isinstance(rows, int) or rows < 1 for _, rows in shards):
            raise ValueError(f"out must be a positive int or (name, positive rows) pairs, got {out!r}")
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.shards: tuple[tuple[str | None, int], ...] = shards
        self.out_features = sum(rows for _, rows in shards)
        self.has_bias = bias
        self._rows: dict[str | None, slice] = {}
        start = 0
        for name, rows in shards:
            self._rows[name] = slice(start, start + rows)
            start += rows

    def rows(self, shard: str | None) -> slice:
        """The output rows of ``shard`` (all of them for None)."""
        if shard is None:
            return slice(0, self.out_features)
        if shard not in self._rows:
            raise ValueError(f"shard must be one of {[n for n, _ in self.shards]}, got {shard!r}")
        return self._rows[shard]

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The forward output [..., out_features] cut into its shards (views, no copy)."""
        return y.split([rows for _, rows in self.shards], dim=-1)

    def slots(self) -> Iterator[tuple[str, str | None, tuple[int, ...]]]:
        """(parameter, shard, shape) of every tensor a checkpoint provides, shard by shard."""
        for name, rows in self.shards:
            yield "weight", name, (rows, self.in_features)
            if self.has_bias:
                yield "bias", name, (rows,)

    def load_shard(self, param: str, shard: str | None, value: torch.Tensor) -> None:
        """Store checkpoint tensor ``value`` (in the checkpoint's layout) as ``param``'s rows of ``shard``.
        Called once per tensor at load time; how it is stored (plain, quantized, a slice) is the subclass's."""
        raise NotImplementedError(f"{type(self).__name__} does not implement load_shard")


class DenseLinear(Linear):
    """Plain weight [out_features, in_features] (and bias [out_features]) in the model dtype."""

    def __init__(self, in_features: int, out: int | Shards, *, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, out, bias)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, param: str, shard: str | None, value: torch.Tensor) -> None:
        """Write a checkpoint tensor: the whole ``param`` ("weight" or "bias") for shard None or a
        single-shard linear (no copy), else into the rows of ``shard``."""
        allowed = ("weight", "bias") if self.has_bias else ("weight",)
        if param not in allowed:
            raise ValueError(f"param must be one of {allowed}, got {param!r}")
        whole = shard is None or (len(self.shards) == 1 and self.rows(shard) == self.rows(None))
        write_parameter(self, param, value, None if whole else self.rows(shard))
