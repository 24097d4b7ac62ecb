"""The tensor-parallel group of one process: its rank, the world size, and the sum across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glmtg.parallel.peer_sum import peer_sum_for


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

    def all_reduce(self, x: torch.Tensor, parity: int = 0) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x`` (every rank gets the same sum).

        Small CUDA messages go through peer GPU memory (glmtg/parallel/peer_sum.py), the rest through the
        group's backend. ``parity``: the call site's place in a layer's alternating sums (attention 0, MLP
        1), which picks the peer-memory buffer so that consecutive sums never share one."""
        if self.world_size > 1:
            if x.is_cuda:
                fast = peer_sum_for(self.group, x)
                if fast is not None and fast.applies(x):
                    return fast(x, parity)
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` [..., n] side by side in rank order: [..., N * n] (the same on every rank)."""
        if self.world_size == 1:
            return x
        parts = x.new_empty((self.world_size, *x.shape))
        if x.is_cuda:
            dist.all_gather_into_tensor(parts, x.contiguous(), group=self.group)
        else:  # gloo: the list form
            dist.all_gather(list(parts.unbind(0)), x.contiguous(), group=self.group)
        return parts.movedim(0, -2).reshape(*x.shape[:-1], self.world_size * x.shape[-1])
