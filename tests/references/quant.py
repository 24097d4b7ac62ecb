"""Pure-torch references of the KV cache formats, written apart from the Triton kernel.

q8_0/q4_0 follow the arithmetic of the ``gguf`` package (gguf/quants.py) step for step, in float32:
q8_0: d = amax / 127; id = 1/d (0 if d == 0); q = round-half-away(x * id); d stored as fp16.
q4_0: m = first value of largest |x|; d = m / -8; id likewise; q = min(15, trunc(x * id + 8.5)),
with x * id rounded before the addition (numpy evaluates them as two operations).
fp8: one float32 scale per row = amax / 448; codes = e4m3fn(clamp(x / scale, +-448)).

Storage is planar like glmtg.kv_cache (codes [..., D] or [..., D//2], scales [..., D//32] or [...]);
``to_gguf_blocks`` interleaves it into llama.cpp's blocks for byte comparison with gguf.
NaN/Inf policy (glmtg's): a scale group holding NaN/Inf gets scale NaN and zero codes.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 32
FP8_MAX = 448.0


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % QK:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {QK}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], fp16 d [..., D//32])."""
    blk = _blocks(x)
    bad = ~torch.isfinite(blk).all(dim=-1)
    blk = torch.where(torch.isfinite(blk), blk, torch.zeros_like(blk))
    d = blk.abs().amax(dim=-1) / 127.0
    prod = blk * _safe_inverse(d)[..., None]
    mag = prod.abs()
    whole = mag.floor()
    # gguf's np_roundf adds floor(2 * frac); "frac >= 0.5" is the same for every finite value and
    # also keeps inf (1/d overflowed, amax < ~4e-37, gguf's codes undefined) from becoming NaN.
    rounded = whole + (mag - whole >= 0.5).float()
    rounded = torch.nan_to_num(rounded, nan=0.0).clamp(max=127.0)
    q = torch.sign(prod).nan_to_num(nan=0.0) * rounded
    q = torch.where(bad[..., None], torch.zeros_like(q), q)
    d = torch.where(bad, torch.full_like(d, float("nan")), d)
    return q.to(torch.int8).reshape(x.shape), d.to(torch.float16)


def dequantize_q8_0(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = data.to(torch.float32).reshape(*data.shape[:-1], -1, QK)
    return (q * scale.to(torch.float32)[..., None]).reshape(data.shape)


def quantize_q4_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (uint8 packed codes [..., D//2], fp16 d [..., D//32])."""
    blk = _blocks(x)
    bad = ~torch.isfinite(blk).all(dim=-1)
    blk = torch.where(torch.isfinite(blk), blk, torch.zeros_like(blk))
    first = blk.abs().argmax(dim=-1, keepdim=True)  # torch documents: the first maximal index
    m = torch.gather(blk, -1, first).squeeze(-1)
    d = m / -8.0
    t = blk * _safe_inverse(d)[..., None]
    t = t + 8.5  # a separate op: rounded twice, like numpy
    q = t.trunc().clamp(0.0, 15.0).nan_to_num(nan=8.0)  # NaN only where 1/d overflowed
    q = torch.where(bad[..., None], torch.full_like(q, 8.0), q).to(torch.uint8)
    packed = q[..., : QK // 2] | (q[..., QK // 2:] << 4)
    d = torch.where(bad, torch.full_like(d, float("nan")), d)
    return packed.reshape(*x.shape[:-1], x.shape[-1] // 2), d.to(torch.float16)


def dequantize_q4_0(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    packed = data.reshape(*data.shape[:-1], -1, QK // 2).to(torch.int32)
    q = torch.cat([packed & 15, packed >> 4], dim=-1).to(torch.float32) - 8.0
    out = scale.to(torch.float32)[..., None] * q
    return out.reshape(*data.shape[:-1], data.shape[-1] * 2)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (float8_e4m3fn codes [..., D], float32 scale [...])."""
    x = x.float()
    bad = ~torch.isfinite(x).all(dim=-1)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    scale = x.abs().amax(dim=-1) / FP8_MAX
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = torch.where(scale[..., None] == 0, torch.zeros_like(x), x / safe[..., None]).clamp(-FP8_MAX, FP8_MAX)
    y = torch.where(bad[..., None], torch.zeros_like(y), y)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return y.to(torch.float8_e4m3fn), scale


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.to(torch.float32) * scale[..., None]


def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if fmt == "f16":
        return x.to(torch.float16), None
    if fmt == "bf16":
        return x.to(torch.bfloat16), None
    return {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "fp8": quantize_fp8}[fmt](x)


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    if fmt in ("f16", "bf16"):
        return data.to(torch.float32)
    return {"q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0, "fp8": dequantize_fp8}[fmt](data, scale)


def to_gguf_blocks(data: torch.Tensor, scale: torch.Tensor, fmt: str) -> np.ndarray:
    """Interleave planar storage into llama.cpp blocks: uint8 [..., (D//32) * block_bytes].

    q8_0 block: fp16 d (little endian) + int8 q[32] = 34 bytes; q4_0: fp16 d + uint8 qs[16] = 18.
    The result has the shape ``gguf.quants.quantize`` returns for an array [..., D].
    """
    if fmt not in ("q8_0", "q4_0"):
        raise ValueError(f"fmt must be q8_0 or q4_0, got {fmt!r}")
    nb = scale.shape[-1]
    d = scale.detach().cpu().contiguous().numpy().astype("<f2").view(np.uint8).reshape(*scale.shape, 2)
    codes = data.detach().cpu().contiguous().numpy().view(np.uint8)
    codes = codes.reshape(*data.shape[:-1], nb, codes.shape[-1] // nb)
    return np.concatenate([d, codes], axis=-1).reshape(*data.shape[:-1], -1)
