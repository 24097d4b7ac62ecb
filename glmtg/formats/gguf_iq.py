"""Torch dequantization of llama.cpp's grid types (IQ2_XXS ... IQ1_M), bit for bit as ``gguf.quants.dequantize``.

These types store, per group of 4 or 8 values, an index into a fixed codebook ("grid") of small positive
levels, plus sign bits (IQ2_XXS, IQ2_XS and IQ3_XXS give 7 of 8 signs and take the 8th from parity: ggml's
``ksigns`` table) and a few-bit scale per 16 or 32 values. The codebooks are the ``gguf`` package's own
(``gguf.quants.<TYPE>.grid``), read on first use and kept per device, so ``import glmtg`` never imports gguf
and the levels are by construction those of the reference.

Each function takes the raw blocks, uint8 [n, type_size], and returns float32 [n, 256]; the checked public
form is ``gguf_blocks.blockwise``. Bit-exactness follows gguf_blocks' argument: the fp16 scale is widened
exactly, and every product gguf forms (scale times a 4-bit sub-scale, times a grid level of at most 6 bits,
times a sign) is exact in float32 for finite scales and formed here in gguf's order anyway, so NaN and Inf
land where gguf puts them.
"""

from __future__ import annotations

import functools

import torch

from glmtg.formats.ggml_types import GGML_TYPE_IDS, GGML_TYPES
from glmtg.formats.gguf_blocks import _as, _f16, _PerBlock, _split, _unpack

QK_K = 256


@functools.cache
def _grid(name: str, device: torch.device) -> torch.Tensor:
    """gguf's codebook of type ``name`` (e.g. "IQ2_XXS"): float32 [entries, 4 or 8] on ``device``."""
    import gguf.quants  # deferred: only files with these types need the gguf package

    cls = getattr(gguf.quants, name)
    cls.init_grid()
    return torch.from_numpy(cls.grid.reshape(cls.grid_shape).astype("float32")).to(device)


@functools.cache
def _ksigns(device: torch.device) -> torch.Tensor:
    """ggml's ksigns as signs: float32 [128, 8], entry i bit j of ksigns[i] set -> -1.0 else +1.0."""
    import gguf.quants

    table = torch.tensor(list(gguf.quants.IQ2_XXS.ksigns), dtype=torch.uint8)
    return _signs(table.view(128, 1)).view(128, 8).to(device)


@functools.cache
def _iq1_delta() -> float:
    """IQ1_S / IQ1_M's offset added to every grid level (1/8), as gguf holds it."""
    import gguf.quants

    return float(gguf.quants.IQ1_S.delta)


def _signs(bits: torch.Tensor) -> torch.Tensor:
    """Bytes [n, k] -> float32 [n, 8 k]: bit j of byte i gives value 8 i + j, +1.0 if clear, -1.0 if set."""
    b = _unpack(bits, bits.shape[1], 1, tuple(range(8)), 0x01)
    return 1.0 - 2.0 * b.float()


