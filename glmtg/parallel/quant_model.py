"""One tensor-parallel rank of a GLM4-MoE model whose weights are GGUF blocks (``build_tp_model`` with
``weight_formats``).

The whole model is built on the meta device with its formats (``Glm4MoeForCausalLM(weight_formats=...)``),
then each layer's matrices are swapped for their rank's part, quantized ones for the block-aware linears of
glmtg/parallel/quant_linear.py and float ones (a file may keep a matrix in F16/F32) for the float ones:

- attention: q/k/v rows by whole KV-head groups (rank r: KV heads [r*Hkv/N, (r+1)*Hkv/N) and their query
  heads), o_proj columns to match; ValueError naming o_proj when its format's blocks do not tile a rank's
  Hq/N x head_dim input features.
- dense MLP and shared expert: the inner width cut into whole blocks of down_proj's format
  (``partition_columns``: counts differing by at most one block, so uneven widths such as Air's 10944 = 342
  blocks of 32 over 4 ranks work), gate/up rows by the same cut. A width with fewer blocks than ranks (the
  tiny preset's shared expert: one block of 32) leaves the last ranks a zero block (exactly 0, see
  ``QuantRowParallelLinear``). A float down_proj (or gate/up) keeps the float TP's even split.
- routed experts: along their inner width (whole blocks of down's format, glmtg/parallel/experts.py) or by
  expert (``ExpertPlacement.split``), as ``experts_split`` says, in their formats.
- lm_head: split by vocabulary rows (glmtg/parallel/vocab.py).
- replicated: embedding, norms, router.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from glmtg.config import ModelConfig
from glmtg.formats import REGISTRY
from glmtg.layers.linear import Linear
from glmtg.layers.mlp import MLP
from glmtg.layers.moe import MoE
from glmtg.layers.quant_experts import QuantExperts
from glmtg.layers.quant_linear import QuantLinear
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from glmtg.parallel.experts import expert_range, width_experts
from glmtg.parallel.group import TPGroup
from glmtg.parallel.vocab import vocab_parallel_head
from glmtg.parallel.linear import ColumnParallelLinear, RowParallelLinear
from glmtg.parallel.quant_linear import (
    QuantColumnParallelLinear,
    QuantRowParallelLinear,
    partition_columns,
)

if TYPE_CHECKING:
    from glmtg.models.glm4_moe import WeightFormats


def build_quant_tp_model(config: ModelConfig, tp: TPGroup, dtype: torch.dtype, experts_backend: str,
                         weight_formats: WeightFormats, kv_local: int, experts_split: str) -> Glm4MoeForCausalLM:
    """Rank ``tp.rank``'s part of the model ``weight_formats`` describes, on the meta device (module
    docstring). Its ``tensor_slots`` list the whole model's shapes and formats (stacked experts: whole, or
    this rank's range with ``experts_split="expert"``), so the same loaders fill it through ``load_tensor``."""
    from glmtg.parallel.model import ParallelMoE  # model.py imports this module

    model = Glm4MoeForCausalLM(config, dtype=dtype, device="meta", experts_backend=experts_backend,
                               weight_formats=weight_formats)
    heads_per_kv = config.num_attention_heads // config.num_key_value_heads
    d = config.head_dim
    kv_heads = slice(tp.rank * kv_local, (tp.rank + 1) * kv_local)
    q_rows = slice(kv_heads.start * heads_per_kv * d, kv_heads.stop * heads_per_kv * d)
    kv_rows = slice(kv_heads.start * d, kv_heads.stop * d)
    with torch.device("meta"):
        for i, layer in enumerate(model.layers):
            attn = layer.attn
            attn.qkv = _column(attn.qkv, {"q": q_rows, "k": kv_rows, "v": kv_rows}, dtype, tp, experts_backend)
            attn.o_proj = _row(attn.o_proj, q_rows, dtype, tp, experts_backend, reduce=True,
                               what=f"layers.{i}.attn.o_proj")
            attn.num_heads = config.num_attention_heads // tp.world_size
            attn.num_kv_heads = kv_local
            if isinstance(layer.mlp, MoE):
                whole = layer.mlp
                shared = (None if whole.shared is None else
                          _parallel_mlp(whole.shared, dtype, tp, experts_backend, False, f"layers.{i}.mlp.shared"))
                experts = None  # float experts: ParallelMoE builds them
                if isinstance(whole.experts, QuantExperts):
                    formats, backend = whole.experts.formats, whole.experts.backend
                    experts = (width_experts(config, dtype, tp, formats, backend) if experts_split == "width" else
                               QuantExperts(config, dtype, formats, placement=expert_range(config, tp),
                                            backend=backend))
                layer.mlp = ParallelMoE(config, dtype, tp, experts_backend, experts=experts, shared=shared,
                                        experts_split=experts_split)
            else:
                layer.mlp = _parallel_mlp(layer.mlp, dtype, tp, experts_backend, True, f"layers.{i}.mlp")
        model.lm_head = vocab_parallel_head(model.lm_head, config, tp, dtype, experts_backend)
    return model.requires_grad_(False)


