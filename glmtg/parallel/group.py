"""The tensor-parallel group of one process: its rank, the world size, and the sum across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """Rank ``rank`` of ``world_size`` processes that each hold a part of every layer.

    ``group`` is the torch.distributed process group the sums run through (None: the default group, which
    the caller set up with ``dist.init_process_group``). A group of one sums nothing and needs no
    torch.distributed at all, so the single-process model and a one-rank split are the same code.
    """

    rank: int
    world_size: int
    group: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or isinstance(self.world_size, bool) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {self.world_size!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {self.rank!r}")

    @classmethod
    def single(cls) -> TPGroup:
        """One process holding everything."""
        return cls(0, 1)

    @classmethod
    def from_default(cls) -> TPGroup:
        """This process's place in the default torch.distributed group (initialised by the caller)."""
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised: call dist.init_process_group first")
        return cls(dist.get_rank(), dist.get_world_size())

    def part(self, size: int, what: str) -> slice:
        """This rank's even slice of ``size`` items; ValueError naming ``what`` unless N divides ``size``."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) must be a multiple of the tensor-parallel size {self.world_size}")
        n = size // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x`` (every rank gets the same sum)."""
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x
