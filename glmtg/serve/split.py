"""``glmtg serve -sm graph|layer --gpus N``: rank 0 serves, ranks 1..N-1 follow its model steps.

Rank 0 runs everything a one-process server runs (HTTP, scheduler, block manager, sampling) and its
``ModelRunner``; every other rank holds its part of the model (its KV heads under ``-sm graph``, its layers
under ``-sm layer``) in a ``ModelRunner`` of its own whose KV pool has the same number of pages, so the
block tables rank 0's block manager hands out mean the same pages on every rank.

Design: before each forward, rank 0's runner (its ``before_forward`` hook, called after the batch passed
the runner's host checks) broadcasts the step: a header ``[kind, n]`` and then ``n`` int64 values holding
every row's tokens, start position and block table (``encode``). A follower (``follow``) receives it and
calls ``ModelRunner.forward_rows`` with the same rows, so it runs the same forwards in the same order (the
same eager forwards, the same CUDA-graph replays), and the all-reduces (``-sm graph``) or the activation
hand-offs and the logits broadcast (``-sm layer``: the last stage's logits reach every rank inside
``LayerSplitModel.forward``) pair up. Followers discard the logits; rank 0 alone samples. A ``STOP`` header,
sent once rank 0's engine thread has ended, ends the followers.

The messages go through their own gloo group on the host (``control_group``), whatever the model's
backend: the step's lists live on the host anyway (each runner builds its device tensors from them), and
the group's timeout is a year, because a follower waits in that broadcast for as long as the server has
nothing to do (the default group's 30 minutes, or NCCL's watchdog, would end an idle server).

The start-up order is the same on every rank: each builds its runner, whose CUDA graphs capture the
batch sizes smallest first (``DecodeGraphs.capture``), so the collectives inside the captures pair up;
``check_runners_agree`` then refuses ranks whose pools or captured sizes differ (a capture that failed on
one rank only).

Shutdown: Ctrl-C reaches every rank of the terminal's process group; followers ignore it, rank 0's uvicorn
shuts the server down, and rank 0 then sends STOP (glmtg.cli.serve). Limit: a follower that dies does not
leave a server answering 503 on /health: the launcher (``glmtg.parallel.launch.spawn``, torch's
``mp.spawn``) sees the failed rank and terminates the others (SIGTERM, after 30 s SIGKILL), so uvicorn
shuts down and the command ends with an error instead of hanging (seen on CPU: kill -9 of rank 1 ends the
server within a second). Had rank 0 been left running, its next step's broadcast would fail under gloo
(the engine marked dead, 503), but a step's NCCL collective could wait until NCCL's own timeout.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["STEP", "STOP", "StepBroadcaster", "check_runners_agree", "control_group", "decode", "encode",
           "follow"]

STOP, STEP = 0, 1
_IDLE_TIMEOUT = timedelta(days=365)  # a follower waits this long for the next step of an idle server


def control_group() -> Any:
    """A gloo group of every rank for the step messages (every rank must call it, in the same order)."""
    return dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)


def encode(token_ids: Sequence[Sequence[int]], starts: Sequence[int], tables: Sequence[Sequence[int]]) -> list[int]:
    """The rows of one step as a flat list of ints: rows, then (tokens, start, pages) counts and start per
    row, then every row's tokens, then every row's pages."""
    rows = len(token_ids)
    out = [rows]
    for tokens, start, table in zip(token_ids, starts, tables):
        out += (len(tokens), start, len(table))
    for tokens in token_ids:
        out += tokens
    for table in tables:
        out += table
    return out


def decode(flat: Sequence[int]) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """``encode``'s inverse: (token_ids, starts, tables)."""
    rows = flat[0]
    heads = [flat[1 + 3 * i: 4 + 3 * i] for i in range(rows)]
    pos = 1 + 3 * rows
    token_ids = []
    for n, _, _ in heads:
        token_ids.append(list(flat[pos:pos + n]))
        pos += n
    tables = []
    for _, _, n in heads:
        tables.append(list(flat[pos:pos + n]))
        pos += n
    if pos != len(flat):
        raise ValueError(f"a step message of {len(flat)} values holds {pos}")
    return token_ids, [h[1] for h in heads], tables


def _send(kind: int, payload: list[int], group: Any) -> None:
    dist.broadcast(torch.tensor([kind, len(payload)], dtype=torch.int64), src=0, group=group)
    if payload:
        dist.broadcast(torch.tensor(payload, dtype=torch.int64), src=0, group=group)


class StepBroadcaster:
    """Rank 0's side: set as its runner's ``before_forward``; ``stop()`` once no step will follow.

    Called from the engine thread only, and ``stop`` after that thread has ended, so messages never interleave
    (nothing else on rank 0 uses the control group).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.stopped = False
        self.steps = 0

    def __call__(self, batch: Any) -> None:
        if self.stopped:
            raise RuntimeError("the follower ranks have been stopped")
        _send(STEP, encode(batch.token_ids, batch.start_positions, batch.block_tables), self.group)
        self.steps += 1

    def stop(self) -> None:
        """End the followers' loops (once)."""
        if not self.stopped:
            self.stopped = True
            _send(STOP, [], self.group)


def follow(runner: Any, group: Any) -> int:
    """A follower's loop: run every step rank 0 sends on ``runner`` (a ``ModelRunner``) until STOP; returns
    the number of steps run."""
    header = torch.empty(2, dtype=torch.int64)
    steps = 0
    while True:
        dist.broadcast(header, src=0, group=group)
        kind, n = header.tolist()
        if kind == STOP:
            return steps
        if kind != STEP or n < 1:
            raise RuntimeError(f"unexpected step message from rank 0: kind {kind}, {n} values")
        payload = torch.empty(n, dtype=torch.int64)
        dist.broadcast(payload, src=0, group=group)
        runner.forward_rows(*decode(payload.tolist()))
        steps += 1


def check_runners_agree(runner: Any, group: Any) -> None:
    """ValueError on every rank when the ranks' runners differ in what the shared block tables rely on: the
    pool's usable pages, pages per sequence, page size, and the captured CUDA-graph sizes (None: eager)."""
    graphs = getattr(runner, "graphs", None)
    mine = (runner.num_blocks, runner.max_pages, runner.block_size, None if graphs is None else graphs.sizes)
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if any(other != every[0] for other in every):
        raise ValueError("the ranks' serve runners differ (pages, pages per sequence, page size, CUDA-graph "
                         f"sizes) by rank: {every}; a CUDA graph capture may have failed on one rank only")
