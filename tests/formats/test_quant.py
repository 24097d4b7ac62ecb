"""glmtg.formats' torch quantize/dequantize against the ``gguf`` package.

Tolerance: none. f16, bf16, q8_0 and q4_0 bytes must equal gguf.quants.quantize's byte for byte, and
dequantized values gguf.quants.dequantize's (NaN where it is NaN); the only exceptions are the ones the
NaN/Inf policy documents (glmtg/formats/quant.py): blocks holding NaN/Inf (gguf's codes there are
undefined; ours are zero codes with a NaN scale) and f16 NaN payloads. fp8 (no gguf type) is checked
against float64 arithmetic: codes are the nearest e4m3 values of x / scale.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from glmtg.formats import FORMATS, FP8_MAX, KV_FORMATS, QK

GGUF_FORMATS = [n for n, f in FORMATS.items() if f.gguf_type is not None]


def awkward(rows: int, blocks: int, seed: int) -> torch.Tensor:
    """float32 [rows, blocks * 32]: normal data at scales 1e-6..1e5 per block, all-zero blocks,
    single outliers, signed zeros, exact q8_0/q4_0 half-way points, ties for the largest |x|."""
    g = torch.Generator().manual_seed(seed)
    n = rows * blocks
    x = torch.randn(n, QK, generator=g) * 10.0 ** torch.empty(n, 1).uniform_(-6, 5, generator=g)
    kind = torch.randint(0, 7, (n,), generator=g)
    e = 2.0 ** torch.randint(-10, 4, (n, 1), generator=g).float()
    x[kind == 1] = 0.0
    x[kind == 2, 5] *= 300.0  # an outlier
    x[kind == 3] = torch.where(torch.randn(int((kind == 3).sum()), QK, generator=g) > 0, 0.0, -0.0)
    half8 = (torch.randint(-127, 127, (n, QK), generator=g) + 0.5) * e
    half8[:, 0] = 127 * e[:, 0]
    x[kind == 4] = half8[kind == 4]
    half4 = (torch.randint(-8, 8, (n, QK), generator=g) + 0.5) * e
    half4[:, 9] = -8 * e[:, 0]
    x[kind == 5] = half4[kind == 5]
    tie = torch.tensor([3.0, -3.0] * 16)
    x[kind == 6] = tie * torch.where(torch.rand(int((kind == 6).sum()), 1, generator=g) > 0.5, 1.0, -1.0)
    return x.reshape(rows, blocks * QK)


def stored_as_gguf(name: str, x: torch.Tensor) -> np.ndarray:
    """Our bytes in gguf's layout: q8_0/q4_0 blocks interleaved (fp16 d, then codes), floats as is."""
    codes, scales = FORMATS[name].quantize(x)
    if scales is None:
        return codes.numpy() if name == "f16" else codes.view(torch.uint8).numpy()
    d = scales.numpy().astype("<f2").view(np.uint8).reshape(*scales.shape, 2)
    c = codes.view(torch.uint8).numpy().reshape(*scales.shape, -1)
    return np.concatenate([d, c], axis=-1).reshape(x.shape[0], -1)


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("name", GGUF_FORMATS)
@pytest.mark.parametrize("rows, blocks", [(1, 1), (7, 3), (33, 5), (5, 17)])
def test_bytes_and_values_equal_gguf(name, rows, blocks):
    x = awkward(rows, blocks, seed=rows * 100 + blocks)
    gtype = gguf.GGMLQuantizationType(FORMATS[name].gguf_type)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.quantize(x.numpy(), gtype)
        theirs_values = gguf.quants.dequantize(theirs, gtype)
    ours = stored_as_gguf(name, x)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours.view(np.uint8), theirs.view(np.uint8))
    codes, scales = FORMATS[name].quantize(x)
    # (d beyond fp16 is stored as inf by both, and inf * 0 is NaN for both)
    assert np.array_equal(FORMATS[name].dequantize(codes, scales).numpy(), theirs_values, equal_nan=True)


