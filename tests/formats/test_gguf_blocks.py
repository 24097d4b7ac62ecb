"""GGUF weight blocks: torch dequantization against ``gguf.quants.dequantize``, and the registry's records.

Every comparison is exact: equal shapes, NaN at the same positions, and every other float32 bit equal (no
tolerance; gguf's arithmetic is float32 with one rounding per operation, and so is glmtg's). The float types
(f32, f16, bf16) are pure conversions and must match NaN payloads too.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from glmtg.formats import FORMATS, GGUF_FORMATS, KV_FORMATS, REGISTRY, Layout, dequantize_blocks, get

QT = gguf.GGMLQuantizationType
FLOAT_TYPES = ("f32", "f16", "bf16")
# Byte offsets of each type's fp16 fields (d, and dmin / m) inside one block, from ggml's block structs.
FP16_FIELDS = {
    "q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "iq4_nl": (0,),
    "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "iq4_xs": (0,),
    "iq2_xxs": (0,), "iq2_xs": (0,), "iq2_s": (0,), "iq3_xxs": (0,), "iq3_s": (0,), "iq1_s": (0,),
    "iq1_m": (),  # its fp16 scale is spread over four nibbles: _valid_blocks places it
}
GRID_TYPES = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m")
# Types the gguf package can quantize: their blocks also come from real values.
GGUF_QUANTIZES = ("bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _reference(raw: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf scales are part of the cases
        return gguf.quants.dequantize(raw, QT[name.upper()])


def _assert_same_bits(got: torch.Tensor, want: np.ndarray, *, nan_payloads: bool) -> None:
    got = got.numpy()
    assert got.dtype == np.float32 and want.dtype == np.float32 and got.shape == want.shape
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    keep = np.ones_like(nan) if nan_payloads else ~nan
    assert np.array_equal(got.view(np.uint32)[keep], want.view(np.uint32)[keep])


def _moderate_fp16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random finite fp16 of either sign, magnitudes 2^-14 .. 2^2 (no subnormals, no overflow downstream)."""
    v = rng.uniform(0.5, 1.0, shape) * np.exp2(rng.integers(-13, 3, shape)) * rng.choice([-1.0, 1.0], shape)
    return v.astype(np.float16)


def _valid_blocks(rng: np.random.Generator, name: str, lead: tuple[int, ...], n_blocks: int) -> np.ndarray:
    """uint8 [*lead, n_blocks * type_size]: random codes, moderate random fp16 scales (values, for floats)."""
    fmt = REGISTRY[name]
    if name in FLOAT_TYPES:
        v = _moderate_fp16(rng, (*lead, n_blocks)).astype(np.float32)
        if name == "bf16":
            return gguf.quants.quantize(v, QT.BF16).view(np.uint8)
        return v.astype(np.float16 if name == "f16" else np.float32).view(np.uint8)
    raw = rng.integers(0, 256, (*lead, n_blocks, fmt.type_size), dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        raw[..., off:off + 2] = _moderate_fp16(rng, (*lead, n_blocks, 1)).view(np.uint8)
    if name == "iq1_m":  # the scale's 4 nibbles, low first, are the top nibbles of the 4 uint16 at bytes 48..55
        d = _moderate_fp16(rng, (*lead, n_blocks, 1)).view(np.uint16)
        words = raw[..., 48:56].copy().view(np.uint16)
        words = (words & 0x0FFF) | (((d >> np.array([0, 4, 8, 12], dtype=np.uint16)) & 0xF) << 12)
        raw[..., 48:56] = words.astype(np.uint16).view(np.uint8)
        back = raw[..., 48:56].copy().view(np.uint16) >> 12 << np.array([0, 4, 8, 12], dtype=np.uint16)
        assert np.array_equal(np.bitwise_or.reduce(back, axis=-1, keepdims=True), d)
    return raw.reshape(*lead, n_blocks * fmt.type_size)


def test_registry_holds_every_gguf_type_with_gguf_sizes():
    expected = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k",
                "q6_k", "iq4_nl", "iq4_xs", *GRID_TYPES}
    assert set(GGUF_FORMATS) == expected and len(GGUF_FORMATS) == len(expected)
    for name in GGUF_FORMATS:
        fmt = REGISTRY[name]
        gtype = QT(fmt.gguf_type)
        assert gtype.name.lower() == name
        assert gguf.GGML_QUANT_SIZES[gtype] == (fmt.block_size, fmt.type_size)
        assert get(fmt.gguf_type, allowed=GGUF_FORMATS) is fmt and get(gtype, allowed=GGUF_FORMATS) is fmt
        assert get(name, allowed=GGUF_FORMATS) is fmt and get(np.int64(fmt.gguf_type), allowed=GGUF_FORMATS) is fmt
        assert Layout.BLOCKS in fmt.layouts
        assert (Layout.PLANAR in fmt.layouts) == (name in KV_FORMATS)


