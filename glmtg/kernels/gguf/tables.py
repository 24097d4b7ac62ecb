"""Lookup tables some GGUF types decode through (IQ4_NL/IQ4_XS values, the IQ grids), as small device
tensors passed to the kernels as ``aux``; types without one get a 1-element placeholder."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from glmtg.formats.gguf_blocks import IQ4_LEVELS


def _iq4_levels(device: torch.device | str) -> torch.Tensor:
    # float32, not int8: the decoder multiplies by the level directly (the levels are small integers, so
    # fp32 holds them exactly and d * level is the value gguf computes).
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=device)


# Type name -> builder of its table. IQ4_XS uses IQ4_NL's 16 levels (one table, two types).
_TABLES: dict[str, Callable[[torch.device | str], torch.Tensor]] = {
    "iq4_nl": _iq4_levels,
    "iq4_xs": _iq4_levels,
}


@functools.lru_cache(maxsize=None)
def lookup_table(fmt: str, device: torch.device | str) -> torch.Tensor:
    """The table type ``fmt`` decodes through, on ``device`` (cached: built once per type and device)."""
    build = _TABLES.get(fmt)
    if build is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return build(device)
