"""The format records against gguf's own table, and against the layout they describe.

Exact checks only (sizes and ids are integers)."""

from __future__ import annotations

import gguf
import pytest
import torch

from glmtg.formats import FORMATS, KV_FORMATS, BlockFormat, KernelCode, get


def test_kv_formats_derive_from_the_registry():
    assert KV_FORMATS == tuple(name for name, f in FORMATS.items() if f.kv_cache)
    assert set(KV_FORMATS) == {"f16", "bf16", "q8_0", "q4_0", "fp8"}
    assert all(isinstance(f, BlockFormat) and f.name == name for name, f in FORMATS.items())


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.gguf_type is not None])
def test_gguf_type_id_and_block_sizes(name):
    fmt = FORMATS[name]
    gtype = gguf.GGMLQuantizationType(fmt.gguf_type)
    assert gtype.name.lower() == name
    assert gguf.GGML_QUANT_SIZES[gtype] == (fmt.block_size, fmt.type_size)


@pytest.mark.parametrize("name", KV_FORMATS)
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_storage_shape_and_row_bytes_match_what_quantize_returns(name, head_dim):
    """storage_shape's trailing dims and dtypes are those of quantize's output, and row_bytes counts
    exactly those bytes (codes and scales of one row)."""
    fmt = FORMATS[name]
    x = torch.randn(3, 2, 5, head_dim)
    codes, scales = fmt.quantize(x)
    data_shape, data_dtype, scale_shape, scale_dtype = fmt.storage_shape(3, 2, 5, head_dim)
    assert (tuple(codes.shape), codes.dtype) == (data_shape, data_dtype)
    assert (None if scales is None else (tuple(scales.shape), scales.dtype)) == (
        None if scale_shape is None else (scale_shape, scale_dtype))
    nbytes = codes.numel() * codes.element_size() + (0 if scales is None else scales.numel() * scales.element_size())
    assert fmt.row_bytes(head_dim) * 3 * 2 * 5 == nbytes
    if fmt.type_size is not None:  # whole blocks: gguf's bytes per block times the blocks of a row
        assert fmt.row_bytes(head_dim) == head_dim // fmt.block_size * fmt.type_size


def test_row_error_names_the_block_size():
    assert FORMATS["q8_0"].row_error(128) is None and FORMATS["fp8"].row_error(100) is None
    assert "multiple of 32" in FORMATS["q4_0"].row_error(48)


def test_kernel_codes():
    """Float formats share the plain-load code; every scaled format has its own."""
    assert {FORMATS[n].code for n in ("f16", "bf16")} == {KernelCode.FLOAT}
    scaled = [f.code for f in FORMATS.values() if f.scaled]
    assert len(set(scaled)) == len(scaled) and KernelCode.FLOAT not in scaled


def test_get_rejects_unknown_names():
    assert get("q8_0") is FORMATS["q8_0"]
    with pytest.raises(ValueError, match=r"fmt must be one of .*got 'q5_0'"):
        get("q5_0", what="fmt")
    with pytest.raises(ValueError, match="format must be one of"):
        get(None)
