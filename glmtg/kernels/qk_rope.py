"""q and k of the fused QKV projection output, (RMS-normed and) partially roped, in one launch.

At decode, Attention.forward turns y = qkv(x) into roped q and k through ~17 small torch kernels (split,
views, two RMSNorms, two partial RoPEs with their casts and concatenations). This kernel does it in one:
program (t, h) reads head h of token t straight from y (k heads follow the q heads in a row of y, so head
h of either sits at columns h*D .. h*D+D), and writes it to q[t, h] or k[t, h - Hq]. v is not touched:
the caller takes it as a view of y. Optionally the same launch also appends the roped k and y's v to plain
(f16/bf16/fp32) contiguous KV stores, so the decode step needs no kv_store launches for such caches.

Per head, the same ops as the torch path (glmtg/layers/norm.py RMSNorm, glmtg/layers/rope.py
apply_partial_rope), in the same order:
- optional RMSNorm: x fp32; x * rsqrt(mean(x*x) + eps) rounded to y's dtype; times the [D] weight (in fp32,
  exact for f16/bf16 operands) rounded to y's dtype;
- NeoX RoPE of the first R dims (R = cos.shape[-1]): x*cos and partner*sin each rounded in fp32, the
  partner's product negated for the first half, summed, rounded to y's dtype; dims R..D pass unchanged.
The launch turns off fp fusion, so no multiply-add is contracted into an FMA: without the norm the result
is bit-equal to the torch path (checked in fp32/fp16 in the interpreter; on a GPU the PTX holds no fp32 FMA
and the bf16 GPU test checks it). With the norm
the sum of squares is reduced in another order than torch's (and rsqrt on a GPU is libdevice's), so the
normalised value can differ in the last fp32 bits, and rarely by one ulp of y's dtype after rounding.

The Triton interpreter (CPU) truncates float32 -> bfloat16 casts, so bf16 is right only on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.kernels._checks import check, describe
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release

__all__ = ["qk_rope"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _qk_rope_kernel(
    Y, Cos, Sin, QW, KW, Q, K, KC, VC, Start,
    stride_yt, stride_ct, stride_st,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_cb, stride_ch, stride_cp,
    eps, inv_d, seq_len, capacity,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
    NORM: tl.constexpr, STORE_KV: tl.constexpr, PDL: tl.constexpr = False,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    wait_and_release(PDL)
    half: tl.constexpr = R // 2
    cols = tl.arange(0, BLOCK_D)
    in_head = cols < D
    rotated = cols < R
    # The partner of column c in rotate_half: c + R/2 in the first half (taken negated), c - R/2 in the second.
    partner = tl.where(cols < half, cols + half, cols - half)
    src = Y + t * stride_yt + h * D
    x = tl.load(src + cols, mask=in_head, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=rotated, other=0.0).to(tl.float32)
    if h < HQ:
        w_ptr = QW
    else:
        w_ptr = KW
    out_ty = Y.dtype.element_ty  # every rounding in y's dtype, as the torch ops; q stored in Q's after them
    if NORM:
        r = tl.math.rsqrt(tl.sum(x * x, 0) * inv_d + eps)
        w = tl.load(w_ptr + cols, mask=in_head, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
        x = (w * (x * r).to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)
        xp = (wp * (xp * r).to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)
    c = tl.load(Cos + t * stride_ct + cols, mask=rotated, other=0.0)
    s = tl.load(Sin + t * stride_st + cols, mask=rotated, other=0.0)
    turn = xp * s
    roped = x * c + tl.where(cols < half, -turn, turn)
    out = tl.where(rotated, roped, x).to(out_ty)
    # q and k may differ in dtype (q_dtype): one store each, no pointer shared between the branches
    if h < HQ:
        tl.store(Q + t * stride_qt + h * stride_qh + cols, out.to(Q.dtype.element_ty), mask=in_head)
    else:
        tl.store(K + t * stride_kt + (h - HQ) * stride_kh + cols, out, mask=in_head)
    if STORE_KV:
        if h >= HQ:  # k head h - HQ: append it (roped) and its v head to the cache, as KVCache.append
            b = t // seq_len
            pos = tl.load(Start + b) + t % seq_len
            ok = in_head & (pos >= 0) & (pos < capacity)  # a position outside the cache writes nothing
            row = b * stride_cb + (h - HQ) * stride_ch + pos * stride_cp + cols
            cache_ty = KC.dtype.element_ty  # the store's own float type (an f16 cache of a bf16 model)
            tl.store(KC + row, out.to(cache_ty), mask=ok)
            tl.store(VC + row, tl.load(src + HKV * D + cols, mask=in_head).to(cache_ty), mask=ok)


def _check_count(name: str, value: object) -> None:
    check(isinstance(value, int) and value >= 1, lambda: f"{name} must be a positive int, got {value!r}")


def _check_angles(t: torch.Tensor, name: str, y: torch.Tensor) -> None:
    check(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == y.shape[0] and t.dtype == torch.float32,
          lambda: f"{name} must be float32 [T={y.shape[0]}, R], got {describe(t)}")
    check(t.device == y.device, lambda: f"{name} is on {t.device} but y is on {y.device}")
    check(t.stride(1) == 1, lambda: f"{name} must have a contiguous last dimension, strides {t.stride()}")


def _check_caches(k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, start: torch.Tensor | None,
                  y: torch.Tensor, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the caches are given (and fit: see qk_rope)."""
    given = [t is not None for t in (k_cache, v_cache, start)]
    check(all(given) or not any(given), "k_cache, v_cache and start must be given together or not at all")
    if not any(given):
        return False
    check(isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 and k_cache.shape[1] == num_kv_heads
          and k_cache.shape[3] == head_dim and k_cache.dtype in _DTYPES and k_cache.is_contiguous(),
          lambda: f"k_cache must be a contiguous float ({_DTYPES}) [B, Hkv={num_kv_heads}, capacity, D={head_dim}] store, "
                  f"got {describe(k_cache)}")
    batch = k_cache.shape[0]
    check(isinstance(v_cache, torch.Tensor) and v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
          and v_cache.is_contiguous(), lambda: f"v_cache must be like k_cache, got {describe(v_cache)}")
    check(isinstance(start, torch.Tensor) and start.dtype == torch.int32 and tuple(start.shape) == (batch,),
          lambda: f"start must be int32 of shape ({batch},), got {describe(start)}")
    check(k_cache.device == v_cache.device == start.device == y.device,
          lambda: f"k_cache, v_cache and start must be on y's device {y.device}, got {k_cache.device}, "
                  f"{v_cache.device} and {start.device}")
    check(y.shape[0] % batch == 0, lambda: f"k_cache batch {batch} does not divide the {y.shape[0]} tokens of y")
    return True


