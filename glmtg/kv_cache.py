"""KV cache storage: static (contiguous) or paged, in f16, bf16, q8_0, q4_0 or fp8.

Every layer's K (and V) is stored as a 4-D code tensor plus, for the quantized formats, a scale
tensor beside it ("planar", struct of arrays) rather than llama.cpp's interleaved blocks: a kernel
then loads a row of codes and its scales with two aligned, coalesced loads, and the bytes of every
q8_0/q4_0 block are still llama.cpp's (``tests/references/quant.to_gguf_blocks`` interleaves them).

Per layer, P = batch and T = capacity for a contiguous cache, P = num_pages and T = page_size for a
paged one:

=======  =========================================  ===========================================
format   data                                        scale
=======  =========================================  ===========================================
f16      float16 [P, Hkv, T, D]                      None
bf16     bfloat16 [P, Hkv, T, D]                     None
q8_0     int8 [P, Hkv, T, D]                         float16 [P, Hkv, T, D//32] (block d)
q4_0     uint8 [P, Hkv, T, D//2]; block i is bytes   float16 [P, Hkv, T, D//32] (block d)
         16i..16i+15, byte j = q[j] | q[j+16] << 4
fp8      float8_e4m3fn [P, Hkv, T, D]                float32 [P, Hkv, T] (amax / 448)
=======  =========================================  ===========================================

fp8 uses one scale per (token, head) row: at D = 128 it costs 4 bytes per 128 values (3 %) and the
attention kernel loads it once per row it already loads, next to the row's codes. One scale per 32
values (as q8_0 does) would follow outliers more closely but cost 4x the scale bytes and a
[BLOCK_N, D/32] scale tile to broadcast in the inner loop; e4m3's 3-bit mantissa keeps a relative
error of <= 2^-4 for every value within the scale's normal range, so the row scale loses little.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from glmtg.formats import FORMATS, KV_FORMATS, dequantize
from glmtg.kernels.kv_store import kv_store

__all__ = ["KVCache", "KVLayerView"]

_PAGE_SEED = 0  # fixed, so a paged cache is reproducible


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)


@dataclass(frozen=True)
class KVLayerView:
    """What an attention kernel reads for one layer, one of K or V (shapes in the module doc)."""

    data: torch.Tensor
    scale: torch.Tensor | None
    format: str


class KVCache:
    """Per-layer K/V storage for ``batch`` sequences of up to ``capacity`` tokens.

    ``lengths`` (int32 [B] on the device) counts the tokens cached per sequence; ``append`` writes
    new tokens but leaves ``lengths`` alone, so the caller advances it once per forward (all layers
    write at the same positions). With ``page_size`` the cache is paged: every sequence gets
    ``max_pages = ceil(capacity / page_size)`` pages of a pool of ``batch * max_pages``, handed out at
    construction in a fixed shuffled order (so nothing can silently rely on pages being in order),
    and ``page_table`` int32 [B, max_pages] maps a sequence's page j to its pool page.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        k_format: str = "bf16",
        v_format: str | None = None,
        page_size: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        for name, value in (("num_layers", num_layers), ("batch", batch), ("capacity", capacity),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if v_format is None:
            v_format = k_format
        for name, fmt in (("k_format", k_format), ("v_format", v_format)):
            if fmt not in KV_FORMATS:
                raise ValueError(f"{name} must be one of {KV_FORMATS}, got {fmt!r}")
            if FORMATS[fmt].row_error(head_dim) is not None:
                raise ValueError(f"head_dim {head_dim} must be a multiple of {FORMATS[fmt].block_size} "
                                 f"for {name}={fmt}")
        if page_size is not None and (not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1):
            raise ValueError(f"page_size must be a positive int or None, got {page_size!r}")

        self.num_layers = num_layers
        self.batch = batch
        self.capacity = capacity
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.k_format = k_format
        self.v_format = v_format
        self.page_size = page_size
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.device = self.lengths.device  # "cuda" resolved to "cuda:N", as tensors report it

        if page_size is None:
            self.max_pages = 0
            self.num_pages = batch
            tokens = capacity
            self.page_table: torch.Tensor | None = None
        else:
            self.max_pages = -(-capacity // page_size)
            self.num_pages = batch * self.max_pages
            tokens = page_size
            perm = torch.randperm(self.num_pages, generator=torch.Generator().manual_seed(_PAGE_SEED))
            self.page_table = perm.view(batch, self.max_pages).to(torch.int32).to(self.device)

        # One allocation per store for all layers; each layer's view is contiguous.
        self._k_data, self._k_scale = self._alloc(k_format, tokens)
        self._v_data, self._v_scale = self._alloc(v_format, tokens)

    def _alloc(self, fmt: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        data_shape, data_dtype, scale_shape, scale_dtype = FORMATS[fmt].storage_shape(
            self.num_pages, self.num_kv_heads, tokens, self.head_dim)
        data = torch.zeros((self.num_layers, *data_shape), dtype=data_dtype, device=self.device)
        scale = None
        if scale_shape is not None:
            scale = torch.zeros((self.num_layers, *scale_shape), dtype=scale_dtype, device=self.device)
        return data, scale

    def _layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def k(self, layer: int) -> KVLayerView:
        layer = self._layer(layer)
        return KVLayerView(self._k_data[layer], None if self._k_scale is None else self._k_scale[layer], self.k_format)

    def v(self, layer: int) -> KVLayerView:
        layer = self._layer(layer)
        return KVLayerView(self._v_data[layer], None if self._v_scale is None else self._v_scale[layer], self.v_format)

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, start: torch.Tensor,
               *, validate: bool = True) -> None:
        """Write token s of sequence b at position ``start[b] + s`` of ``layer``, quantizing.

        k_new/v_new: [B, S, Hkv, D] in any float dtype; start: int32 [B] on the cache's device.
        ``self.lengths`` is not changed. ``validate`` checks the positions on the host (one sync),
        and is skipped while a CUDA graph is being captured.
        """
        layer = self._layer(layer)
        want = (self.batch, None, self.num_kv_heads, self.head_dim)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or any(
                    w is not None and s != w for s, w in zip(t.shape, want)):
                raise ValueError(f"{name} must be [B={self.batch}, S, Hkv={self.num_kv_heads}, "
                                 f"D={self.head_dim}], got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.device}")
        if v_new.shape != k_new.shape:
            raise ValueError(f"v_new shape {tuple(v_new.shape)} must equal k_new shape {tuple(k_new.shape)}")
        if not isinstance(start, torch.Tensor) or start.dtype != torch.int32 or tuple(start.shape) != (self.batch,):
            raise ValueError(f"start must be int32 of shape ({self.batch},), got "
                             f"{(start.dtype, tuple(start.shape)) if isinstance(start, torch.Tensor) else start!r}")
        if start.device != self.device:
            raise ValueError(f"start is on {start.device} but the cache is on {self.device}")
        k, v = self.k(layer), self.v(layer)
        kv_store(k_new, k.data, k.scale, start, k.format, page_table=self.page_table,
                 capacity=self.capacity, validate=validate, name="k_new")
        # Positions were checked with K; V writes the same ones.
        kv_store(v_new, v.data, v.scale, start, v.format, page_table=self.page_table,
                 capacity=self.capacity, validate=False, name="v_new")

    def dequantized(self, layer: int, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First ``n`` tokens of sequence ``b`` in ``layer``: (K, V), float32 [Hkv, n, D] each."""
        layer = self._layer(layer)
        if not isinstance(b, int) or not 0 <= b < self.batch:
            raise ValueError(f"b must be an int in [0, {self.batch}), got {b!r}")
        if not isinstance(n, int) or not 0 <= n <= self.capacity:
            raise ValueError(f"n must be an int in [0, {self.capacity}], got {n!r}")
        return self._read(self.k(layer), b, n), self._read(self.v(layer), b, n)

    def _read(self, view: KVLayerView, b: int, n: int) -> torch.Tensor:
        def rows(t: torch.Tensor) -> torch.Tensor:  # [Hkv, n, ...] of sequence b
            if self.page_table is None:
                return t[b, :, :n]
            pages = self.page_table[b, : -(-n // self.page_size)].long()
            return t[pages].transpose(0, 1).flatten(1, 2)[:, :n]

        return dequantize(rows(view.data), None if view.scale is None else rows(view.scale), view.format)

    def whole(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of every sequence over the full capacity, [B, Hkv, capacity, D] each, in ``dtype``.

        Rows past a sequence's length hold whatever was stored there: the caller masks them. The
        shapes never depend on lengths, so a torch attention over this can be captured in a CUDA graph.
        """
        layer = self._layer(layer)
        out = []
        for view in (self.k(layer), self.v(layer)):
            x = view.data.to(dtype) if view.scale is None else dequantize(view.data, view.scale, view.format).to(dtype)
            if self.page_table is not None:  # [pages, Hkv, ps, D] -> [B, Hkv, max_pages * ps, D]
                x = x[self.page_table.long()]  # [B, max_pages, Hkv, ps, D]
                bsz, pages, hkv, ps, d = x.shape
                x = x.permute(0, 2, 1, 3, 4).reshape(bsz, hkv, pages * ps, d)
            out.append(x[:, :, : self.capacity])
        return out[0], out[1]

    def rows(self, lengths: torch.Tensor, page_table: torch.Tensor) -> KVCache:
        """A cache over the same page pool for another set of sequences: ``batch = B`` with these
        ``lengths`` (int32 [B]) and ``page_table`` (int32 [B, max_pages]), sharing every store.

        A server's sequences come and go and own whichever pages its block manager hands out, so each
        forward views the pool through the rows it runs. Paged caches only. Shapes, dtypes and devices
        are checked here; the values are the caller's (a token at a position or page outside the cache
        is skipped by the store, never written elsewhere).
        """
        if self.page_table is None:
            raise ValueError("rows needs a paged cache (page_size set)")
        if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int32 or lengths.dim() != 1 \
                or lengths.shape[0] < 1:
            raise ValueError(f"lengths must be int32 [B] with B >= 1, got {_describe(lengths)}")
        want = (lengths.shape[0], self.max_pages)
        if not isinstance(page_table, torch.Tensor) or page_table.dtype != torch.int32 \
                or tuple(page_table.shape) != want:
            raise ValueError(f"page_table must be int32 {want}, got {_describe(page_table)}")
        for name, t in (("lengths", lengths), ("page_table", page_table)):
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.device}")
        view = copy.copy(self)  # the stores are shared, not copied
        view.batch = want[0]
        view.lengths = lengths
        view.page_table = page_table
        return view

    def reset(self) -> None:
        self.lengths.zero_()

    @property
    def nbytes(self) -> int:
        """Bytes of all stores (codes and scales, all layers, K and V)."""
        tensors = (self._k_data, self._k_scale, self._v_data, self._v_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in all layers, K and V, scales included."""
        per_head = FORMATS[self.k_format].row_bytes(self.head_dim) + FORMATS[self.v_format].row_bytes(self.head_dim)
        return self.num_layers * self.num_kv_heads * per_head

    def __repr__(self) -> str:
        paging = f", page_size={self.page_size}, num_pages={self.num_pages}" if self.page_size else ""
        return (f"KVCache(layers={self.num_layers}, batch={self.batch}, capacity={self.capacity}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, k={self.k_format}, "
                f"v={self.v_format}{paging}, {self.nbytes / 2**20:.1f} MiB on {self.device})")
