"""Programmatic dependent launch (PDL) between the kernels of a decode step.

Why: at batch 1 a decode step is ~200 short kernels in one CUDA graph. Without PDL each kernel starts only
after the one before has fully drained, so every launch adds its node latency and its ramp-up to the
step. With PDL (Hopper and later) a kernel is launched while the one before is still running: its
programs are scheduled onto the SMs the previous kernel frees, and wait at ``griddepcontrol.wait`` until
that kernel has completed and its writes are visible. What it buys, and a variant that lost (an L2
prefetch of the weights before the wait): bench/DECISIONS.md H5.

The contract every kernel launched with PDL keeps (``launch_kwargs`` sets the launch attribute):
- nothing before ``wait_and_release`` reads a tensor an earlier kernel writes, or stores anything (the
  kernel before may still be reading or writing those buffers);
- ``wait_and_release`` also lets the next kernel launch (gdc_launch_dependents). Order stays transitive:
  a kernel passes its wait only after the one before it completed, which itself passed its own wait.
A kernel launched without the attribute (on a CPU, before sm_90, with ``GLMTG_PDL=off``) runs both as
no-ops, so the same compiled code serves both.

Mode: ``GLMTG_PDL`` = "auto" (the default: CUDA devices of compute capability 9.0 and later) or "off" (plain
launches, for A/B comparisons); ``mode()`` switches it for a block.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton.language as tl
from triton import jit

from glmtg.switch import ModeSwitch

MODES = ("auto", "off")
_switch = ModeSwitch("GLMTG_PDL (the PDL mode)", MODES, os.environ.get("GLMTG_PDL", "auto"))
set_mode = _switch.set
mode = _switch.scoped  # ``with pdl.mode("off"): ...``


@lru_cache(maxsize=None)
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL."""
    if _switch.value == "off" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _hopper(device.index if device.index is not None else torch.cuda.current_device())


def launch_kwargs(device: torch.device) -> dict:
    """Extra keyword arguments of a Triton launch on ``device``: the PDL attribute where ``enabled``."""
    return {"launch_pdl": True} if enabled(device) else {}


@jit
def wait_and_release(PDL: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one launch. No-op unless PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
