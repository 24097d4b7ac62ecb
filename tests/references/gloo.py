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


def prefill_then_decode(model: Any, config: Any, num_layers: int, ids: Any, prompt: int, **kw: Any) -> list:
    """A stage's (or a whole model's) logits of a prefill of ids[:, :prompt], then one decode step per later
    column, on a float32 cache of ``num_layers`` layers (the layer-split tests compare these per step)."""
    from tests.references.model import Float32Cache

    batch, total = ids.shape
    cache = Float32Cache(num_layers, batch, total, config.num_key_value_heads, config.head_dim)
    out = []
    for step in [ids[:, :prompt]] + [ids[:, i:i + 1] for i in range(prompt, total)]:
        out.append(model(step, cache, **kw))
        cache.lengths += step.shape[1]
    return out
