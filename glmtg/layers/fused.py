"""Whether a decoder layer's glue runs as glmtg's fused Triton kernels or as plain torch ops.

The glue is everything between the weight reads: residual add + RMSNorm, the router's scoring and top-k,
q/k norm + RoPE, SwiGLU. As torch ops it is ~50 tiny kernels a layer, each a CUDA-graph node of 2-3 µs,
which cost more than the layer's weight reads at batch 1 (bench/DECISIONS.md H4). The fused kernels
(glmtg/kernels/rms_norm.py, router.py, qk_rope.py, gguf/activation.py) do the same arithmetic with the
same roundings in one launch each.

Modes: "auto" (the default) fuses on CUDA inputs only, so a CPU never needs the Triton interpreter;
"on" fuses everywhere (the interpreter on a CPU: how the tests check the wiring); "off" never fuses
(the torch ops, for A/B comparisons).
"""

from __future__ import annotations

import torch

from glmtg.switch import ModeSwitch

MODES = ("auto", "on", "off")
_switch = ModeSwitch("fused glue mode", MODES, "auto")
set_mode = _switch.set
mode = _switch.scoped  # ``with fused.mode("off"): ...``


def fuses(x: torch.Tensor) -> bool:
    """Whether the glue for input ``x`` runs as fused kernels."""
    return _switch.value == "on" or (_switch.value == "auto" and x.is_cuda)
