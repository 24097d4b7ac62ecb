"""Small all-reduces through peer GPU memory: the decode step's two sums per layer without NCCL's latency.

At batch 1 a layer's sums are a few KB, so they cost latency, not bandwidth. Torch's symmetric memory gives
every rank a buffer its peers can read over NVLink; its one-shot all-reduce copies the local input into
that buffer, meets the peers at a barrier of flags in peer memory, and sums every rank's buffer into the
output: one kernel, no NCCL proxy, and it replays inside a CUDA graph. No NVLink multicast is involved
(the machines keep it off). Measured against NCCL in bench/DECISIONS.md K1.

Buffer reuse: a rank may write its buffer for the next sum as soon as it leaves the current one's barrier,
while a slower peer may still be reading the current one. So two buffers alternate, chosen by the call
site's ``parity`` (a layer's attention sum 0, its MLP sum 1): consecutive sums of a step, and the last sum
of one step and the first of the next, use different buffers, and writing a buffer again needs every peer
past the barrier of the sum in between, that is, done reading it.

``GLMTG_ALLREDUCE=nccl`` turns the path off (A/B); ``auto`` uses it on CUDA where torch has it, for messages
up to ``MAX_BYTES``, and NCCL otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from glmtg.switch import ModeSwitch

MODES = ("auto", "nccl")
_switch = ModeSwitch("GLMTG_ALLREDUCE (the all-reduce path)", MODES, os.environ.get("GLMTG_ALLREDUCE", "auto"))
set_mode = _switch.set
mode = _switch.scoped  # ``with peer_sum.mode("nccl"): ...``

# Above this, NCCL's ring/tree bandwidth wins over every rank reading every peer's whole message.
MAX_BYTES = 256 * 1024
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _ops() -> Any:
    ops = getattr(torch.ops, "symm_mem", None)
    return ops if ops is not None and hasattr(ops, "one_shot_all_reduce_out") else None


class PeerSum:
    """The one-shot sums of one process group on one device: two buffers per dtype (``parity``)."""

    def __init__(self, group: Any, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = (group or dist.group.WORLD).group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        for dtype in _DTYPES:  # every rank allocates the same buffers in the same order (collective)
            for parity in (0, 1):
                buf = symm_mem.empty(MAX_BYTES // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
                symm_mem.rendezvous(buf, self.group_name)
                self.buffers[dtype, parity] = buf

    def applies(self, x: torch.Tensor) -> bool:
        return (x.dtype in _DTYPES and x.is_contiguous() and x.numel() * x.element_size() <= MAX_BYTES)

    def __call__(self, x: torch.Tensor, parity: int) -> torch.Tensor:
        """Sum ``x`` over the ranks in place (``applies(x)`` must hold); returns ``x``."""
        buf = self.buffers[x.dtype, parity & 1][: x.numel()].view(x.shape)
        buf.copy_(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.group_name, x)
        return x


_by_group: dict[tuple[int, int], PeerSum | None] = {}


def peer_sum_for(group: Any, x: torch.Tensor) -> PeerSum | None:
    """The PeerSum of ``group`` on ``x``'s device, made on first use (all ranks reach their first CUDA sum
    together, so the collective set-up lines up); None where the path is off or unavailable. Never made
    inside a graph capture (the set-up exchanges handles through the store): the caller uses NCCL then."""
    if _switch.value != "auto" or not x.is_cuda:
        return None
    key = (id(group), x.device.index or 0)
    if key not in _by_group:  # decided once per group and device, off the per-sum path
        if torch.cuda.is_current_stream_capturing():
            return None
        if _ops() is None:  # this torch has no one-shot all-reduce: NCCL from now on
            _by_group[key] = None
        else:
            try:
                _by_group[key] = PeerSum(group, x.device)
            except Exception:  # no peer access or no symmetric memory in this build: NCCL from now on
                _by_group[key] = None
    return _by_group[key]
