"""Capturing one step of work in a CUDA graph: the warm-up and capture sequence the engines share.

``glmtg.engine.Engine`` captures its rectangular decode step with it, ``glmtg.serve.graphs`` one decode step
per batch size. Kept apart from both so that neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["capture_graph"]


def capture_graph(step: Callable[[], None], device: torch.device, pool: object,
                  restore: Callable[[], None] | None = None, warmups: int = 2) -> torch.cuda.CUDAGraph:
    """Run ``step`` ``warmups`` times on a side stream, then capture one call of it in a new graph.

    The warm-up runs execute for real, so lazy initialisation (cuBLAS handles, Triton autotuning and
    compilation) happens outside the capture. ``restore`` (when given) puts back whatever state ``step``
    changes: it runs after each warm-up and after the capture, also when the capture fails, so the caller's
    state is the same as before the call. ``pool`` is a ``torch.cuda.graph_pool_handle()`` that graphs of one
    owner share (they never run at once). Exceptions of the warm-up or capture propagate.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                step()
                if restore is not None:
                    restore()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
    finally:
        if restore is not None:
            restore()
    return graph