def _words(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Little-endian fields (bytes [n, itemsize k]) as non-negative int64 [n, k].

    Flattened first: a one-block slice keeps its block-wide row stride through ``contiguous()``, which a
    view as a wider dtype rejects."""
    bits = 8 * dtype.itemsize
    return (_as(b.flatten(), dtype).to(torch.int64) & ((1 << bits) - 1)).view(b.shape[0], -1)


def _u32(b: torch.Tensor) -> torch.Tensor:
    return _words(b, torch.int32)


def _u16(b: torch.Tensor) -> torch.Tensor:
    return _words(b, torch.int16)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """Bytes [n, k] -> [n, 2 k]: low nibble of byte i is item 2 i, high nibble item 2 i + 1."""
    return _unpack(b, b.shape[1], 1, (0, 4), 0x0F)


def _ksign_of(words: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Signs of ``groups`` 8-value groups from four 7-bit ksigns indices per uint32 (bits 0, 7, 14, 21)."""
    idx = torch.stack([(words >> s) & 0x7F for s in (0, 7, 14, 21)], dim=-1)
    return _ksigns(words.device)[idx.reshape(n, -1)].reshape(n, groups, 4, 8)


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, qs = _split(b, 2, 64)
    aux = _u32(qs).view(n, 8, 2)  # per 32 values: 4 grid indices (bytes), then scale and signs
    db = (_f16(d) * (0.5 + (aux[..., 1] >> 28).float()) * 0.25).view(n, 8, 1, 1)
    signs = _ksign_of(aux[..., 1], n, 8)
    idx = qs.reshape(n, 8, 8)[:, :, :4].long()
    grid = _grid("IQ2_XXS", b.device)[idx].view(n, 8, 4, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, qs, scales = _split(b, 2, 64, 8)
    q = _u16(qs)  # 9-bit grid index, 7-bit ksigns index
    db = (_f16(d) * (0.5 + _nibbles(scales).float()) * 0.25).view(n, 16, 1, 1)
    signs = _ksigns(b.device)[q >> 9].view(n, 16, 2, 8)
    grid = _grid("IQ2_XS", b.device)[q & 511].view(n, 16, 2, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, qs, sign_bits, qh, scales = _split(b, 2, 32, 32, 8, 8)
    db = (_f16(d) * (0.5 + _nibbles(scales).float()) * 0.25).view(n, 16, 1, 1)
    signs = _signs(sign_bits).view(n, 16, 2, 8)
    idx = qs.long() | (_unpack(qh, 8, 1, (0, 2, 4, 6), 0x03).long() << 8)  # 10-bit grid index
    grid = _grid("IQ2_S", b.device)[idx].view(n, 16, 2, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, qs, scales = _split(b, 2, 64, 32)
    aux = _u32(scales)  # per 32 values: 4-bit scale on top, four 7-bit ksigns indices below
    db = (_f16(d) * (0.5 + (aux >> 28).float()) * 0.5).view(n, 8, 1, 1)
    signs = _ksign_of(aux, n, 8)
    grid = _grid("IQ3_XXS", b.device)[qs.long()].view(n, 8, 4, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, qs, qh, sign_bits, scales = _split(b, 2, 64, 8, 32, 4)
    db = (_f16(d) * (1 + 2 * _nibbles(scales)).float()).view(n, 8, 1, 1)
    signs = _signs(sign_bits).view(n, 8, 4, 8)
    idx = qs.long() | (_unpack(qh, 8, 1, tuple(range(8)), 0x01).long() << 8)  # 9-bit grid index
    grid = _grid("IQ3_S", b.device)[idx].view(n, 8, 4, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, qs, qh = _split(b, 2, 32, 16)
    h = _u16(qh)  # per 32 values: 4 x 3 high index bits, a 3-bit scale, the delta's sign on top
    dl = (_f16(d) * (2 * ((h >> 12) & 7) + 1).float()).view(n, 8, 1, 1)
    delta = torch.where((h & 0x8000) == 0, _iq1_delta(), -_iq1_delta()).float().view(n, 8, 1, 1)
    high = torch.stack([(h >> s) & 7 for s in (0, 3, 6, 9)], dim=-1).view(n, 32)
    grid = _grid("IQ1_S", b.device)[qs.long() | (high << 8)].view(n, 8, 4, 8)
    return (dl * (grid + delta)).view(n, QK_K)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs, qh, scales = _split(b, 32, 16, 8)
    s = _u16(scales)  # four words: 3-bit scales in the low 12 bits, the fp16 scale's nibbles in the top 4
    d_bits = ((s[:, 0] & 0xF000) >> 12) | ((s[:, 1] & 0xF000) >> 8) | ((s[:, 2] & 0xF000) >> 4) | (s[:, 3] & 0xF000)
    d = _f16(torch.stack([d_bits & 0xFF, d_bits >> 8], dim=-1).to(torch.uint8))
    sub = torch.stack([(s >> k) & 7 for k in (0, 3, 6, 9)], dim=-1).view(n, 16)
    dl = (d * (2 * sub + 1).float()).view(n, 8, 2, 1, 1)
    h = _nibbles(qh)  # per 8 values: 3 high index bits, the delta's sign above
    delta = torch.where((h & 0x08) == 0, _iq1_delta(), -_iq1_delta()).float().view(n, 8, 2, 2, 1)
    grid = _grid("IQ1_M", b.device)[qs.long() | ((h & 7).long() << 8)].view(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).view(n, QK_K)


# name -> (gguf type id, block_size, type_size, per-block dequantization), as gguf_blocks.BLOCK_TYPES;
# ids and sizes from ggml's table.
_DECODERS: dict[str, _PerBlock] = {
    "iq2_xxs": _iq2_xxs, "iq2_xs": _iq2_xs, "iq2_s": _iq2_s, "iq3_xxs": _iq3_xxs, "iq3_s": _iq3_s,
    "iq1_s": _iq1_s, "iq1_m": _iq1_m,
}
IQ_TYPES: dict[str, tuple[int, int, int, _PerBlock]] = {
    name: (GGML_TYPE_IDS[name.upper()], GGML_TYPES[GGML_TYPE_IDS[name.upper()]].block_size,
           GGML_TYPES[GGML_TYPE_IDS[name.upper()]].type_size, per_block)
    for name, per_block in _DECODERS.items()
}