def test_kv_formats_keep_their_planar_layout():
    assert FORMATS == {n: f for n, f in REGISTRY.items() if Layout.PLANAR in f.layouts}
    assert set(KV_FORMATS) <= set(FORMATS) and all(REGISTRY[n] is FORMATS[n] for n in FORMATS)
    assert REGISTRY["fp8"].layouts == (Layout.PLANAR,)
    assert get(8) is REGISTRY["q8_0"]  # ids find KV formats too
    with pytest.raises(ValueError, match="format must be one of"):
        get(12)  # q4_k is no KV cache format
    with pytest.raises(ValueError, match="no planar layout"):
        REGISTRY["q4_k"].storage_shape(1, 1, 1, 256)


@pytest.mark.parametrize("name", sorted(GGUF_FORMATS))
@pytest.mark.parametrize("lead,n_blocks", [((), 1), ((3,), 7), ((2, 3), 5)])
def test_dequantize_blocks_is_bit_exact_on_valid_blocks(name, lead, n_blocks):
    rng = np.random.default_rng([len(name), len(lead), n_blocks, *name.encode()])
    raw = _valid_blocks(rng, name, lead, n_blocks)
    got = REGISTRY[name].dequantize_blocks(torch.from_numpy(raw))
    want = _reference(raw, name)
    assert want.shape == (*lead, n_blocks * REGISTRY[name].block_size)
    assert np.isfinite(want).all() and np.abs(want).max() > 0  # the case exercises real values
    _assert_same_bits(got, want, nan_payloads=True)


@pytest.mark.parametrize("name", sorted(GGUF_FORMATS))
def test_dequantize_blocks_is_bit_exact_on_any_bytes(name):
    """Every byte pattern is a valid block: NaN/Inf/subnormal scales included; NaN where gguf has NaN."""
    rng = np.random.default_rng([7, *name.encode()])
    fmt = REGISTRY[name]
    raw = rng.integers(0, 256, (4, 9 * fmt.type_size), dtype=np.uint8)
    if name == "f16":  # make sure signalling and quiet NaN payloads, Inf and subnormals all occur
        raw[0, :8] = np.array([0x7C01, 0xFE55, 0x7C00, 0x0001], dtype=np.uint16).view(np.uint8)
    _assert_same_bits(fmt.dequantize_blocks(torch.from_numpy(raw)), _reference(raw, name),
                      nan_payloads=name in FLOAT_TYPES)


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_dequantize_blocks_of_gguf_quantized_values(name):
    """Blocks gguf itself writes from real values (odd row count, 5 blocks a row)."""
    x = np.random.default_rng(3).standard_normal((3, 5 * REGISTRY[name].block_size)).astype(np.float32)
    raw = gguf.quants.quantize(x, QT[name.upper()]).view(np.uint8)
    _assert_same_bits(dequantize_blocks(torch.from_numpy(raw), name), _reference(raw, name), nan_payloads=True)