def _check_out(out: torch.Tensor | None, name: str, shape: tuple[int, int, int], y: torch.Tensor,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = y.dtype if dtype is None else dtype
    if out is None:
        return torch.empty(shape, dtype=dtype, device=y.device)
    check(isinstance(out, torch.Tensor) and tuple(out.shape) == shape and out.dtype == dtype,
          lambda: f"{name} must be {dtype} {shape}, got {describe(out)}")
    check(out.device == y.device, lambda: f"{name} is on {out.device} but y is on {y.device}")
    check(out.stride(2) == 1, lambda: f"{name} must have a contiguous last dimension, strides {out.stride()}")
    return out


def _check_weight(w: torch.Tensor | None, name: str, y: torch.Tensor, head_dim: int) -> None:
    check(isinstance(w, torch.Tensor) and tuple(w.shape) == (head_dim,) and w.dtype == y.dtype,
          lambda: f"{name} must be {y.dtype} ({head_dim},), got {describe(w)}")
    check(w.device == y.device, lambda: f"{name} is on {w.device} but y is on {y.device}")
    check(w.stride(0) == 1, lambda: f"{name} must be contiguous, stride {w.stride()}")


def qk_rope(
    y: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-5,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    q_dtype: torch.dtype | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [T, (Hq + 2*Hkv) * D] (q | k | v per token row) -> q [T, Hq, D], k [T, Hkv, D] in y's dtype.

    ``cos``/``sin`` fp32 [T, R] (rope_cos_sin's, one row per token) rotate the first R dims of every q and k
    head, NeoX layout (R even, 2 <= R <= D). ``q_norm``/``k_norm`` (both or neither): [D] RMSNorm weights in
    y's dtype, applied per head with ``eps`` before the rotation. ``q_out``/``k_out``: written in place
    and returned when given (any token/head strides, contiguous last dimension). ``q_dtype`` (default y's):
    q's dtype, e.g. f16 for the decode kernel reading an f16 cache of a bf16 model; q is rounded as in y's
    dtype first, then converted (as the torch path's ``q.to(...)`` after it), so no separate launch. Rounding is the torch
    path's (module docstring). Bad arguments raise ValueError naming them.

    ``k_cache``/``v_cache``/``start`` (all or none): one layer's plain contiguous K and V stores (f16,
    bf16 or fp32, both the same; values converted to it as KVCache.append does), [B, Hkv, capacity, D] (B divides T: token t is token t % S of sequence t // S, S = T / B), and
    int32 [B] start positions. The roped k and y's v of token t are then also written at position
    start[b] + s, as KVCache.append does for f16/bf16 stores; a position outside [0, capacity) writes
    nothing (no host check: the launch can be captured in a CUDA graph).
    """
    _check_count("num_heads", num_heads)
    _check_count("num_kv_heads", num_kv_heads)
    _check_count("head_dim", head_dim)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    check(isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[1] == width,
          lambda: f"y must be [T, (num_heads + 2*num_kv_heads) * head_dim = {width}], got {describe(y)}")
    check(y.dtype in _DTYPES, lambda: f"y dtype {y.dtype} is not one of {_DTYPES}")
    check(y.stride(1) == 1, lambda: f"y must have contiguous rows, strides {y.stride()}")
    tokens = y.shape[0]
    _check_angles(cos, "cos", y)
    _check_angles(sin, "sin", y)
    rot = cos.shape[1]
    check(sin.shape == cos.shape, lambda: f"sin {tuple(sin.shape)} must have cos's shape {tuple(cos.shape)}")
    check(rot % 2 == 0 and 2 <= rot <= head_dim,
          lambda: f"cos/sin rotary dim R = {rot} must be even and in [2, head_dim = {head_dim}]")
    check((q_norm is None) == (k_norm is None), "q_norm and k_norm must be given together or not at all")
    norm = q_norm is not None
    if norm:
        _check_weight(q_norm, "q_norm", y, head_dim)
        _check_weight(k_norm, "k_norm", y, head_dim)
    check(isinstance(eps, (int, float)) and eps >= 0, lambda: f"eps must be a float >= 0, got {eps!r}")
    q_dtype = y.dtype if q_dtype is None else q_dtype
    check(q_dtype in _DTYPES, lambda: f"q_dtype must be one of {_DTYPES}, got {q_dtype!r}")
    q = _check_out(q_out, "q_out", (tokens, num_heads, head_dim), y, q_dtype)
    k = _check_out(k_out, "k_out", (tokens, num_kv_heads, head_dim), y)
    store = _check_caches(k_cache, v_cache, start, y, num_kv_heads, head_dim)
    if tokens == 0:
        return q, k
    weights = (q_norm, k_norm) if norm else (y, y)  # never read without the norm
    caches = (k_cache, v_cache, start) if store else (y, y, y)  # never read without the store
    seq_len = tokens // k_cache.shape[0] if store else 1
    strides = k_cache.stride()[:3] if store else (0, 0, 0)
    _qk_rope_kernel[(tokens, num_heads + num_kv_heads)](
        y, cos, sin, *weights, q, k, *caches,
        y.stride(0), cos.stride(0), sin.stride(0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        *strides,
        float(eps), 1.0 / head_dim, seq_len, k_cache.shape[2] if store else 0,
        HQ=num_heads, HKV=num_kv_heads, D=head_dim, R=rot, BLOCK_D=triton.next_power_of_2(head_dim), NORM=norm,
        STORE_KV=store, PDL=enabled(y.device),
        num_warps=1 if head_dim <= 128 else 2, **launch_kwargs(y.device),
        # torch rounds x*cos and partner*sin before adding them: an FMA would round once and differ.
        enable_fp_fusion=False,
    )
    return q, k
