"""The grid-type block decoders (glmtg/kernels/gguf/decode_iq.py) beyond test_dequant.py's random bytes:
blocks with finite fp16 scales checked bit for bit against ``gguf.quants.dequantize`` itself (random bytes
make many scales inf or NaN, where a wrong product can hide behind a NaN), odd row and block counts that
leave blocks of a program masked, an output poisoned with NaN, and the lookup tables equal to the gguf
package's grids.
"""

from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf.decode import DECODED
from glmtg.kernels.gguf.dequant import dequantize_rows
from glmtg.kernels.gguf.tables import lookup_table

GRID_TYPES = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m")
DONE = tuple(n for n in GRID_TYPES if n in DECODED)


def _finite_scale_rows(name: str, rows: int, blocks: int, seed: int) -> torch.Tensor:
    """Random block bytes whose fp16 super-block scale is a random finite normal number, +-[2^-8, 2^4)."""
    f = REGISTRY[name]
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, blocks, f.type_size), dtype=torch.uint8, generator=gen)
    exponent = torch.randint(15 - 8, 15 + 4, (rows, blocks), generator=gen)  # fp16 bias 15
    bits = (torch.randint(0, 2, (rows, blocks), generator=gen) << 15) | (exponent << 10) \
        | torch.randint(0, 1 << 10, (rows, blocks), generator=gen)
    if name == "iq1_m":
        # the fp16 scale lives in the top nibbles of the four uint16 words at bytes 48..55, low nibble first
        for w in range(4):
            hi = raw[:, :, 48 + 2 * w + 1]
            raw[:, :, 48 + 2 * w + 1] = (hi & 0x0F) | (((bits >> (4 * w)) & 0xF) << 4).to(torch.uint8)
    else:
        raw[:, :, 0] = (bits & 0xFF).to(torch.uint8)
        raw[:, :, 1] = (bits >> 8).to(torch.uint8)
    return raw.reshape(rows, blocks * f.type_size)


@pytest.mark.parametrize("name", DONE)
@pytest.mark.parametrize("rows,blocks", [(3, 5), (1, 3)])
def test_finite_scales_bit_exact_with_gguf(name: str, rows: int, blocks: int) -> None:
    raw = _finite_scale_rows(name, rows, blocks, seed=rows * 10 + blocks)
    qtype = gguf.GGMLQuantizationType(REGISTRY[name].gguf_type)
    want = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).astype(np.float32))
    assert bool(want.isfinite().all())  # the point of this test: no scale hides an error behind NaN/Inf
    out = torch.full(want.shape, float("nan"), dtype=torch.float32)
    got = dequantize_rows(raw, name, out=out)
    # bit for bit: the decoders form gguf's fp32 products in gguf's order
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("name", GRID_TYPES)
def test_lookup_table_is_gguf_grid(name: str) -> None:
    cls = getattr(gguf.quants, name.upper())
    cls.init_grid()
    grid = torch.from_numpy(cls.grid.reshape(cls.grid_shape).astype(np.float32))
    table = lookup_table(name, "cpu")
    assert table.dtype == (torch.int64 if grid.shape[1] == 8 else torch.int32)
    assert table.shape == (grid.shape[0],)
    # entry e holds row e's levels as little-endian signed bytes, level k in byte k
    shifts = torch.arange(grid.shape[1], dtype=torch.int64) * 8
    levels = ((table.to(torch.int64)[:, None] >> shifts) & 0xFF).to(torch.uint8).view(torch.int8)
    assert torch.equal(levels.float(), grid)
    assert lookup_table(name, "cpu") is table  # built once per type and device
