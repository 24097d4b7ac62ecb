"""Weight bytes one decode token reads, for the parts a split model gives each rank (``decode_weight_bytes``:
the roofline of sweep-bench's bandwidth line). Built on the meta device, no process group: only shapes count.

- ``-sm layer``: the stages' counts add up to the whole model's exactly (each parameter lives in one stage;
  the embedding table is read one row a token, the head whole).
- ``-sm graph``: each rank holds E/N of a layer's routed experts and reads k/N of them a token on average, so
  the ranks' expert bytes add up to the whole model's k experts a layer.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.layers.moe import Experts
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


def test_tensor_parallel_ranks_read_their_share_of_the_experts():
    whole = Glm4MoeForCausalLM(CONFIG, dtype=torch.float32, device="meta")
    k, e, world = CONFIG.num_experts_per_tok, CONFIG.n_routed_experts, 2
    for r in range(world):
        rank = build_tp_model(CONFIG, TPGroup(r, world), torch.float32)
        held = _stack_bytes(rank)
        assert held * world == _stack_bytes(whole)  # E/N experts of every layer
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in rank.parameters()}.values())
        table = rank.embed.weight
        one_row_read = table.numel() * table.element_size() - table[0].numel() * table.element_size()
        # everything but the stacks, one embedding row, and k/N experts a layer (held · k / E)
        assert rank.decode_weight_bytes() == params - held + held * k // e - one_row_read
        assert held * k // e * world == _stack_bytes(whole) * k // e  # the ranks' shares add up to k experts
