"""Starting gloo ranks in the tests: glmtg.parallel.launch.spawn, retried once when a rank is killed by a
signal.

On a loaded 2-core machine gloo has been seen to abort a rank (SIGABRT inside its transport, ~1 run in 10-20,
never reproduced alone) after the ranks computed and compared their results. A rank that raises (a failed
assertion, a wrong logit) is never retried: only a death by signal is, once, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch.multiprocessing import ProcessExitedException

from glmtg.parallel.launch import spawn


def spawn_ranks(fn: Callable[..., Any], world_size: int, args: tuple = ()) -> None:
    try:
        spawn(fn, world_size, args)
    except ProcessExitedException as e:
        if not e.signal_name:
            raise
        warnings.warn(f"rank {e.error_index} died by {e.signal_name}; running the ranks once more", stacklevel=2)
        spawn(fn, world_size, args)


def prefill_then_decode(model: Any, config: Any, num_layers: int, ids: Any, prompt: int, *,
                        kv_heads: int | None = None, **kw: Any) -> list:
    """A rank's (or a whole model's) logits of a prefill of ids[:, :prompt], then one decode step per later
    column (fixed tokens, so every model sees the same inputs), on a float32 cache of ``num_layers`` layers
    and ``kv_heads`` KV heads (default: the config's; a tensor-parallel rank holds fewer)."""
    from tests.references.model import Float32Cache

    batch, total = ids.shape
    heads = config.num_key_value_heads if kv_heads is None else kv_heads
    cache = Float32Cache(num_layers, batch, total, heads, config.head_dim)
    out = []
    for step in [ids[:, :prompt]] + [ids[:, i:i + 1] for i in range(prompt, total)]:
        out.append(model(step, cache, **kw))
        cache.lengths += step.shape[1]
    return out


def assert_rank_logits(got: list, ref: list, rel_tol: float, rank: int, world: int) -> None:
    """Each step's logits within ``rel_tol`` of the largest reference logit, and every rank's last logits
    bitwise rank 0's (the all-reduce hands each rank the same sum)."""
    import torch
    import torch.distributed as dist

    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        err, scale = (g - r).abs().max().item(), r.abs().max().item()
        assert err <= rel_tol * scale, f"rank {rank}/{world} step {i}: max |diff| {err:.3g} vs max |ref| {scale:.3g}"
    mine = got[-1].clone()
    dist.broadcast(mine, src=0)
    assert torch.equal(mine, got[-1]), f"rank {rank} logits differ from rank 0's"