@pytest.mark.parametrize("name", ["f32", "q5_0", "q3_k", "iq2_xxs", "iq1_m"])
def test_unaligned_and_strided_input(name):
    """A slice at an odd byte offset of a wider buffer (as from a memory map) decodes like a fresh copy."""
    fmt = REGISTRY[name]
    raw = _valid_blocks(np.random.default_rng(5), name, (3,), 3)
    wide = torch.zeros(3, raw.shape[-1] + 3, dtype=torch.uint8)
    wide[:, 1:-2] = torch.from_numpy(raw)
    view = wide[:, 1:-2]
    assert view.storage_offset() % 2 == 1 and not view.is_contiguous()
    _assert_same_bits(fmt.dequantize_blocks(view), _reference(raw, name), nan_payloads=True)
    one_row = wide[1, 1:-2]  # contiguous, odd offset
    _assert_same_bits(fmt.dequantize_blocks(one_row), _reference(raw[1], name), nan_payloads=True)


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_blocks_hold_the_planar_bytes(name):
    """A KV format's blocks are its planar scale followed by its planar codes: both layouts decode alike."""
    fmt = REGISTRY[name]
    codes, scales = fmt.quantize(torch.randn(2, 5 * fmt.block_size, generator=torch.Generator().manual_seed(0)))
    blocks = torch.cat([scales.view(torch.uint8).unflatten(-1, (-1, 2)),
                        codes.view(torch.uint8).unflatten(-1, (5, -1))], dim=-1).flatten(-2)
    assert torch.equal(fmt.dequantize_blocks(blocks), fmt.dequantize(codes, scales))


def test_blocks_bytes():
    assert REGISTRY["q4_k"].blocks_bytes(512) == 288 and REGISTRY["f32"].blocks_bytes(3) == 12
    with pytest.raises(ValueError, match="n_values must be a multiple of 256"):
        REGISTRY["q6_k"].blocks_bytes(1408)
    with pytest.raises(ValueError, match="no blocks layout"):
        REGISTRY["fp8"].blocks_bytes(128)


@pytest.mark.parametrize("name", ["q4_1", "iq4_xs"])
def test_bad_input_names_raw(name):
    fn = REGISTRY[name].dequantize_blocks
    size = REGISTRY[name].type_size
    with pytest.raises(ValueError, match="raw must be a torch.uint8 tensor"):
        fn(torch.zeros(2, size, dtype=torch.int8))
    with pytest.raises(ValueError, match="raw must be a torch.uint8 tensor"):
        fn(np.zeros((2, size), dtype=np.uint8))
    with pytest.raises(ValueError, match=rf"raw's last dimension must be a multiple of the {size}-byte block"):
        fn(torch.zeros(2, 3 * size + 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="raw's last dimension"):
        fn(torch.zeros((), dtype=torch.uint8))
    assert fn(torch.zeros(3, 0, dtype=torch.uint8)).shape == (3, 0)


def test_unknown_gguf_types_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"fmt must be one of .*got 34"):
        dequantize_blocks(torch.zeros(54, dtype=torch.uint8), 34)  # TQ1_0: no GLM file uses it
    with pytest.raises(ValueError, match=r"fmt must be one of .*got 'fp8'"):
        dequantize_blocks(torch.zeros(4, dtype=torch.uint8), "fp8")
    with pytest.raises(ValueError, match="got True"):
        get(True, allowed=GGUF_FORMATS)


@pytest.mark.parametrize("name", sorted(GGUF_FORMATS))
def test_one_block_sliced_from_a_wider_row(name):
    """[1, type_size] cut from a wider buffer keeps the buffer's row stride (a one-row 'contiguous' view
    that a dtype view refuses): every type decodes it like a fresh copy."""
    fmt = REGISTRY[name]
    raw = _valid_blocks(np.random.default_rng([11, *name.encode()]), name, (3,), 2)
    one = torch.from_numpy(raw)[1:2, fmt.type_size:]
    assert one.shape == (1, fmt.type_size) and one.stride(0) == 2 * fmt.type_size
    _assert_same_bits(fmt.dequantize_blocks(one), _reference(raw[1:2, fmt.type_size:].copy(), name),
                      nan_payloads=True)
