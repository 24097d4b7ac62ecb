"""Block decoders on the device (Triton; the interpreter on a CPU) against glmtg.formats' torch decoders,
which are bit-exact with ``gguf.quants.dequantize`` (tests/formats). Random bytes: every bit pattern of
codes and scales occurs, including fp16 scales that are inf or NaN, so equality is bitwise with all NaNs
counted equal. Odd shapes: 3 and 5 rows, block counts that are no power of two.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf.decode import DECODED
from glmtg.kernels.gguf.dequant import dequantize_rows


# Triton kernels need CUDA tensors on a GPU machine; on a CPU the interpreter takes CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    both_nan = a.isnan() & b.isnan()
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


def random_rows(name: str, rows: int, blocks: int, seed: int) -> torch.Tensor:
    f = REGISTRY[name]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, blocks * f.type_size), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("name", DECODED)
@pytest.mark.parametrize("rows,blocks", [(3, 5), (5, 3)])
def test_dequantize_rows_matches_torch_decoder(name: str, rows: int, blocks: int) -> None:
    raw = random_rows(name, rows, blocks, seed=rows * 100 + blocks)
    want = REGISTRY[name].dequantize_blocks(raw)
    got = dequantize_rows(raw.to(DEVICE), name).cpu()
    assert got.shape == want.shape
    assert _same_bits(got, want)


@pytest.mark.parametrize("name", DECODED)
def test_dequantize_rows_half_output_is_rounded_values(name: str) -> None:
    raw = random_rows(name, 2, 3, seed=7)
    want = REGISTRY[name].dequantize_blocks(raw).to(torch.float16)
    out = torch.full(want.shape, float("nan"), dtype=torch.float16, device=DEVICE)
    dequantize_rows(raw.to(DEVICE), name, dtype=torch.float16, out=out)
    assert _same_bits(out.float().cpu(), want.float())


def test_dequantize_rows_rejects_bad_input() -> None:
    raw = random_rows("q8_0", 2, 2, seed=1).to(DEVICE)
    with pytest.raises(ValueError, match="fmt"):
        dequantize_rows(raw, "q9_9")
    with pytest.raises(ValueError, match="whole number"):
        dequantize_rows(raw[:, :-2].contiguous(), "q8_0")
    with pytest.raises(ValueError, match="uint8"):
        dequantize_rows(raw.float(), "q8_0")
    with pytest.raises(ValueError, match="dtype"):
        dequantize_rows(raw, "q8_0", dtype=torch.int32)
