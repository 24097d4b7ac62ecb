"""Torch quantize/dequantize of the block formats, the definition of their bytes.

Values are quantized in float32 (float64 input is rounded to float32 first, as the kernels do), along
the last dimension, which must be a whole number of blocks.

- f16: a round-to-nearest-even cast (NaN payloads are not kept: each device writes its own NaN).
- bf16: round to nearest even on the bits, as gguf and the kernels do: NaN keeps its sign and top
  mantissa bits and is made quiet (torch's own cast writes one canonical NaN instead).
- q8_0 (llama.cpp's, bit for bit as the ``gguf`` package computes it): d = amax / 127, id = 1/d (0 when
  d == 0), q = round-half-away(x * id); d is rounded to fp16 only for storage.
- q4_0: m = the first value of largest |x| (signed), d = m / -8, q = min(15, trunc(x * id + 8.5)),
  with x * id rounded before the addition; codes packed qs[j] = q[j] | q[j + 16] << 4; d stored as fp16.
- fp8: e4m3fn codes of x / s (clamped to +-448) with one float32 scale s = amax / 448 per row.

NaN/Inf policy (the kernels' too): a scale group (a 32-value block, or an fp8 row) holding any NaN or
+-Inf is stored with scale NaN and zero codes (q4_0: code 8), so the whole group dequantizes to NaN and
nothing leaks into its neighbours; gguf dequantizes such blocks to NaN as well, but its codes there are
undefined. f16/bf16 store NaN/Inf element-wise. Blocks so tiny that 1/d overflows float32 (amax below
~4e-37 for q8_0, ~2e-38 for q4_0; gguf's codes are undefined there) get clamped codes and fp16 d = 0.
"""

from __future__ import annotations

from typing import Callable

import torch

QK = 32  # values per q8_0 / q4_0 block
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _values(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float32 else x


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % QK:
        raise ValueError(f"x's last dimension {x.shape[-1]} must be a multiple of {QK}")
    return _values(x).unflatten(-1, (-1, QK))


def _finite_or_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with NaN/Inf zeroed, True per group [...] along the last dim that held any)."""
    finite = torch.isfinite(x)
    return torch.where(finite, x, 0.0), ~finite.all(dim=-1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (gguf's id)."""
    return torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))


def cast_to(dtype: torch.dtype) -> Callable[[torch.Tensor], tuple[torch.Tensor, None]]:
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _values(x).to(dtype), None

    quantize.__doc__ = f"x -> ({dtype} values, None): a round-to-nearest-even cast."
    return quantize


def quantize_bf16(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """x -> (bfloat16 values, None), rounded as gguf (and the kernels) round: to nearest even, and NaN
    keeps its sign and top mantissa bits with the quiet bit set (torch's cast alone writes one NaN)."""
    x = _values(x)
    quiet_nan = ((x.view(torch.int32) >> 16) | 0x40).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isnan(x), quiet_nan, x.to(torch.bfloat16)), None


def dequantize_float(data: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return data.float()


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], fp16 d [..., D//32])."""
    blk, bad = _finite_or_zero(_blocks(x))
    d = blk.abs().amax(dim=-1) / 127.0
    p = blk * _inverse(d)[..., None]
    # Round half away from zero exactly like gguf's np_roundf: floor(x + 0.5) would round 0.49999997
    # up, because the addition itself rounds.
    a = p.abs()
    r = a.floor()
    r = r + (a - r >= 0.5).float()
    # Only blocks whose 1/d overflowed reach past 127 or NaN: keep those codes defined.
    r = torch.where(r == r, r.clamp(max=127.0), 0.0)
    q = torch.where(p < 0, -r, r)
    q = torch.where(bad[..., None], 0.0, q)
    d = torch.where(bad, float("nan"), d)
    return q.to(torch.int8).flatten(-2), d.to(torch.float16)


def dequantize_q8_0(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """gguf's q8_0 dequantization, bit for bit: float32 d times the float32 code."""
    q = data.float().unflatten(-1, (-1, QK))
    return (q * scale.float()[..., None]).flatten(-2)


def quantize_q4_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (uint8 packed codes [..., D//2], fp16 d [..., D//32])."""
    blk, bad = _finite_or_zero(_blocks(x))
    # gguf takes the *first* value of largest |x| (torch's argmax documents the first maximal index);
    # gather copies its bits, so a -0.0 keeps its sign.
    first = blk.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(blk, -1, first).squeeze(-1) * -0.125  # == m / -8 exactly (a power of two)
    t = blk * _inverse(d)[..., None]
    t = t + 8.5  # a separate operation: rounded twice, as gguf does
    # t >= 0 for every finite block, so floor == trunc; NaN (1/d overflowed) -> 8, i.e. zero.
    q = torch.where(t == t, t.floor().clamp(0.0, 15.0), 8.0)
    q = torch.where(bad[..., None], 8.0, q).to(torch.uint8)
    packed = q[..., : QK // 2] | (q[..., QK // 2:] << 4)
    d = torch.where(bad, float("nan"), d)
    return packed.flatten(-2), d.to(torch.float16)


def dequantize_q4_0(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """gguf's q4_0 dequantization, bit for bit: float32 d times (q - 8)."""
    packed = data.unflatten(-1, (-1, QK // 2))
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float() - 8.0
    return (scale.float()[..., None] * q).flatten(-2)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (float8_e4m3fn codes [..., D], float32 scale [...] = amax / 448 per row)."""
    x, bad = _finite_or_zero(_values(x))
    scale = x.abs().amax(dim=-1) / FP8_MAX
    safe = torch.where(scale == 0, 1.0, scale)
    # x / scale can land a rounding step above 448, which e4m3fn would turn into NaN: clamp.
    y = torch.where(scale[..., None] == 0, 0.0, x / safe[..., None]).clamp(-FP8_MAX, FP8_MAX)
    y = torch.where(bad[..., None], 0.0, y)
    scale = torch.where(bad, float("nan"), scale)
    return y.to(torch.float8_e4m3fn), scale


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.float() * scale.float()[..., None]
