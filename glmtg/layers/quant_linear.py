"""Projections and the token embedding with weights kept as GGUF blocks: raw uint8 rows, never a float copy.

A GGUF file stores each weight matrix in one block format (glmtg/formats/registry.py), row by row. These
modules hold those bytes as they are and read them two ways:

- few tokens (decode): ``glmtg.kernels.gguf.gemv.quant_matvec`` reads the blocks in place, one pass over
  the weight bytes, which is what decode speed is made of.
- a decode batch (2..16 tokens by default: glmtg/kernels/gguf/small_batch.py; ``GLMTG_SMALL_BATCH=old``
  turns it off):
  ``glmtg.kernels.gguf.dispatch.batch_matmul`` (mmq_small: each weight tile decoded once for all the
  tokens into tensor-core dots; or mmq_i8's int8 dots), bias and residual in its epilogue.
- many tokens (prefill): the rows are dequantized to the activations' dtype (a transient of one projection,
  freed after its product) and multiplied with ``F.linear`` (cuBLAS), faster than decoding tiles inside a
  GEMM for these dense shapes (bench/DECISIONS.md H6). ``gemm = "mmq"`` takes
  ``glmtg.kernels.gguf.mmq.mmq`` instead (tiles of the blocks decoded in registers straight into
  tensor-core dots, no float copy of the weight; bias and residual in its epilogue) on the kernel backend.

Shards of one fused projection may come in different formats (a Q4_K_M file has attn_q/attn_k in Q4_K and
attn_v in Q6_K). Consecutive shards sharing a format are stored as one buffer, so q and k still run as one
product.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from glmtg.formats import GGUF_FORMATS, REGISTRY
from glmtg.layers.linear import Linear, Shards
from glmtg.layers.params import write_parameter

BACKENDS = ("auto", "kernel", "torch")
# How the kernel backend runs products of many tokens (prefill): "auto" = the dequantizing GEMM (mmq) where
# the Triton decoders read the formats, else dequantize + F.linear; "dequant" forces the latter (A/B checks).
GEMMS = ("auto", "mmq", "dequant")  # "auto": dense products dequantize, routed experts run the grouped GEMM


def check_format(fmt: object, in_features: int, what: str) -> str:
    """``fmt`` if it is a GGUF block format whose blocks tile rows of ``in_features`` values; ValueError
    naming ``what`` otherwise."""
    if not isinstance(fmt, str) or fmt not in GGUF_FORMATS:
        raise ValueError(f"{what} must be one of {GGUF_FORMATS}, got {fmt!r}")
    if in_features % REGISTRY[fmt].block_size:
        raise ValueError(f"{what} {fmt} has blocks of {REGISTRY[fmt].block_size} values, which do not tile "
                         f"rows of {in_features}")
    return fmt


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def uses_kernels(backend: str, x: torch.Tensor) -> bool:
    """Whether the Triton kernels run: always for "kernel", for CUDA inputs under "auto" (a CPU would need
    the Triton interpreter), never for "torch"."""
    return backend == "kernel" or (backend == "auto" and x.is_cuda)


def check_gemm(gemm: object) -> str:
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    return gemm  # type: ignore[return-value]


def has_device_decoder(fmt: str) -> bool:
    """Whether the Triton block decoders (glmtg/kernels/gguf/decode.py) read ``fmt``: the GEMV, the fused MoE
    and ``dequantize_rows`` take those formats only; others go through the registry's torch decoder."""
    from glmtg.kernels.gguf.decode import DECODED

    return fmt in DECODED


def dequantize(raw: torch.Tensor, fmt: str, dtype: torch.dtype, *, kernel: bool) -> torch.Tensor:
    """Rows of blocks uint8 [..., row_bytes] -> values [..., row_values] in ``dtype``: the Triton decoder
    (``dequantize_rows``) with ``kernel`` where it reads ``fmt``, else the torch decoder of the registry."""
    if not (kernel and has_device_decoder(fmt)):
        return REGISTRY[fmt].dequantize_blocks(raw).to(dtype)
    from glmtg.kernels.gguf.dequant import dequantize_rows

    if raw.data_ptr() % 16 or not raw.is_contiguous():
        # dequantize_rows wants 16-byte aligned rows; an expert's slice of a stack whose rows are not a
        # multiple of 16 bytes is not. A fresh allocation is.
        raw = raw.clone(memory_format=torch.contiguous_format)
    return dequantize_rows(raw, fmt, dtype=dtype)