def _column(linear: Linear, cuts: dict[str | None, slice], dtype: torch.dtype, tp: TPGroup,
            backend: str) -> Linear:
    """``linear``'s column-parallel part: rows ``cuts`` of each shard (blocks as they are, or floats)."""
    if isinstance(linear, QuantLinear):
        return QuantColumnParallelLinear(linear.in_features, linear.shards, cuts=cuts, bias=linear.has_bias,
                                         formats=linear.formats, dtype=dtype, tp=tp, backend=backend)
    for name, rows in linear.shards:  # the float TP cuts every shard evenly: it must be this cut
        if tp.part(rows, f"rows of shard {name!r}") != cuts[name]:
            raise ValueError(f"float shard {name!r} can only be split evenly over {tp.world_size} ranks")
    return ColumnParallelLinear(linear.in_features, linear.shards, bias=linear.has_bias, dtype=dtype, tp=tp)


def _row(linear: Linear, cols: slice, dtype: torch.dtype, tp: TPGroup, backend: str, *, reduce: bool,
         what: str) -> Linear:
    """``linear``'s row-parallel part: input features ``cols`` (ValueError naming ``what`` unless they are
    whole blocks of its format)."""
    if isinstance(linear, QuantLinear):
        for fmt in linear.formats.values():
            bs = REGISTRY[fmt].block_size
            if cols.start % bs or cols.stop % bs:
                raise ValueError(f"{what} is {fmt}, whose blocks of {bs} values do not tile a rank's "
                                 f"{cols.stop - cols.start} input features over {tp.world_size} ranks")
        out = linear.out_features if tuple(linear.formats) == (None,) else linear.shards
        return QuantRowParallelLinear(linear.in_features, out, cols=cols, bias=linear.has_bias,
                                      formats=linear.formats, dtype=dtype, tp=tp, backend=backend, reduce=reduce)
    if tp.part(linear.in_features, f"{what} in_features") != cols:
        raise ValueError(f"float {what} can only be split evenly over {tp.world_size} ranks")
    return RowParallelLinear(linear.in_features, linear.out_features, bias=linear.has_bias, dtype=dtype, tp=tp,
                             reduce=reduce)


def _parallel_mlp(mlp: MLP, dtype: torch.dtype, tp: TPGroup, backend: str, reduce: bool, what: str) -> MLP:
    """``mlp`` (the whole one, on meta) with gate/up column-parallel and down row-parallel over one cut of
    the inner width: whole blocks of down's format (an even split when down is float)."""
    gate_up, down = mlp.gate_up, mlp.down_proj
    width = down.in_features
    if isinstance(down, QuantLinear):
        block = REGISTRY[down.formats[None]].block_size
        cols = partition_columns(width, block, tp, f"{what} inner width")
    else:
        cols = tp.part(width, f"{what} inner width")
    # A rank with no block of the width (fewer blocks than ranks) keeps the first block's gate/up rows
    # against down columns of zeros: its partial sum is exactly 0 (QuantRowParallelLinear).
    rows = cols if cols.stop > cols.start else slice(0, block)
    mlp.gate_up = _column(gate_up, {"gate": rows, "up": rows}, dtype, tp, backend)
    mlp.down_proj = _row(down, cols, dtype, tp, backend, reduce=reduce, what=f"{what}.down_proj")
    mlp.down_proj.parity = 1  # the layer's second sum (after o_proj's)
    return mlp

