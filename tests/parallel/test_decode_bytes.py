"""Weight bytes one decode token reads, for the parts a split model gives each rank (``decode_weight_bytes``:
the roofline of sweep-bench's bandwidth line). Built on the meta device, no process group: only shapes count.

- ``-sm layer``: the stages' counts add up to the whole model's exactly (each parameter lives in one stage;
  the embedding table is read one row a token, the head whole).
- ``-sm graph``: each rank holds E/N of a layer's routed experts and reads k/N of them a token on average
  (by expert), or 1/N of every expert's width and reads k experts x 1/N (width), so the ranks' expert bytes
  add up to the whole model's k experts a layer; with uneven block cuts each rank's own share.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.layers.moe import Experts
from glmtg.layers.quant_experts import QuantExperts
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from glmtg.parallel import LayerSplitModel, TPGroup, build_tp_model, layer_ranges
from tests.references.model import tiny

CONFIG = tiny(num_hidden_layers=3, first_k_dense_replace=1)


@pytest.mark.parametrize("ratios", [[1.0, 1.0], [1.0, 2.0, 1.0]])
def test_layer_stages_add_up_to_the_whole_model(ratios):
    whole = Glm4MoeForCausalLM(CONFIG, dtype=torch.float32, device="meta").decode_weight_bytes()
    ranges = layer_ranges(CONFIG.num_hidden_layers, ratios)
    parts = [LayerSplitModel(CONFIG, TPGroup(r, len(ratios)), ranges[r], torch.float32).decode_weight_bytes()
             for r in range(len(ratios))]
    assert all(p > 0 for p in parts) and sum(parts) == whole


def _stack_bytes(model: torch.nn.Module) -> int:
    """Bytes of the routed experts' stacks the model holds."""
    return sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, Experts)
               for p in m.parameters(recurse=False))


@pytest.mark.parametrize("split", ["expert", "width"])
def test_tensor_parallel_ranks_read_their_share_of_the_experts(split):
    whole = Glm4MoeForCausalLM(CONFIG, dtype=torch.float32, device="meta")
    k, e, world = CONFIG.num_experts_per_tok, CONFIG.n_routed_experts, 2
    for r in range(world):
        rank = build_tp_model(CONFIG, TPGroup(r, world), torch.float32, experts_split=split)
        held = _stack_bytes(rank)
        assert held * world == _stack_bytes(whole)  # E/N experts of every layer, or 1/N of every expert
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in rank.parameters()}.values())
        table = rank.embed.weight
        one_row_read = table.numel() * table.element_size() - table[0].numel() * table.element_size()
        # everything but the stacks, one embedding row, and k/N experts a layer (held · k / E)
        assert rank.decode_weight_bytes() == params - held + held * k // e - one_row_read
        assert held * k // e * world == _stack_bytes(whole) * k // e  # the ranks' shares add up to k experts



def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())


@pytest.mark.parametrize("world", [2, 4])
def test_width_split_gguf_ranks_read_k_experts_at_their_width(world):
    """GGUF blocks cut unevenly (tests/references/quant_tp.py: the experts' 96 = 3 blocks of 32, q4_0 gate/up
    and q5_0 down): a rank reads, a token and a layer, k experts' gate/up rows and down blocks of its own cut
    (a rank with no block of the width holds, and reads, one block); over 2 ranks (2 + 1 blocks) the ranks'
    expert reads add up to the whole model's k experts exactly."""
    from glmtg.formats import REGISTRY
    from tests.references.quant_tp import CONFIG as QCONFIG
    from tests.references.quant_tp import mix_formats

    k, h, e = QCONFIG.num_experts_per_tok, QCONFIG.hidden_size, QCONFIG.n_routed_experts
    moe_layers = QCONFIG.num_hidden_layers - QCONFIG.first_k_dense_replace
    gate_row, down_block = REGISTRY["q4_0"].blocks_bytes(h), REGISTRY["q5_0"].type_size
    expert_reads = []
    for r in range(world):
        rank = build_tp_model(QCONFIG, TPGroup(r, world), torch.float32, weight_formats=mix_formats(),
                              experts_split="width")
        blocks = max(3 // world + (r < 3 % world), 1)
        one_expert = 2 * 32 * blocks * gate_row + h * blocks * down_block  # gate + up rows, down's blocks
        stacks = _bytes(p for m in rank.modules() if isinstance(m, QuantExperts) for p in m.parameters(False))
        assert stacks == moe_layers * e * one_expert
        table = rank.embed.weight
        rest = _bytes(rank.parameters()) - stacks - (table.numel() - table[0].numel()) * table.element_size()
        expert_reads.append(moe_layers * k * one_expert)
        assert rank.decode_weight_bytes() == rest + expert_reads[-1]
    if world == 2:
        whole = Glm4MoeForCausalLM(QCONFIG, dtype=torch.float32, device="meta", weight_formats=mix_formats())
        stacks = _bytes(p for m in whole.modules() if isinstance(m, QuantExperts) for p in m.parameters(False))
        assert sum(expert_reads) == stacks * k // e
