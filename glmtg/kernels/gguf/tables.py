"""Lookup tables some GGUF types decode through (IQ4_NL/IQ4_XS values, the IQ grids), as small device
tensors passed to the kernels as ``aux``; types without one get a 1-element placeholder.

The grid types (iq1_s ... iq3_s) get their codebook, one entry per grid row holding the row's levels as
little-endian bytes (level k in byte k): int64 [rows] for the 8-wide grids (iq2_*: levels 8/25/43; iq1_*:
-1/0/1 as int8), int32 [rows] for the 4-wide ones (iq3_*), so a decoder fetches a row with one gather.
The levels are the ``gguf`` package's own (``gguf.quants.<TYPE>.grid``, as glmtg/formats/gguf_iq.py reads
them). No sign table: the decoders compute ggml's ksigns (a parity bit) instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from glmtg.formats.gguf_blocks import IQ4_LEVELS


def _iq4_levels(device: torch.device | str) -> torch.Tensor:
    # float32, not int8: the decoder multiplies by the level directly (the levels are small integers, so
    # fp32 holds them exactly and d * level is the value gguf computes).
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=device)


def _packed_grid(cls_name: str) -> Callable[[torch.device | str], torch.Tensor]:
    """Builder of the packed codebook of ``gguf.quants.<cls_name>`` (see the module docstring)."""

    def build(device: torch.device | str) -> torch.Tensor:
        import gguf.quants  # deferred: only files with these types need the gguf package

        cls = getattr(gguf.quants, cls_name)
        cls.init_grid()
        levels = torch.from_numpy(cls.grid.reshape(cls.grid_shape).astype("float32"))
        # every level is a small integer (1..62, or -1/0/1): a byte holds it exactly; the view packs a
        # row's bytes in memory order: level k in byte k on a little-endian host (x86-64, aarch64)
        packed = torch.int64 if cls.grid_shape[1] == 8 else torch.int32
        return levels.to(torch.int8).contiguous().view(packed).reshape(-1).to(device)

    return build


# Type name -> builder of its table. (IQ4_XS computes its 16 levels in the kernel: no table.)
_TABLES: dict[str, Callable[[torch.device | str], torch.Tensor]] = {
    "iq4_nl": _iq4_levels,
    "iq2_xxs": _packed_grid("IQ2_XXS"),
    "iq2_xs": _packed_grid("IQ2_XS"),
    "iq2_s": _packed_grid("IQ2_S"),
    "iq3_xxs": _packed_grid("IQ3_XXS"),
    "iq3_s": _packed_grid("IQ3_S"),
    "iq1_s": _packed_grid("IQ1_S"),
    "iq1_m": _packed_grid("IQ1_M"),
}


@functools.lru_cache(maxsize=None)
def lookup_table(fmt: str, device: torch.device | str) -> torch.Tensor:
    """The table type ``fmt`` decodes through, on ``device`` (cached: built once per type and device)."""
    build = _TABLES.get(fmt)
    if build is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return build(device)
