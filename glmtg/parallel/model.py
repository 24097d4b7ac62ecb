"""The GLM4-MoE model of one tensor-parallel rank (``-sm graph``), and its weights cut from whole tensors.

What each rank holds (N = world size):

- attention: Hq/N query and Hkv/N KV heads (rank r: KV heads [r*Hkv/N, (r+1)*Hkv/N) and the query heads that
  read them, whole GQA groups), so its KV cache holds Hkv/N heads (``local_kv_heads``); q/k/v (and their
  biases) column-parallel, o_proj row-parallel: one all-reduce.
- dense MLP: gate/up column-parallel along the intermediate width, down row-parallel: one all-reduce.
- MoE: routed experts split along their inner width (``experts_split="width"``: every rank holds all E
  experts, 1/N of each one's width) or by expert (``"expert"``: rank r holds a contiguous range,
  ``ExpertPlacement.split``), glmtg/parallel/experts.py; the shared expert along its intermediate width.
  Both add partial sums that one all-reduce per layer sums (``ParallelMoE``). By width is the default:
  faster at batch 1 on 4 GPUs (``DEFAULT_EXPERTS_SPLIT``, bench/DECISIONS.md K1).
- lm_head: split by vocabulary rows, the logits joined by one all-gather (glmtg/parallel/vocab.py).
- replicated on every rank: the embedding, the norms and the router.

So a layer costs two all-reduces of [B, S, hidden]. Quantized (GGUF block) weights, cut on block boundaries:
``build_tp_model(weight_formats=...)``, built by glmtg/parallel/quant_model.py.
"""

from __future__ import annotations

import torch
from torch import nn

from glmtg.config import ModelConfig
from glmtg.layers.linear import Linear
from glmtg.layers.mlp import MLP
from glmtg.layers.moe import Experts, MoE
from glmtg.layers.quant_experts import QuantExperts
from glmtg.models.glm4_moe import Glm4MoeForCausalLM, WeightFormats
from glmtg.parallel.experts import (
    DEFAULT_EXPERTS_SPLIT,
    check_experts_split,
    expert_range,
    width_experts,
)
from glmtg.parallel.group import TPGroup
from glmtg.parallel.linear import ColumnParallelLinear, RowParallelLinear
from glmtg.parallel.vocab import vocab_parallel_head


class ParallelMoE(MoE):
    """MoE whose routed experts and shared expert each give this rank's partial sum; one all-reduce adds
    them all (the routed experts' ranges and the shared expert's columns together)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TPGroup, experts_backend: str = "auto", *,
                 experts: nn.Module | None = None, shared: MLP | None = None,
                 experts_split: str = DEFAULT_EXPERTS_SPLIT) -> None:
        """``experts`` / ``shared``: this rank's routed experts and shared expert (down_proj not reducing)
        when built elsewhere (GGUF blocks: glmtg/parallel/quant_model.py); None builds the float ones, the
        routed experts split by ``experts_split`` ("width" or "expert", glmtg/parallel/experts.py)."""
        super().__init__(config, dtype, experts_backend)
        check_experts_split(experts_split)
        self.tp = tp
        if experts is None:
            experts = (width_experts(config, dtype, tp, None, experts_backend) if experts_split == "width" else
                       Experts(config, dtype, placement=expert_range(config, tp), backend=experts_backend))
        self.experts = experts
        if self.shared is not None:
            self.shared = shared if shared is not None else _parallel_mlp(self.shared, dtype, tp, reduce=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x), parity=1)  # the layer's second sum


def _parallel_mlp(mlp: MLP, dtype: torch.dtype, tp: TPGroup, reduce: bool) -> MLP:
    """``mlp`` with gate/up column-parallel and down row-parallel (summed across ranks with ``reduce``)."""
    gate_up, down = mlp.gate_up, mlp.down_proj
    mlp.gate_up = ColumnParallelLinear(gate_up.in_features, gate_up.shards, bias=gate_up.has_bias, dtype=dtype, tp=tp)
    mlp.down_proj = RowParallelLinear(down.in_features, down.out_features, bias=down.has_bias, dtype=dtype, tp=tp,
                                      reduce=reduce)
    mlp.down_proj.parity = 1  # the layer's second sum (after o_proj's)
    return mlp


def local_kv_heads(config: ModelConfig, tp: TPGroup) -> int:
    """The KV heads one rank's attention (and so its KV cache) holds: Hkv / N."""
    if config.num_key_value_heads % tp.world_size:
        raise ValueError(f"num_key_value_heads ({config.num_key_value_heads}) must be a multiple of the "
                         f"tensor-parallel size {tp.world_size}: attention is split by whole KV heads")
    return config.num_key_value_heads // tp.world_size


