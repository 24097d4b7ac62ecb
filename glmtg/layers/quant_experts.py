"""Routed experts with their weights kept as GGUF blocks (raw uint8, as the file stores them).

Same interface as ``glmtg.layers.moe.Experts`` (load_expert, forward(x, ids, weights), placement, backend):

- few (token, expert) pairs on the kernel backend (decode), or any number while a CUDA graph is being
  captured: ``glmtg.kernels.gguf.moe.quant_moe_decode`` reads the chosen experts' blocks in place (gate and
  up with SiLU-multiply, down weighted and summed).
- a decode batch (glmtg/kernels/gguf/small_batch.py; only with ``GLMTG_SMALL_BATCH_EXPERTS=new``: it lost
  to the per-pair kernel on the H200, bench/DECISIONS.md J2), and more pairs on the kernel backend (prefill;
  the default on CUDA): ``glmtg.kernels.gguf.mmq_moe.moe_prefill``,
  pairs sorted by expert on the device and one grouped launch per projection, tiles of the blocks decoded
  into tensor-core dots; no host sync (capturable), no float copy of an expert, each present expert's
  bytes read once per m-tile of its pairs (small_batch's launches: 16 pairs a tile); with
  ``GLMTG_SMALL_BATCH_DOT=int8`` and q4_0 / q8_0 stacks, ``glmtg.kernels.gguf.moe_i8.moe_i8`` instead (the
  same grouping, int8 dots). The shared expert then runs as its own MLP (dense products of the batch).
- otherwise (CPU and the torch backend, ``gemm = "dequant"``, or gate and up in different formats): pairs
  sorted by expert and one loop over the experts that have pairs, each dequantizing its three matrices (a
  transient of one expert) for its products. It reads the per-expert counts on the host (one sync), so it
  is not for captured decode steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from glmtg.config import ModelConfig
from glmtg.formats import REGISTRY
from glmtg.layers import fused
from glmtg.layers.moe import ExpertPlacement, inner_width, write_expert
from glmtg.layers.quant_linear import (
    check_backend,
    check_format,
    check_gemm,
    dequantize,
    has_device_decoder,
    uses_kernels,
)

PARAMS = ("gate_proj", "up_proj", "down_proj")


class QuantExperts(nn.Module):
    """The routed experts a placement puts here, stacked, in GGUF blocks: gate/up uint8 [E', I, row bytes of
    H], down uint8 [E', H, row bytes of I]. ``formats`` gives each parameter's format; ``dtype`` is the
    activations' (the output's) dtype. ``inner``: the inner width I held (``Experts``'); the kernels take
    it from the tensors' shapes."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, formats: Mapping[str, str],
                 placement: ExpertPlacement | None = None, backend: str = "auto", *,
                 inner: int | None = None) -> None:
        super().__init__()
        placement = ExpertPlacement.of_layer(placement, config)
        if not isinstance(formats, Mapping) or set(formats) != set(PARAMS):
            raise ValueError(f"formats must map each of {PARAMS} to a format, got {formats!r}")
        self.placement = placement
        self.backend = check_backend(backend)
        # Which decode kernel reads the experts (glmtg/kernels/gguf/dispatch.py): "auto" = int8 dot products
        # where both formats have them, else float decode; "float" for checks against the float path.
        self.dot = "auto"
        # How many pairs run on the kernel backend (quant_linear.GEMMS): "auto" = the grouped dequantizing
        # GEMM where it reads the formats; "dequant" = the loop below (A/B checks).
        self.gemm = "auto"
        self.dtype = dtype
        self.top_k = config.num_experts_per_tok
        e, i, h = placement.count, inner_width(config, inner), config.hidden_size
        self.widths = {"gate_proj": h, "up_proj": h, "down_proj": i}  # values per row of each parameter
        self.formats: dict[str, str] = {}
        for param, (rows, width) in zip(PARAMS, ((i, h), (i, h), (h, i))):
            fmt = check_format(formats[param], width, f"formats[{param!r}]")
            self.formats[param] = fmt
            row_bytes = REGISTRY[fmt].blocks_bytes(width)
            setattr(self, param, nn.Parameter(torch.empty(e, rows, row_bytes, dtype=torch.uint8),
                                              requires_grad=False))

    def load_expert(self, param: str, expert: int | None, value: torch.Tensor) -> bool:
        """Write raw blocks of checkpoint expert ``expert`` (a layer-wide index, uint8 [rows, row_bytes]) of
        ``param``, or the whole stack for None. Returns False, storing nothing, for an expert that the
        placement puts elsewhere."""
        return write_expert(self, self.placement, param, expert, value)

    def slot_shape(self, param: str) -> tuple[int, ...]:
        """The checkpoint (logical) shape of stacked ``param`` (``tensor_slots``): [E', rows, values]."""
        return (*getattr(self, param).shape[:-1], self.widths[param])

    def shared_blocks(self, x: torch.Tensor, shared: nn.Module | None) -> tuple | None:
        """The raw (gate, up, down) blocks of ``shared`` (the MoE's shared-expert MLP) where this module's
        decode kernel can run it as one more slot for input ``x`` (``forward``'s ``shared``): the int8-dot
        kernel runs, the fused glue is on (``--glue off`` keeps the separate launches for A/B), all experts
        are held here (one device adds the shared expert), and the shared expert's formats and shapes are one
        routed expert's. Else None: the caller runs the shared expert itself."""
        from glmtg.layers.quant_linear import QuantLinear

        if shared is None or not (isinstance(getattr(shared, "gate_up", None), QuantLinear)
                                  and isinstance(getattr(shared, "down_proj", None), QuantLinear)):
            return None
        gu, down = shared.gate_up, shared.down_proj
        t = x.shape[0]
        # A biased down_proj (a tensor-parallel rank's holds its bias on rank 0 only) has no slot in the kernel.
        if not (fused.fuses(x) and self.placement.holds_all and self.reads_int8() and gu.bias is None
                and down.bias is None and self._kernel(x, t * self.top_k)):
            return None
        if (gu.formats.get("gate"), gu.formats.get("up"), down.formats.get(None)) != (
                self.formats["gate_proj"], self.formats["up_proj"], self.formats["down_proj"]):
            return None
        blocks = (gu.raw_shard("gate"), gu.raw_shard("up"), down.raw_shard(None))
        if any(tuple(b.shape) != tuple(getattr(self, p).shape[1:]) for b, p in zip(blocks, PARAMS)):
            return None
        return blocks

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                shared: tuple | None = None) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] (layer-wide expert ids) -> Σ_k weights * expert_k(x), [T, H] in x's
        dtype; slots routed to experts held elsewhere add nothing. ``shared``: ``shared_blocks``' result,
        whose expert is then added in the same launches (summed in fp32 with the routed terms)."""
        t, k = ids.shape
        kernel = self._kernel(x, t * k)
        if not self.placement.holds_all:
            ids = self.placement.local_ids(ids)  # -1 for experts held elsewhere
            # The kernel masks ids outside [0, held) itself; the loop skips them (id -1).
            weights = torch.where(ids >= 0, weights, 0.0)
        if kernel:
            from glmtg.kernels.gguf.dispatch import moe_decode

            return moe_decode(x, self.gate_proj, self.up_proj, self.down_proj, ids, weights,
                              self.formats["gate_proj"], self.formats["down_proj"], path=self.dot, shared=shared)
        if shared is not None:
            raise ValueError("shared: folded only by the decode kernel (use shared_blocks to ask)")
        if self._int8_batch(x):
            from glmtg.kernels.gguf.moe_i8 import moe_i8

            return moe_i8(x, self.gate_proj, self.up_proj, self.down_proj, ids, weights.float(),
                          self.formats["gate_proj"], self.formats["down_proj"])
        if self._grouped(x):
            from glmtg.kernels.gguf.mmq_moe import moe_prefill

            configs = self._small_configs(x)
            return moe_prefill(x, self.gate_proj, self.up_proj, self.down_proj, ids, weights.float(),
                               self.formats["gate_proj"], self.formats["down_proj"],
                               gate_up_config=configs[0], down_config=configs[1])
        return self._looped(x, ids, weights, uses_kernels(self.backend, x))

    def reads_int8(self) -> bool:
        """Whether the decode kernel reads int8-rounded activations (glmtg/kernels/gguf/dispatch.py)."""
        from glmtg.kernels.gguf.dispatch import uses_int8

        return uses_int8(self.dot, *self.formats.values())

    def _readable(self, x: torch.Tensor) -> bool:
        """The kernel backend runs for x, gate and up share a format and the Triton decoders read every
        format: the fused decode and the grouped GEMM both decode gate and up rows with one format."""
        return (uses_kernels(self.backend, x) and self.formats["gate_proj"] == self.formats["up_proj"]
                and all(has_device_decoder(f) for f in self.formats.values()))

    def _grouped(self, x: torch.Tensor) -> bool:
        """Whether many pairs take the grouped dequantizing GEMM (``gemm`` allowing it, x a dtype it takes)."""
        from glmtg.kernels.gguf.gemv import SUPPORTED_DTYPES

        return check_gemm(self.gemm) in ("auto", "mmq") and x.dtype in SUPPORTED_DTYPES and self._readable(x)

    def _small_batch(self, x: torch.Tensor) -> bool:
        """Whether x's tokens are a decode batch the grouped GEMM takes (small_batch.takes_experts) rather than the
        per-pair decode kernel."""
        from glmtg.kernels.gguf import small_batch

        return small_batch.takes_experts(x.shape[0], *self.formats.values()) and self._grouped(x)

    def _int8_batch(self, x: torch.Tensor) -> bool:
        """Whether a decode batch takes the int8-dot grouped kernels (moe_i8): ``_small_batch``, small_batch.DOT
        is "int8" and every format is one they read."""
        from glmtg.kernels.gguf import small_batch
        from glmtg.kernels.gguf.mmq_i8 import I8_FORMATS

        return (small_batch.DOT == "int8" and all(f in I8_FORMATS for f in self.formats.values())
                and self._small_batch(x))

    def _small_configs(self, x: torch.Tensor) -> tuple:
        """(gate+up, down) launches of the grouped GEMM: small_batch's for a decode batch (except fp32 x on
        a GPU, whose IEEE dot needs mmq's fp32 tiles), else (None, None): its defaults."""
        from glmtg.kernels.gguf import small_batch

        if not self._small_batch(x) or (x.is_cuda and x.dtype == torch.float32):
            return None, None
        return small_batch.moe_configs(REGISTRY[self.formats["gate_proj"]].block_size,
                                       REGISTRY[self.formats["down_proj"]].block_size, x.is_cuda)

    def _kernel(self, x: torch.Tensor, pairs: int) -> bool:
        # The fused kernel decodes gate and up rows with one format. A file that gives them different formats
        # (llama.cpp's mixes never do, a hand-made one might), or formats without a Triton decoder yet, takes
        # the torch loop instead: correct, but it reads the counts on the host, so such a model's decode steps
        # cannot be captured in a CUDA graph.
        if not self._readable(x) or self._small_batch(x):
            return False
        # Many pairs (a big decode batch) still take the kernel while a CUDA graph is being captured: it
        # reads an expert once per pair, but the loop's host read of the counts cannot be captured.
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        return pairs <= self.placement.count or capturing

    def _looped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, kernel: bool) -> torch.Tensor:
        """Pairs sorted by expert; each expert with pairs dequantizes its matrices (to x's dtype, through the
        Triton decoder where ``kernel``) and runs its pairs. Combined in fp32 (the weights are fp32 and the
        k terms of a token should round once)."""
        t, k = ids.shape
        flat = ids.reshape(-1)  # [P = T*k], pair p = token p // k, slot p % k
        keep = flat >= 0
        flat = torch.where(keep, flat, self.placement.count)  # pairs held elsewhere sort last, counted apart
        order = torch.argsort(flat, stable=True)
        xs = x[order // k]  # [P, H] grouped by expert
        ys = torch.zeros(xs.shape, dtype=torch.float32, device=x.device)
        counts = torch.bincount(flat, minlength=self.placement.count + 1).tolist()
        start = 0
        for e, c in enumerate(counts[:-1]):
            if c:
                gate, up, down = (dequantize(getattr(self, p)[e], self.formats[p], x.dtype, kernel=kernel)
                                  for p in PARAMS)
                seg = xs[start:start + c]
                ys[start:start + c] = ((F.silu(seg @ gate.T) * (seg @ up.T)) @ down.T).float()
                start += c
        y = torch.empty_like(ys).index_copy_(0, order, ys).view(t, k, -1)  # pairs elsewhere stay 0
        y = y * torch.where(keep.view(t, k), weights, 0.0)[..., None]
        return y.sum(1).to(x.dtype)
