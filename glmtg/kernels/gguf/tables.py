"""Lookup tables some GGUF types decode through (IQ4_NL/IQ4_XS values, the IQ grids), as small device
tensors passed to the kernels as ``aux``; types without one get a 1-element placeholder.

The grid types (iq1_s ... iq3_s) get their codebook, one entry per grid row with the row's levels packed
as little-endian bytes: int64 [rows] for the 8-wide grids (iq2_*, iq1_*; iq1 levels -1/0/1 as int8), int32
[rows] for the 4-wide ones (iq3_*), so a decoder fetches a group's levels with one gather. The levels are
the ``gguf`` package's own (``gguf.quants.<TYPE>.grid``, as glmtg/formats/gguf_iq.py reads them). No sign
table: the decoders compute ggml's ksigns (a parity bit) instead.
"""

from __future__ import annotations

import functools

import torch

# grid type -> the gguf.quants class holding its codebook
_GRIDS = {"iq2_xxs": "IQ2_XXS", "iq2_xs": "IQ2_XS", "iq2_s": "IQ2_S", "iq3_xxs": "IQ3_XXS", "iq3_s": "IQ3_S",
          "iq1_s": "IQ1_S", "iq1_m": "IQ1_M"}


def _packed_grid(fmt: str) -> torch.Tensor:
    """gguf's codebook of grid type ``fmt`` packed one row per int64 (8 levels) or int32 (4 levels), on the CPU."""
    import gguf.quants  # deferred: only files with these types need the gguf package

    cls = getattr(gguf.quants, _GRIDS[fmt])
    cls.init_grid()
    levels = torch.from_numpy(cls.grid.reshape(cls.grid_shape).astype("float32"))
    # every level is a small integer (1..62, or -1/0/1 for iq1): a byte holds it exactly
    as_bytes = levels.to(torch.int8).contiguous()
    packed = torch.int64 if cls.grid_shape[1] == 8 else torch.int32
    return as_bytes.view(packed).reshape(-1).clone()


@functools.lru_cache(maxsize=None)
def lookup_table(fmt: str, device: torch.device | str) -> torch.Tensor:
    """The table type ``fmt`` decodes through, on ``device`` (cached: built once per type and device)."""
    if fmt in _GRIDS:
        return _packed_grid(fmt).to(device)
    return torch.zeros(1, dtype=torch.int32, device=device)
