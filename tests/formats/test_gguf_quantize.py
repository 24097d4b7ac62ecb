"""quantize_blocks: float weights -> GGUF blocks in torch.

- f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1: byte for byte against ``gguf.quants.quantize`` (no
  tolerance: both compute in float32 with one correct rounding per operation), on random rows whose blocks
  differ in magnitude by up to 2^±30, plus blocks of exact ties, zeros (of both signs), huge values (fp16
  overflow of d, values near float32's maximum) and NaN payloads for the float types.
- q2_k ... q6_k, iq4_nl, iq4_xs (no reference quantizer exists): decoded by the registry's bit-exact
  ``dequantize_blocks``, every value lies within the bound gguf_quantize_k.py derives (restated per type in
  ``_bound``), computed here in float64 from the input alone; and the RMSE on fixed N(0, 1) rows stays
  within 10% of llama.cpp's own quantizer's (numbers measured once, in LLAMA_CPP_REL_RMSE).
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
import torch

import glmtg.formats.gguf_quantize as gq
import glmtg.formats.gguf_quantize_k as gqk
from glmtg.formats import QUANTIZABLE, REGISTRY, dequantize_blocks, quantize_blocks

QT = gguf.GGMLQuantizationType
EXACT = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BOUNDED = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")


def _reference(x: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # fp16 overflow of d is a case
        out = gguf.quants.quantize(x, QT[name.upper()])
    return out.view(np.uint8).reshape(*x.shape[:-1], -1)


def _rows(rng: np.random.Generator, lead: tuple[int, ...], k: int, block: int) -> np.ndarray:
    """float32 [*lead, k]: normal values, each block scaled by its own 2^U(-30, 30)."""
    x = rng.standard_normal((*lead, k // block, block)) * np.exp2(rng.uniform(-30, 30, (*lead, k // block, 1)))
    return x.reshape(*lead, k).astype(np.float32)


def _special_blocks(rng: np.random.Generator, signed_zeros: bool) -> np.ndarray:
    """float32 [n, 32] blocks that stress gguf's rounding and edge cases (shared by all 32-value types).
    ``signed_zeros``: a block of -0 and +0, whose bytes gguf defines only where it takes the signed value of
    largest magnitude (argmax), not where it reduces with min/max (q4_1, q5_1: numpy returns either zero)."""
    blocks = []
    # exact ties for each type's scale: half-integers with the extreme value fixing d to 1 (then scaled by
    # powers of two, which keeps them ties): q8_0 (amax 127), q4_0 (-8), q5_0 (-16), q4_1 (0..15), q5_1 (0..31)
    for lo, hi in ((-127, 127), (-8, 8), (-16, 16), (0, 15), (0, 31)):
        b = rng.integers(2 * lo, 2 * hi + 1, 32) / 2.0
        b[rng.integers(32)] = lo
        b[rng.integers(32)] = hi
        blocks += [b, b * 2.0 ** rng.integers(-20, 20)]
    blocks.append(np.zeros(32))
    if signed_zeros:
        blocks.append(np.where(rng.random(32) < 0.5, -0.0, 0.0))  # the sign of d follows argmax
    equal = np.full(32, -3.0)  # every |x| maximal: gguf takes the first
    equal[::3] = 3.0
    blocks.append(equal)
    huge = rng.standard_normal(32)
    huge[7] = 1e7  # d overflows fp16 to Inf
    blocks.append(huge)
    near_max = np.abs(rng.standard_normal(32))
    near_max[3] = 3e38  # close to float32's maximum (one sign only: max - min stays finite)
    blocks.append(near_max)
    blocks.append(rng.standard_normal(32) * 1e-30)  # tiny, but 1/d still finite
    blocks += [rng.standard_normal(32)] * (-len(blocks) % 3)  # whole rows of 96 values
    return np.stack(blocks).astype(np.float32)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [None, 64])
def test_bit_exact_with_gguf(name: str, dtype: torch.dtype, chunk: int | None, monkeypatch) -> None:
    """Same bytes as gguf.quants.quantize on the float32 values of the input, any input dtype, in one chunk
    or in many (chunk 64 values: one row per chunk)."""
    rng = np.random.default_rng(zlib.crc32(f"{name} {dtype}".encode()))
    if chunk is not None:
        monkeypatch.setattr(gq, "CHUNK_VALUES", chunk)
    x = _rows(rng, (3, 5), 96, 32)
    special = _special_blocks(rng, signed_zeros=name not in ("q4_1", "q5_1"))
    rows = np.concatenate([special.reshape(-1, 96), x.reshape(-1, 96)])
    t = torch.from_numpy(rows).to(dtype)
    if dtype == torch.float16:
        # keep fp16 inputs finite (the cases beyond fp16's range are float32's), and make the zeros that
        # tiny values underflow to +0 (signed zeros where gguf leaves them undefined: _special_blocks)
        t = torch.from_numpy(np.clip(rows, -6e4, 6e4)).to(dtype) + 0.0
    got = quantize_blocks(t, name)
    want = _reference(t.float().numpy(), name)
    assert got.dtype == torch.uint8 and got.shape == (len(rows), REGISTRY[name].blocks_bytes(96))
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("name", ["q8_0", "q4_k"])
def test_strided_input(name: str) -> None:
    """A column slice and a transposed view quantize as their contiguous copies do."""
    x = torch.from_numpy(_k_rows(np.random.default_rng(3), 4, 512, 32))
    wide = torch.cat([x, x[:, :256]], dim=1)[:, :512]
    assert not wide.is_contiguous()
    assert torch.equal(quantize_blocks(wide, name), quantize_blocks(x, name))
    assert torch.equal(quantize_blocks(x.t().contiguous().t(), name), quantize_blocks(x, name))


def test_leading_shape_kept() -> None:
    rng = np.random.default_rng(1)
    x = _rows(rng, (2, 3), 64, 32)
    got = quantize_blocks(torch.from_numpy(x), "q4_1")
    assert got.shape == (2, 3, REGISTRY["q4_1"].blocks_bytes(64))
    np.testing.assert_array_equal(got.numpy(), _reference(x, "q4_1"))


@pytest.mark.parametrize("name", ["f16", "bf16"])
def test_float_nan_payloads(name: str) -> None:
    """NaN bits as gguf writes them: bf16 quiets and keeps the top payload bits, numpy's fp16 cast keeps the
    top 10 payload bits (signalling NaNs stay signalling) and sets the lowest when none survive."""
    bits = np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FA00000, 0x7F802000, 0xFF80E000, 0x3F800000],
                    dtype=np.uint32)
    x = bits.view(np.float32).reshape(1, -1)
    np.testing.assert_array_equal(quantize_blocks(torch.from_numpy(x), name).numpy(), _reference(x, name))


# --- k-quants and iq4: error bounds ---------------------------------------------------------------------------

def _up(v: np.ndarray) -> np.ndarray:
    """An upper bound of v (>= 0) rounded up to fp16: one fp16 step, 2^-10 relative (normal) or 2^-24."""
    return v * (1 + 2.0 ** -10) + 2.0 ** -24


# name -> (kind, sub-blocks per block, values per sub-block, qmax, largest sub-scale code, step factors tried)
_SCHEMES = {
    "q6_k": ("symmetric", 16, 16, 31, 127, gqk.WIDEN), "q3_k": ("symmetric", 16, 16, 3, 31, gqk.WIDEN_NARROW),
    "q4_k": ("affine", 8, 32, 15, 63, gqk.WIDEN), "q5_k": ("affine", 8, 32, 31, 63, gqk.WIDEN),
    "q2_k": ("affine", 16, 16, 3, 15, gqk.WIDEN_NARROW),
    "iq4_nl": ("levels", 1, 32, 127, 0, gqk.NARROW), "iq4_xs": ("levels", 8, 32, 127, 31, gqk.NARROW),
}


def _bound(x: np.ndarray, name: str) -> np.ndarray:
    """float64 bound on |x - x̂| per value of x [n, block_size] (the derivation is gguf_quantize_k.py's).
    Each sub-block's covering step is scaled by one of the type's factors (f_min .. f_max); every quantity
    below grows with f, so f_max bounds the step, and a factor below 1 clips the extremes by at most
    (1 - f_min) times the sub-block's reach (amax, or half its span for the affine grid's two ends).

    - symmetric: s = f_max * max(amax / (qmax + 3/2), near / (qmax + 1/2)), near the largest |x| of the sign
      opposite to the first value of largest |x|; stored |step| <= s + d, d = fp16-up(max s / L); the
      signed codes -(qmax+1)..qmax cover the sub-block to half a step: |x - x̂| <= |step| / 2 (+ clipping).
    - affine: span = hi - lo (lo = min(min x, 0)), s = f_max * span / (qmax + 1), the grid [lo, hi] widened
      by (f_max - 1) * span / 2 at each end; its first point, half a step above the bottom, at most 0:
      offset <= target + dmin with target = max(0, -(bottom + s/2)), dmin = fp16-up(max target / L); s raised
      to (top + offset) / (qmax + 1/2); stored step <= s + d: |x - x̂| <= step / 2 (+ clipping).
    - levels (iq4): |step| <= amax / 127 (+ d for iq4_xs's sub-scales); nearest of levels whose largest half
      gap is 12 and whose top (113) is 14 below 127: |x - x̂| <= 14 * |step| (+ clipping).
    """
    kind, j, m, qmax, levels, factors = _SCHEMES[name]
    f_max, clip = max(factors), 1.0 - min(min(factors), 1.0)
    v = x.astype(np.float64).reshape(len(x), j, m)
    amax = np.abs(v).max(-1)
    if kind == "symmetric":
        first = np.take_along_axis(v, np.abs(v).argmax(-1)[..., None], -1)[..., 0]
        near = np.maximum(np.where(first < 0, v.max(-1), -v.min(-1)), 0.0)
        s = f_max * np.maximum(amax / (qmax + 1.5), near / (qmax + 0.5))
        half = (s + _up(s.max(-1, keepdims=True) / levels)) / 2 + clip * amax
    elif kind == "affine":
        lo, hi = np.minimum(v.min(-1), 0.0), v.max(-1)
        span = hi - lo
        s = f_max * span / (qmax + 1)
        widen = (f_max - 1) * span / 2
        target = np.maximum(-(lo - widen + s / 2), 0.0)
        offset = target + _up(target.max(-1, keepdims=True) / levels)
        s = np.maximum(s, (hi + widen + offset) / (qmax + 0.5))
        half = (s + _up(s.max(-1, keepdims=True) / levels)) / 2 + clip * span / 2
    else:
        s = amax / 127
        step = _up(s) if levels == 0 else s + _up(s.max(-1, keepdims=True) / levels)
        half = 14 * step + clip * amax
    # float32 rounding of the quantizer's and decoder's arithmetic: a few ulps of the block's largest value
    slack = 2.0 ** -20 * np.abs(v).max(axis=(1, 2))[:, None]
    return np.repeat(half + slack, m, axis=-1).reshape(x.shape)


def _k_rows(rng: np.random.Generator, rows: int, k: int, m: int) -> np.ndarray:
    """float32 [rows, k]: normal values, each block of 256 scaled by 2^U(-12, 4) and each sub-block of m by a
    further 2^U(-6, 0) (sub-blocks of one block differ, as the sub-scales must handle); fp16 scales stay in
    range and include subnormal ones."""
    x = rng.standard_normal((rows, k // 256, 256 // m, m))
    x *= np.exp2(rng.uniform(-12, 4, (rows, k // 256, 1, 1)))
    x *= np.exp2(rng.uniform(-6, 0, (rows, k // 256, 256 // m, 1)))
    return x.reshape(rows, k).astype(np.float32)


@pytest.mark.parametrize("name", BOUNDED)
def test_k_quants_within_bound(name: str) -> None:
    rng = np.random.default_rng(sum(map(ord, name)))
    block = REGISTRY[name].block_size
    m = _SCHEMES[name][2]
    x = _k_rows(rng, 5, 512, m)  # odd row count, two 256-value blocks per row
    x[1, :256] = 0.0  # an all-zero block
    x[2, 256:] = rng.standard_normal(256).astype(np.float32) * 1e-2
    x[2, 256 + 77] = 1e3  # one huge value in a block of small ones
    x[3, :256] = np.abs(x[3, :256]) + 1.0  # all positive, far from 0 (the affine offset can only subtract)
    raw = quantize_blocks(torch.from_numpy(x), name)
    assert raw.dtype == torch.uint8 and raw.shape == (5, REGISTRY[name].blocks_bytes(512))
    y = dequantize_blocks(raw, name).numpy().astype(np.float64)
    assert np.isfinite(y).all()
    err = np.abs(y - x).reshape(-1, block)
    bound = _bound(x.reshape(-1, block), name)
    assert (err <= bound).all(), f"worst excess {(err - bound).max()}"
    assert (y[1, :256] == 0).all()
    # the bound is not vacuous: on ordinary rows the error reaches a fair part of it somewhere
    assert (err / bound).max() > 0.25


# Relative RMSE of llama.cpp's own quantizer (quantize_row_*_ref, no importance matrix: what llama-quantize
# runs without --imatrix) on the rows of test_k_quants_error_near_llama_cpp, measured once with a build of
# /tmp/mainline/llama.cpp/ggml/src/ggml-quants.c.
LLAMA_CPP_REL_RMSE = {"q2_k": 0.2970, "q3_k": 0.1509, "q4_k": 0.0715, "q5_k": 0.0362, "q6_k": 0.0178,
                      "iq4_nl": 0.0787, "iq4_xs": 0.0768}


@pytest.mark.parametrize("name", BOUNDED)
def test_k_quants_error_near_llama_cpp(name: str) -> None:
    """On N(0, 1) rows, the relative RMSE is within 10% of llama.cpp's quantizer (measured: 0.94-1.07x), so
    KL-divergences of models quantized here stand for those of llama.cpp's files (a little worse for q4_k
    and q5_k). The rows are fixed (seed 0): the RMSE is a deterministic number, the 10% a design margin."""
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    y = dequantize_blocks(quantize_blocks(torch.from_numpy(x), name), name).numpy()
    rel = np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
    assert rel <= 1.10 * LLAMA_CPP_REL_RMSE[name]


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_rejects_bad_input(name: str) -> None:
    block = REGISTRY[name].block_size
    if block > 1:
        with pytest.raises(ValueError, match="values"):
            quantize_blocks(torch.ones(2, block + 1), name)
    with pytest.raises(ValueError, match="values"):
        quantize_blocks(torch.ones(2, block, dtype=torch.int32), name)
    with pytest.raises(ValueError, match="values"):
        quantize_blocks(torch.tensor(1.0), name)


@pytest.mark.parametrize("fmt", ["iq2_xxs", "iq1_m", "fp8", "q4_0_4x4", 8.0, None])
def test_rejects_unquantizable_fmt(fmt: object) -> None:
    with pytest.raises(ValueError, match="fmt"):
        quantize_blocks(torch.ones(2, 256), fmt)  # type: ignore[arg-type]


def test_quantizable() -> None:
    assert set(QUANTIZABLE) == set(EXACT) | set(BOUNDED)
    assert quantize_blocks(torch.ones(0, 256), "q4_k").shape == (0, REGISTRY["q4_k"].type_size)


@pytest.mark.gpu
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_cuda_same_bytes_as_cpu(name: str, monkeypatch) -> None:
    """The GPU writes the CPU's bytes: every operation is a correctly rounded float32 operation, a min/max
    or integer work, so the devices cannot differ. Rows span several chunks."""
    monkeypatch.setattr(gq, "CHUNK_VALUES", 4096)
    rng = np.random.default_rng(7)
    x = torch.from_numpy(_k_rows(rng, 37, 1024, 16))
    x[0, :256] = 0.0
    x[1, 5] = 1e3
    cases = [x, x.to(torch.bfloat16)]
    if REGISTRY[name].block_size <= 32:  # gguf's rounding cases (ties, signed zeros, huge values)
        cases.append(torch.from_numpy(_special_blocks(rng, signed_zeros=True).reshape(-1, 96)))
    for t in cases:
        cpu = quantize_blocks(t, name)
        gpu = quantize_blocks(t.cuda(), name)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)
