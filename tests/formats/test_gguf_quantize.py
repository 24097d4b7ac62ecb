"""quantize_blocks: float weights -> GGUF blocks in torch.

- f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1: byte for byte against ``gguf.quants.quantize`` (no
  tolerance: both compute in float32 with one correct rounding per operation), on random rows whose blocks
  differ in magnitude by up to 2^±30, plus blocks of exact ties, zeros (of both signs), huge values (fp16
  overflow of d, values near float32's maximum) and NaN payloads for the float types.
- q2_k ... q6_k, iq4_nl, iq4_xs (no reference quantizer exists): decoded by the registry's bit-exact
  ``dequantize_blocks``, every value lies within the bound gguf_quantize_k.py derives (restated per type in
  ``_bound``), computed here in float64 from the input alone.
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
import torch

import glmtg.formats.gguf_quantize as gq
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


# name -> (kind, sub-blocks per block, values per sub-block, qmax, largest sub-scale code)
_SCHEMES = {
    "q6_k": ("symmetric", 16, 16, 31, 127), "q3_k": ("symmetric", 16, 16, 3, 31),
    "q4_k": ("affine", 8, 32, 15, 63), "q5_k": ("affine", 8, 32, 31, 63), "q2_k": ("affine", 16, 16, 3, 15),
    "iq4_nl": ("levels", 1, 32, 127, 0), "iq4_xs": ("levels", 8, 32, 127, 31),
}


def _bound(x: np.ndarray, name: str) -> np.ndarray:
    """float64 bound on |x - x̂| per value of x [n, block_size] (the derivation is gguf_quantize_k.py's):

    - symmetric: sub-block step s = amax / (qmax + 1/2), stored step <= s + d with d = fp16-up(max s / L);
      codes -(qmax+1)..qmax cover [-amax, amax] to half a step: |x - x̂| <= step / 2.
    - affine: s = (hi - lo) / (qmax + 1) (lo = min(min x, 0)), offset <= target + dmin with target =
      max(0, -lo - s/2), dmin = fp16-up(max target / L); s raised to (hi + offset) / (qmax + 1/2); stored
      step <= s + d: |x - x̂| <= step / 2.
    - levels (iq4): |step| <= amax / 127 (+ d for iq4_xs's sub-scales); nearest of levels whose largest half
      gap is 12 and whose top (113) is 14 below 127: |x - x̂| <= 14 * |step|.
    """
    kind, j, m, qmax, levels = _SCHEMES[name]
    v = x.astype(np.float64).reshape(len(x), j, m)
    amax = np.abs(v).max(-1)
    if kind == "symmetric":
        s = amax / (qmax + 0.5)
        step = s + _up(s.max(-1, keepdims=True) / levels)
        half = step / 2
    elif kind == "affine":
        lo, hi = np.minimum(v.min(-1), 0.0), v.max(-1)
        s = (hi - lo) / (qmax + 1)
        target = np.maximum(-lo - s / 2, 0.0)
        offset = target + _up(target.max(-1, keepdims=True) / levels)
        s = np.maximum(s, (hi + offset) / (qmax + 0.5))
        half = (s + _up(s.max(-1, keepdims=True) / levels)) / 2
    else:
        s = amax / 127
        step = _up(s) if levels == 0 else s + _up(s.max(-1, keepdims=True) / levels)
        half = 14 * step
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
    for t in (x, x.to(torch.bfloat16)):
        cpu = quantize_blocks(t, name)
        gpu = quantize_blocks(t.cuda(), name)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)
