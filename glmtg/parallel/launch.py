"""Starting the ranks: N processes on this host joined in one torch.distributed group, and the shapes each
rank's engine gives its KV cache."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glmtg.config import ModelConfig
from glmtg.parallel.group import TPGroup

SPLIT_MODES = ("graph", "layer")


def _rank_main(rank: int, world: int, store: str, backend: str, fn: Callable[..., Any], args: tuple) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(TPGroup(rank, world), *args)
        # Every rank leaves together: a rank that tears its connections down while a peer still sends or
        # receives makes gloo abort that peer (SIGABRT), seen now and then on a loaded CPU.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), backend: str = "gloo") -> None:
    """Run ``fn(group, *args)`` in ``world_size`` new processes (rank r uses GPU r with NCCL), each in the
    default process group; returns when all have finished, raising if any failed. ``fn`` must be a
    module-level function (the processes are spawned, not forked, and import it).

    The ranks meet through a file store in a fresh temporary directory: no port to pick, so no port race.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"{world_size} ranks need {world_size} GPUs, {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="glmtg-ranks-") as tmp:
        mp.spawn(_rank_main, args=(world_size, os.path.join(tmp, "store"), backend, fn, args),
                 nprocs=world_size, join=True)


def rank_cache_config(config: ModelConfig, mode: str, group: TPGroup, layers: tuple[int, int] | None = None
                      ) -> ModelConfig:
    """The config a rank's ``Engine`` is given so that its KV cache has the rank's shape: Hkv/N heads
    (``graph``; query heads Hq/N with them) or the ``layers`` (start, stop) it holds (``layer``). Vocabulary,
    EOS ids and positions stay the model's, so sampling and the context checks are the same on every rank."""
    if mode == "graph":
        n = group.world_size
        if config.num_key_value_heads % n:
            raise ValueError(f"num_key_value_heads ({config.num_key_value_heads}) must be a multiple of the "
                             f"tensor-parallel size {n}")
        return dataclasses.replace(config, num_key_value_heads=config.num_key_value_heads // n,
                                   num_attention_heads=config.num_attention_heads // n)
    if mode == "layer":
        if layers is None:
            raise ValueError("layers (start, stop) is needed for mode 'layer'")
        start, stop = layers
        return dataclasses.replace(config, num_hidden_layers=stop - start,
                                   first_k_dense_replace=min(max(config.first_k_dense_replace - start, 0),
                                                             stop - start))
    raise ValueError(f"mode must be one of {SPLIT_MODES}, got {mode!r}")