def build_tp_model(config: ModelConfig, tp: TPGroup, dtype: torch.dtype = torch.bfloat16,
                   experts_backend: str = "auto", weight_formats: WeightFormats | None = None,
                   experts_split: str = DEFAULT_EXPERTS_SPLIT) -> Glm4MoeForCausalLM:
    """Rank ``tp.rank``'s part of the model (module docstring), on the meta device: give it its weights with
    ``load_tensor`` (whole checkpoint tensors; each module keeps its part) or ``load_from_full``.

    Parameter names and ``tensor_slots`` (whole shapes; stacked experts: every expert at its whole width, or
    this rank's range with ``experts_split="expert"``) are the single-process model's, so the same loaders
    fill it. ValueError unless N divides Hkv (whole KV heads per rank) and the intermediate widths, and
    (``"expert"``) the expert count allows one expert per rank or (``"width"``, float) the experts' width
    one column per rank.

    ``weight_formats`` (``Glm4MoeForCausalLM``'s): the matrices it gives a format are GGUF blocks, split on
    block boundaries (glmtg/parallel/quant_model.py: uneven inner widths are cut into whole blocks, counts
    differing by at most one block); None builds the float model above.
    """
    kv_local = local_kv_heads(config, tp)
    check_experts_split(experts_split)
    if weight_formats is not None:
        from glmtg.parallel.quant_model import build_quant_tp_model

        return build_quant_tp_model(config, tp, dtype, experts_backend, weight_formats, kv_local, experts_split)
    if config.first_k_dense_replace:
        tp.part(config.intermediate_size, "intermediate_size")
    if config.n_shared_experts and config.first_k_dense_replace < config.num_hidden_layers:
        tp.part(config.moe_intermediate_size * config.n_shared_experts, "the shared expert's width "
                "(moe_intermediate_size x n_shared_experts)")
    model = Glm4MoeForCausalLM(config, dtype=dtype, device="meta", experts_backend=experts_backend)
    with torch.device("meta"):
        for layer in model.layers:
            attn = layer.attn
            qkv = attn.qkv
            attn.qkv = ColumnParallelLinear(qkv.in_features, qkv.shards, bias=qkv.has_bias, dtype=dtype, tp=tp)
            o = attn.o_proj
            attn.o_proj = RowParallelLinear(o.in_features, o.out_features, bias=o.has_bias, dtype=dtype, tp=tp)
            attn.num_heads = config.num_attention_heads // tp.world_size
            attn.num_kv_heads = kv_local
            if isinstance(layer.mlp, MoE):
                layer.mlp = ParallelMoE(config, dtype, tp, experts_backend, experts_split=experts_split)
            else:
                layer.mlp = _parallel_mlp(layer.mlp, dtype, tp, reduce=True)
        model.lm_head = vocab_parallel_head(model.lm_head, config, tp, dtype, experts_backend)
    return model.requires_grad_(False)


def load_from_full(model: Glm4MoeForCausalLM, full: Glm4MoeForCausalLM) -> Glm4MoeForCausalLM:
    """Fill ``model`` (a rank's part, from ``build_tp_model``) with the weights of the whole model ``full``
    through ``load_tensor``: every tensor whole, stacked experts one by one (each rank keeps its range, or
    its part of every expert's width).
    Quantized slots go as their raw blocks, so ``model`` must be built with the same ``weight_formats`` (a
    slot in another format or dtype: ValueError from ``load_tensor``). Returns ``model``. For random weights
    and tests: a rank then holds the whole model once while loading (a rank's tensors may stay views of
    ``full``'s)."""
    for slot, value in full.slot_tensors():
        module = full.get_submodule(slot.name.rpartition(".")[0])
        if isinstance(module, (Experts, QuantExperts)):
            for e in range(module.placement.start, module.placement.stop):
                model.load_tensor(slot.name, value[e - module.placement.start], expert=e)
        elif isinstance(module, Linear):
            model.load_tensor(slot.name, value, shard=slot.shard)
        else:
            model.load_tensor(slot.name, value)
    return model.eval()

