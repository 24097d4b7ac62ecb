"""Shared by the quantized-layer tests: random valid GGUF blocks of any format."""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import REGISTRY

MAX_ABS = 16.0  # bound on the values of a drawn block: keeps products in a range where every term counts


def random_blocks(shape: tuple[int, ...], fmt: str, gen: torch.Generator) -> torch.Tensor:
    """uint8 [*shape[:-1], row_bytes] of rows of ``shape[-1]`` values in ``fmt``: random bytes, with every
    block whose values are not all finite and at most MAX_ABS in size (random fp16 scales span 2^-24 ..
    65504) drawn again. Random bytes reach every code and scale pattern, which a quantizer of smooth data
    would not."""
    f = REGISTRY[fmt]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    nb = shape[-1] // f.block_size
    raw = torch.randint(0, 256, (rows * nb, f.type_size), generator=gen, dtype=torch.uint8)
    for _ in range(1000):
        v = f.dequantize_blocks(raw)
        bad = ~(torch.isfinite(v) & (v.abs() <= MAX_ABS)).all(-1)
        if not bad.any():
            return raw.view(*shape[:-1], nb * f.type_size)
        raw[bad] = torch.randint(0, 256, (int(bad.sum()), f.type_size), generator=gen, dtype=torch.uint8)
    raise AssertionError(f"could not draw finite {fmt} blocks")


def values(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """float64 values of raw blocks, by the registry's torch decoder (bit-exact with gguf's)."""
    return REGISTRY[fmt].dequantize_blocks(raw).double()


@pytest.fixture
def blocks():
    """(random_blocks, values) for the tests of this folder."""
    return random_blocks, values