class QuantLinear(Linear):
    """y = x Wᵀ (+ b) with W in GGUF blocks: one format for all shards (``formats`` a str) or one per shard
    (a mapping shard name -> format; the key None for an unsharded linear). The bias stays float (``dtype``).

    Runs of consecutive shards in one format are stored as one uint8 parameter [rows, row_bytes]: ``weight``
    when the whole linear is one run, else ``weight_0``, ``weight_1``, ... in row order.
    """

    def __init__(self, in_features: int, out: int | Shards, *, bias: bool, formats: str | Mapping[str | None, str],
                 dtype: torch.dtype, backend: str = "auto") -> None:
        super().__init__(in_features, out, bias)
        self.backend = check_backend(backend)
        # Which decode kernel reads the blocks (glmtg/kernels/gguf/dispatch.py): "auto" = int8 dot products
        # where the format has them, else float decode; "float" for checks against the float path.
        self.dot = "auto"
        # How products of many tokens run (GEMMS): "auto" dequantizes + cuBLAS here (faster, DECISIONS H6).
        self.gemm = "auto"
        names = [name for name, _ in self.shards]
        if isinstance(formats, str):
            per_shard = {name: formats for name in names}
        elif isinstance(formats, Mapping):
            if set(formats) != set(names):
                raise ValueError(f"formats must give a format for each shard {names}, got keys {list(formats)}")
            per_shard = dict(formats)
        else:
            raise ValueError(f"formats must be a format name or a mapping shard -> format, got {formats!r}")
        for name in names:
            check_format(per_shard[name], in_features, f"formats[{name!r}]")
        self.formats: dict[str | None, str] = per_shard
        # (parameter, format, first row, end row) of each run of consecutive shards in one format
        runs: list[list] = []
        for name, rows in self.shards:
            span = self.rows(name)
            if runs and runs[-1][1] == per_shard[name]:
                runs[-1][3] = span.stop
            else:
                runs.append([None, per_shard[name], span.start, span.stop])
        for i, run in enumerate(runs):
            run[0] = "weight" if len(runs) == 1 else f"weight_{i}"
            row_bytes = REGISTRY[run[1]].blocks_bytes(in_features)
            setattr(self, run[0], nn.Parameter(torch.empty(run[3] - run[2], row_bytes, dtype=torch.uint8),
                                               requires_grad=False))
        self.groups: tuple[tuple[str, str, int, int], ...] = tuple(tuple(run) for run in runs)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype)) if bias else None

    def storage(self, shard: str | None) -> tuple[str, str, slice | None]:
        """(parameter, format, its rows holding ``shard`` or None for all of them)."""
        span = self.rows(shard)
        for attr, fmt, start, stop in self.groups:
            if start <= span.start and span.stop <= stop:
                whole = span.start == start and span.stop == stop
                return attr, fmt, None if whole else slice(span.start - start, span.stop - start)
        raise ValueError(f"shard {shard!r} spans shards of different formats: load it shard by shard")

    def slot_format(self, param: str, shard: str | None) -> str | None:
        """The block format checkpoint tensor (``param``, ``shard``) is kept in; None for the float bias."""
        return self.storage(shard)[1] if param == "weight" else None

    def load_shard(self, param: str, shard: str | None, value: torch.Tensor) -> None:
        """"weight": raw blocks uint8 [rows of shard, row_bytes], stored as given (no copy) when the shard is
        a whole run, else copied into its rows. "bias": float [rows of shard], as DenseLinear."""
        allowed = ("weight", "bias") if self.has_bias else ("weight",)
        if param not in allowed:
            raise ValueError(f"param must be one of {allowed}, got {param!r}")
        if param == "bias":
            whole = shard is None or (len(self.shards) == 1 and self.rows(shard) == self.rows(None))
            write_parameter(self, "bias", value, None if whole else self.rows(shard))
            return
        attr, _, rows = self.storage(shard)
        write_parameter(self, attr, value, rows)

    def raw_shard(self, shard: str | None) -> torch.Tensor:
        """The raw blocks of ``shard`` (all rows for None, when they share one format): a view, no copy."""
        attr, _, rows = self.storage(shard)
        weight = getattr(self, attr)
        return weight if rows is None else weight[rows]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype; plus ``residual`` [..., out_features]
        when given (added after the bias, in x's dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        res2 = None if residual is None else residual.reshape(-1, self.out_features)
        if self._small_batch(x2, res2):
            return self._mmq_products(x2, res2, small=True).view(*lead, self.out_features)
        if self.int8_decode(x2):
            return self._int8_products(x2, None, x2.dtype, res2).view(*lead, self.out_features)
        kernel = uses_kernels(self.backend, x2)
        gemv = kernel and _gemv_applies(x2.shape[0])
        if kernel and not gemv and self._mmq_applies(x2, res2):
            return self._mmq_products(x2, res2).view(*lead, self.out_features)
        ys = [_product(x2, getattr(self, attr), fmt, kernel=kernel, gemv=gemv, dot=self.dot)
              for attr, fmt, _, _ in self.groups]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        if res2 is not None:
            y = y + res2
        return y.view(*lead, self.out_features)

    def _mmq_applies(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the dequantizing GEMM takes this product of many tokens: ``gemm`` asks for it and
        ``_mmq_fits``."""
        return check_gemm(self.gemm) == "mmq" and self._mmq_fits(x, residual)

    def _small_batch(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the decode-batch GEMM (mmq_small) takes this product: the kernels run for x, the token
        count and every run's format are small_batch's (``small_batch.takes``), ``gemm`` is not "dequant"
        (which keeps the paths from before for A/B checks) and ``_mmq_fits``."""
        from glmtg.kernels.gguf import small_batch

        # small_batch.takes first: the cheapest test, and false at one token (every decode step)
        return (small_batch.takes(x.shape[0], *(f for _, f, _, _ in self.groups)) and uses_kernels(self.backend, x)
                and check_gemm(self.gemm) != "dequant" and self._mmq_fits(x, residual))

    def _mmq_fits(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the tile GEMMs (mmq, mmq_small) can take this product: the Triton decoders read every
        run's format, and x, bias and residual share a dtype the GEMM takes (its epilogue adds them in x's
        dtype)."""
        from glmtg.kernels.gguf.gemv import SUPPORTED_DTYPES

        dtype = x.dtype
        # The GEMM reads the stored blocks as they are (no copy), so they must be contiguous and aligned as a
        # GGUF tensor is; anything else (a hand-made view) takes the dequantize path, which copies.
        stored = [getattr(self, attr) for attr, _, _, _ in self.groups]
        return (dtype in SUPPORTED_DTYPES
                and all(has_device_decoder(fmt) for _, fmt, _, _ in self.groups)
                and all(w.is_contiguous() and w.data_ptr() % 16 == 0 for w in stored)
                and (self.bias is None or self.bias.dtype == dtype)
                and (residual is None or (residual.dtype == dtype and residual.stride(-1) == 1)))

    def _mmq_products(self, x: torch.Tensor, residual: torch.Tensor | None, small: bool = False) -> torch.Tensor:
        """Every run's dequantizing GEMM (``small``: the decode-batch one, mmq_small) written into its
        columns of one output, bias and ``residual`` added in the same launches (torch's roundings:
        y = round(x Wᵀ), round(y + b), round(y + residual))."""
        from glmtg.kernels.gguf.dispatch import batch_matmul
        from glmtg.kernels.gguf.mmq import mmq

        gemm = batch_matmul if small else mmq

        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for attr, fmt, start, stop in self.groups:
            gemm(x, getattr(self, attr), fmt, out=out[:, start:stop],
                bias=None if self.bias is None else self.bias[start:stop],
                residual=None if residual is None else residual[:, start:stop])
        return out

    def reads_int8(self) -> bool:
        """Whether decode products read int8-rounded activations: every run's format on the int8-dot path
        (glmtg/kernels/gguf/dispatch.py) and ``dot`` not forcing the float path."""
        from glmtg.kernels.gguf.dispatch import uses_int8

        return uses_int8(self.dot, *(fmt for _, fmt, _, _ in self.groups))

    def int8_decode(self, x: torch.Tensor) -> bool:
        """Whether the product of ``x`` [T, in_features] runs as int8-dot decode kernels (``from_int8``
        applies): the kernels run for x, T is a decode size, ``reads_int8``, and the decode-batch GEMM does
        not take it (``forward`` tries that first)."""
        return (uses_kernels(self.backend, x) and _gemv_applies(x.shape[0]) and self.reads_int8()
                and not self._small_batch(x, None))

    def from_int8(self, blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
        """The decode product of activations already rounded to int8 blocks (``quantize_activation``'s
        (codes [T, in], dx, sums), e.g. from a fused SwiGLU): [T, out_features] in ``dtype``."""
        if not self.reads_int8():
            raise ValueError(f"from_int8 needs every format on the int8-dot path, got "
                             f"{[fmt for _, fmt, _, _ in self.groups]}")
        return self._int8_products(None, blocks, dtype, residual)

    def _int8_products(self, x: torch.Tensor | None, blocks: tuple | None, dtype: torch.dtype,
                       residual: torch.Tensor | None) -> torch.Tensor:
        """Every run's int8-dot product written into its columns of one output (no concatenation), the
        bias and ``residual`` added in the same launches."""
        from glmtg.kernels.gguf.mmvq import mmvq

        t = (x if x is not None else blocks[0]).shape[0]
        device = getattr(self, self.groups[0][0]).device
        out = torch.empty(t, self.out_features, dtype=dtype, device=device)
        if x is None:  # mmvq takes x for its shape and dtype; the values come from ``blocks``
            x = torch.empty(t, self.in_features, dtype=dtype, device=device)
        for attr, fmt, start, stop in self.groups:
            mmvq(x, getattr(self, attr), fmt, out=out[:, start:stop], quantized=blocks,
                 bias=None if self.bias is None else self.bias[start:stop],
                 residual=None if residual is None else residual[:, start:stop])
        return out


def _gemv_applies(tokens: int) -> bool:
    from glmtg.kernels.gguf.gemv import GEMV_MAX_TOKENS

    return tokens <= GEMV_MAX_TOKENS


def _product(x: torch.Tensor, weight: torch.Tensor, fmt: str, *, kernel: bool, gemv: bool,
             dot: str = "auto") -> torch.Tensor:
    """x [T, K] @ dequantized(weight [N, row_bytes])ᵀ -> [T, N] in x's dtype."""
    if gemv and has_device_decoder(fmt):
        from glmtg.kernels.gguf.dispatch import matvec

        return matvec(x.contiguous(), weight, fmt, path=dot)
    # A float copy of this one projection only, freed once the product is done.
    return F.linear(x, dequantize(weight, fmt, x.dtype, kernel=kernel))


class QuantEmbedding(nn.Module):
    """Token embedding with its table in GGUF blocks (``weight`` uint8 [num_embeddings, row_bytes]): the rows
    of the ids are gathered raw and only those are dequantized, to ``dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, format: str, dtype: torch.dtype,
                 backend: str = "auto") -> None:
        super().__init__()
        for what, n in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{what} must be a positive int, got {n!r}")
        self.format = check_format(format, embedding_dim, "format")
        self.backend = check_backend(backend)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        row_bytes = REGISTRY[format].blocks_bytes(embedding_dim)
        self.weight = nn.Parameter(torch.empty(num_embeddings, row_bytes, dtype=torch.uint8), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (integer, any shape) -> [*ids.shape, embedding_dim] in ``dtype``."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be int32 or int64, got {ids.dtype}")
        rows = self.weight.index_select(0, ids.reshape(-1))  # [N, row_bytes], a fresh (aligned) tensor
        values = dequantize(rows, self.format, self.dtype, kernel=uses_kernels(self.backend, rows))
        return values.view(*ids.shape, self.embedding_dim)
