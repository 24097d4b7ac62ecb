"""Tensor parallelism (``-sm graph``): one model split over N processes that sum their parts.

- ``group``: ``TPGroup``, this process's rank, the world size and the torch.distributed group the sums run
  through (gloo on CPU, NCCL on GPUs).
- ``linear``: ``ColumnParallelLinear`` (a slice of every named shard's output rows) and
  ``RowParallelLinear`` (a slice of the input features; partial outputs summed across ranks).
- ``model``: ``build_tp_model`` (the GLM4-MoE layout of one rank) and ``load_from_full`` (its weights cut out
  of a whole model's tensors through ``load_tensor``, so every loader stays the same).
"""

from glmtg.parallel.group import TPGroup
from glmtg.parallel.linear import ColumnParallelLinear, RowParallelLinear
from glmtg.parallel.model import ParallelMoE, build_tp_model, load_from_full, local_kv_heads

__all__ = ["ColumnParallelLinear", "ParallelMoE", "RowParallelLinear", "TPGroup", "build_tp_model",
           "load_from_full", "local_kv_heads"]