@pytest.mark.parametrize("name", GGUF_FORMATS)
def test_narrow_and_wide_inputs_are_quantized_from_float32(name):
    """fp16/bf16 input quantizes as its exact float32 value; float64 is rounded to float32 first."""
    x = awkward(4, 3, seed=5)
    fmt = FORMATS[name]
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        y = x.to(dtype)
        a, b = fmt.quantize(y), fmt.quantize(y.float())
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
        assert a[1] is None or torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("name", KV_FORMATS)
def test_nan_inf_policy(name):
    """A scale group (q8_0/q4_0: 32-value block; fp8: the row) holding NaN or +-Inf gets scale NaN and
    zero codes (q4_0: code 8); other groups are untouched. f16/bf16 keep NaN/Inf element-wise (bf16 with
    gguf's bits: sign and payload kept, quiet bit set)."""
    fmt = FORMATS[name]
    x = awkward(3, 4, seed=9)
    bad = x.clone()
    bad[0, 40] = float("nan")
    bad[1, 3] = float("inf")
    bad[2, 127] = float("-inf")
    codes, scales = fmt.quantize(bad)
    clean_codes, clean_scales = fmt.quantize(x)
    values = fmt.dequantize(codes, scales)
    if not fmt.scaled:
        hit = ~torch.isfinite(bad)
        assert torch.equal(values[hit].isnan(), bad[hit].isnan())
        assert torch.equal(values[hit & ~bad.isnan()], bad[hit & ~bad.isnan()])
        if name == "bf16":
            with np.errstate(all="ignore"):
                theirs = gguf.quants.quantize(bad.numpy(), gguf.GGMLQuantizationType.BF16)
            assert np.array_equal(codes.view(torch.uint8).numpy(), theirs)
        assert torch.equal(values[~hit], fmt.dequantize(clean_codes, None)[~hit])
        return
    group = torch.zeros_like(x, dtype=torch.bool)
    for r, i in ((0, 40), (1, 3), (2, 127)):
        lo, hi = (i // QK * QK, i // QK * QK + QK) if fmt.block_size else (0, x.shape[1])
        group[r, lo:hi] = True
    assert bool(values[group].isnan().all())
    assert torch.equal(values[~group], fmt.dequantize(clean_codes, clean_scales)[~group])
    zero = 0x88 if name == "q4_0" else 0
    if fmt.block_size:
        bad_codes = codes.view(torch.uint8).unflatten(-1, (-1, fmt.type_size - 2))[group[:, ::QK]]
    else:
        bad_codes = codes.view(torch.uint8)[group[:, 0]]
    assert bool((bad_codes == zero).all())


def test_fp8_codes_are_the_nearest_e4m3_values():
    """fp8: scale = amax / 448 per row (float32), and each code is an e4m3 value nearest to x / scale
    (checked in float64 against the two e4m3 neighbours); the row maximum maps to +-448 exactly."""
    x = awkward(9, 4, seed=3)
    codes, scales = FORMATS["fp8"].quantize(x)
    assert torch.equal(scales, x.abs().amax(-1) / FP8_MAX)
    safe = torch.where(scales == 0, 1.0, scales).double()
    target = (x.double() / safe[:, None]).clamp(-FP8_MAX, FP8_MAX)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    grid = grid[torch.isfinite(grid)]
    best = (target[..., None] - grid).abs().min(-1).values
    assert bool(((codes.double() - target).abs() <= best).all())
    nonzero = scales > 0
    assert bool((codes.double().abs().amax(-1)[nonzero] == FP8_MAX).all())


def test_quantize_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        FORMATS["q8_0"].quantize(torch.randn(2, 48))


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("name", ["f16", "bf16"])
def test_float_casts_at_the_edges_equal_gguf(name):
    """Round-to-nearest-even at ties, overflow to inf, subnormals (float32 and of the target), signed
    zeros and infinities: the same bits as gguf."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x00400000,
                         0x80000000, 0x7F800000, 0xFF800000, 0x33800000, 0x33000001, 0x477FF000, 0x477FE000,
                         0x387FC000, 0xB87FE000], dtype=torch.int64)
    x = torch.cat([bits.to(torch.int32).view(torch.float32), torch.randn(48) * 1e4])  # int64 -> int32 wraps
    theirs = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType(FORMATS[name].gguf_type))
    assert np.array_equal(stored_as_gguf(name, x[None])[0].view(np.uint8), theirs.view(np.uint8))
