"""Attention: the module of a decoder layer, and attention of new query tokens over one layer of the KV cache
behind one signature with three backends.

- "glmtg": on CUDA, glmtg's split-KV Triton decode kernel for decode steps (S <= 16) and its causal prefill kernel
  for longer chunks, both reading the cache in its stored format (f16/bf16, or q8_0/q4_0/fp8 dequantized in
  registers); CPU (and head dims the kernels lack) fall back to "sdpa".
- "sdpa": torch scaled_dot_product_attention with enable_gqa and an offset causal mask.
- "eager": repeat_kv + matmul + fp32 softmax + matmul, as transformers' eager path (the reference).

The new tokens' K/V are already in the cache when ``attend`` runs, so every backend reads one tensor pair. A
layer store without a scale holds plain floats and is read in place in its own dtype; one with a scale is
dequantized by the cache (KVCache.dequantized, KVCache.whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from glmtg.config import ModelConfig
from glmtg.kernels import attention as _decode
from glmtg.formats import KV_FORMATS
from glmtg.layers import fused
from glmtg.layers.linear import DenseLinear
from glmtg.layers.norm import RMSNorm
from glmtg.layers.rope import apply_partial_rope

if TYPE_CHECKING:
    from glmtg.kv_cache import KVCache, KVLayerView

BACKENDS = ("glmtg", "sdpa", "eager")
MAX_DECODE_TOKENS = 16  # query tokens per sequence the decode kernel takes in one tile (speculative verification)


@dataclass(frozen=True)
class StepContext:
    """What every layer of one forward needs besides its input: built once per forward."""

    cache: KVCache
    lengths_after: torch.Tensor  # int32 [B]: cached tokens per sequence once this step's are appended
    cos: torch.Tensor  # fp32 [B, S, rotary_dim], for the new tokens' positions
    sin: torch.Tensor
    backend: str


class Attention(nn.Module):
    """QKV (one fused projection, with bias), optional per-head q/k RMSNorm, partial RoPE, cache, o_proj."""

    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        hidden, d = config.hidden_size, config.head_dim
        nq, nkv = self.num_heads * d, self.num_kv_heads * d
        self.qkv = DenseLinear(hidden, (("q", nq), ("k", nkv), ("v", nkv)), bias=config.attention_bias, dtype=dtype)
        self.o_proj = DenseLinear(nq, hidden, bias=False, dtype=dtype)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]; writes this layer's K/V of the S new tokens at ``ctx.cache.lengths``.

        The positions were checked once for the whole forward (by the model or its caller), so the append
        skips its per-layer host check.
        """
        bsz, s, _ = x.shape
        y = self.qkv(x)  # [B, S, (Hq + 2 Hkv) * D]
        v = y[..., y.shape[-1] - self.num_kv_heads * self.head_dim:].view(bsz, s, self.num_kv_heads, self.head_dim)
        if fused.fuses(y):
            q, k, stored = self._fused_qk(y, ctx)
        else:
            stored = False
            q, k, _ = self.qkv.split(y)  # [B, S, Hq*D], [B, S, Hkv*D]
            q = q.view(bsz, s, self.num_heads, self.head_dim)  # -> [B, S, Hq, D]
            k = k.view(bsz, s, self.num_kv_heads, self.head_dim)  # -> [B, S, Hkv, D]
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_partial_rope(q, ctx.cos, ctx.sin), apply_partial_rope(k, ctx.cos, ctx.sin)
        if not stored:
            ctx.cache.append(self.layer, k, v, start=ctx.cache.lengths, validate=False)
        # [B, S, Hq, D] in x's dtype (q may be in the decode kernel's query dtype already: _fused_qk)
        out = attend(q, ctx.cache, self.layer, ctx.lengths_after, ctx.backend, self.scale, out_dtype=x.dtype)
        return self.o_proj(out.reshape(bsz, s, self.num_heads * self.head_dim))

    def _fused_qk(self, y: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """q/k norm and RoPE of the fused projection's output in one kernel: q [B, S, Hq, D], k [B, S, Hkv, D],
        and whether that launch also wrote k and v into the cache (a plain contiguous store)."""
        from glmtg.kernels.qk_rope import qk_rope

        bsz, s, n = y.shape
        r = ctx.cos.shape[-1]
        extra = {} if self.q_norm is None else dict(q_norm=self.q_norm.weight, k_norm=self.k_norm.weight,
                                                    eps=self.q_norm.eps)
        k_view, v_view = ctx.cache.k(self.layer), ctx.cache.v(self.layer)
        stores = ctx.cache.page_table is None and all(
            view.scale is None and view.data.is_floating_point() and view.data.is_contiguous() for view in (k_view, v_view))
        if stores:
            extra.update(k_cache=k_view.data, v_cache=v_view.data, start=ctx.cache.lengths)
        if ctx.backend == "glmtg":
            # q straight in the dtype the decode kernel reads (f16 for an f16 cache of a bf16 model): no
            # conversion launch before attention
            extra["q_dtype"] = decode_query_dtype(y.is_cuda, s, self.head_dim, y.dtype, k_view, v_view)
        q, k = qk_rope(y.reshape(bsz * s, n), ctx.cos.reshape(bsz * s, r), ctx.sin.reshape(bsz * s, r),
                       num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, **extra)
        return (q.view(bsz, s, self.num_heads, self.head_dim), k.view(bsz, s, self.num_kv_heads, self.head_dim),
                stores)


def attend(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    lengths_after: torch.Tensor,
    backend: str,
    scale: float,
    static_shapes: bool | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """q [B, S, Hq, D] at positions lengths_after[b]-S .. lengths_after[b]-1, causal over the layer's cache.

    ``lengths_after`` int32 [B] counts the cached tokens including the S new ones. Returns [B, S, Hq, D] in
    ``out_dtype`` (default q's; the decode kernel rounds its fp32 result into it once). ``static_shapes`` (default: only while a CUDA graph is being captured) makes the torch
    backends attend over the whole cache capacity with a length mask built on the device, so that they
    need no host sync and can be captured; they then read the full capacity every step, as static-cache
    torch engines do.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, S, Hq, D], got shape {tuple(q.shape)}")
    k_view, v_view = cache.k(layer), cache.v(layer)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    query_dtype = (decode_query_dtype(q.is_cuda, q.shape[1], q.shape[3], q.dtype, k_view, v_view)
                   if backend == "glmtg" else None)
    if query_dtype is not None and q.shape[1] > MAX_DECODE_TOKENS:
        # prefill: one causal launch over the cache in its stored format (no bf16 copy of it), and no host sync
        out = _decode.prefill_attention(
            q.to(query_dtype), k_view.data, v_view.data, lengths_after.to(torch.int32),
            page_table=cache.page_table, k_scale=k_view.scale, v_scale=v_view.scale,
            k_format=k_view.format, v_format=v_view.format, scale=scale, validate=False,
        )
        return out.to(out_dtype)
    if query_dtype is not None:
        out = _decode.decode_attention(
            q.to(query_dtype), k_view.data, v_view.data, lengths_after.to(torch.int32),
            page_table=cache.page_table, k_scale=k_view.scale, v_scale=v_view.scale,
            k_format=k_view.format, v_format=v_view.format, scale=scale,
            # the cache advanced these lengths itself and the kernel clamps them on the device, so skip the
            # host-side check (a sync per layer per step)
            validate=False, out=torch.empty(q.shape, dtype=out_dtype, device=q.device),
        )
        return out
    if static_shapes is None:
        static_shapes = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if static_shapes:
        return _attend_static(q, cache, layer, lengths_after, scale, eager=backend == "eager").to(out_dtype)
    return _attend_per_sequence(q, cache, layer, lengths_after, scale, eager=backend == "eager").to(out_dtype)


def decode_query_dtype(is_cuda: bool, tokens: int, head_dim: int, dtype: torch.dtype, k_view: KVLayerView,
                       v_view: KVLayerView) -> torch.dtype | None:
    """The dtype the decode (``tokens`` <= MAX_DECODE_TOKENS per sequence) or prefill kernel needs q
    (``head_dim``, ``dtype``) in for this layer's stores, or None where neither applies."""
    head_dims = _decode.SUPPORTED_HEAD_DIMS if tokens <= MAX_DECODE_TOKENS else _decode.PREFILL_HEAD_DIMS
    if not is_cuda or head_dim not in head_dims:
        return None
    if k_view.format not in KV_FORMATS or v_view.format not in KV_FORMATS:
        return None
    # A plain store is read in its own dtype, which q must share; quantized stores take f16/bf16 queries.
    plain = {view.data.dtype for view in (k_view, v_view) if view.scale is None}
    if len(plain) > 1:
        return None  # e.g. f16 K with bf16 V: no single query dtype fits both
    if plain:
        return plain.pop()
    # fp32 models send f16 queries: 3 more mantissa bits than bf16, ample range for RoPE'd q
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def read_kv(cache: KVCache, layer: int, b: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n cached K and V rows of sequence b, [Hkv, n, D] each, in ``dtype``."""
    k_view, v_view = cache.k(layer), cache.v(layer)
    if cache.page_table is None and k_view.scale is None and v_view.scale is None:
        # contiguous [B, Hkv, Nmax, D] float storage: slice in place rather than copy through float32
        return k_view.data[b, :, :n].to(dtype), v_view.data[b, :, :n].to(dtype)
    k, v = cache.dequantized(layer, b, n)
    return k.to(dtype), v.to(dtype)


def causal_mask(s: int, n: int, device: torch.device) -> torch.Tensor:
    """bool [S, n]: query i (at position n - S + i) sees key j iff j <= n - S + i."""
    qpos = torch.arange(n - s, n, device=device)
    return torch.arange(n, device=device)[None, :] <= qpos[:, None]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[Hkv, n, D] -> [Hkv * groups, n, D], query head h reading KV head h // groups."""
    if groups == 1:
        return x
    hkv, n, d = x.shape
    return x[:, None].expand(hkv, groups, n, d).reshape(hkv * groups, n, d)


def _attend_per_sequence(q: torch.Tensor, cache: KVCache, layer: int, lengths_after: torch.Tensor,
                         scale: float, eager: bool) -> torch.Tensor:
    # One call per sequence: each reads exactly its own prefix, so rows past a sequence's length (which may
    # hold anything, NaN included) are never touched and no padding mask is needed.
    s, hq = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for b, n in enumerate(lengths_after.tolist()):
        if n < s:
            raise ValueError(f"lengths_after[{b}] = {n} is shorter than the {s} new tokens")
        k, v = read_kv(cache, layer, b, n, q.dtype)  # [Hkv, n, D]
        qb = q[b].transpose(0, 1)  # [S, Hq, D] -> [Hq, S, D]
        mask = causal_mask(s, n, q.device)
        if eager:
            groups = hq // k.shape[0]
            scores = torch.matmul(qb, repeat_kv(k, groups).transpose(1, 2)) * scale  # [Hq, S, n]
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            ob = torch.matmul(probs, repeat_kv(v, groups))  # [Hq, S, D]
        else:
            ob = F.scaled_dot_product_attention(qb[None], k[None], v[None], attn_mask=mask, scale=scale,
                                                enable_gqa=True)[0]
        out[b] = ob.transpose(0, 1)  # [Hq, S, D] -> [S, Hq, D]
    return out


def _attend_static(q: torch.Tensor, cache: KVCache, layer: int, lengths_after: torch.Tensor,
                   scale: float, eager: bool) -> torch.Tensor:
    s, hq = q.shape[1], q.shape[2]
    k, v = cache.whole(layer, q.dtype)  # [B, Hkv, C, D]
    # Query i of sequence b sits at lengths_after[b] - S + i and sees keys at positions <= its own.
    qpos = lengths_after.to(torch.int64)[:, None] - s + torch.arange(s, device=q.device)[None, :]  # [B, S]
    mask = torch.arange(k.shape[2], device=q.device)[None, None, :] <= qpos[:, :, None]  # [B, S, C]
    qt = q.transpose(1, 2)  # [B, Hq, S, D]
    if eager:
        groups = hq // k.shape[1]
        kr, vr = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, Hq, C, D]
        scores = torch.matmul(qt, kr.transpose(2, 3)) * scale  # [B, Hq, S, C]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, vr)
    else:
        out = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)  # [B, S, Hq, D]
