"""Tensor parallelism (-sm graph) over GGUF blocks on CPU: 2 and 4 gloo processes give the single-process
logits of the same quantized model.

Every rank draws the same seeded model in a q8_0 / q4_0 / q5_0 mix (tests/references/quant_tp.py: q, k, v in
three formats; inner widths 224 and 160, 7 and 5 blocks of 32, so every inner width splits unevenly over 2
and 4 ranks), computes the whole model's logits itself, builds its part with
``build_tp_model(weight_formats=...)``, fills it with ``load_from_full`` (raw blocks through load_tensor) and
runs a prefill and three decode steps over its own KV cache (Hkv/N heads); the routed experts split along
their width (96 = 3 blocks of 32: uneven, and over 4 ranks the last holds none) or by expert. The CPU runs the torch path: each
rank dequantizes its blocks to float32, which are bit for bit the whole tensor's values at those places.

Tolerance: as tests/parallel/test_tp_gloo.py: the same float32 products summed in another order (o_proj's,
down's and the experts' partial sums added by gloo's all-reduce), a few float32 ulps per op; 2e-5 of the
largest logit. A mis-cut block (a byte slice off by one block or one row) moves logits by > 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.parallel import TPGroup, build_tp_model, load_from_full, local_kv_heads
from tests.references.quant_tp import CONFIG, mix_formats, random_quant_model
from tests.references.gloo import assert_rank_logits, prefill_then_decode, spawn_ranks

REL_TOL = 2e-5
BATCH, PROMPT, DECODE_STEPS = 2, 5, 3


def _run(model, kv_heads: int, ids: torch.Tensor) -> list[torch.Tensor]:
    return prefill_then_decode(model, CONFIG, CONFIG.num_hidden_layers, ids, PROMPT, kv_heads=kv_heads)


def _worker(tp: TPGroup, split: str) -> None:
    torch.set_num_threads(1)  # N processes share the machine's cores
    full = random_quant_model()
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(1))
    ref = _run(full, CONFIG.num_key_value_heads, ids)
    model = load_from_full(build_tp_model(CONFIG, tp, torch.float32, weight_formats=mix_formats(),
                                          experts_split=split), full)
    del full
    # the split is real: uneven inner widths give rank r its own number of blocks
    down = model.layers[0].mlp.down_proj
    blocks = 7 // tp.world_size + (tp.rank < 7 % tp.world_size)
    assert down.in_features == 32 * blocks and down.weight.shape[1] == 34 * blocks  # q8_0: 34 bytes a block
    experts = model.layers[1].mlp.experts
    if split == "expert":
        assert experts.gate_proj.shape[0] == CONFIG.n_routed_experts // tp.world_size
    else:  # every expert, 3 blocks of 32 of its width cut 2,1 / 1,1,1,0 (the zero-block rank holds one block)
        held = 3 // tp.world_size + (tp.rank < 3 % tp.world_size)
        assert experts.gate_proj.shape[:2] == (CONFIG.n_routed_experts, 32 * max(held, 1))
        assert experts.down_proj.shape[2] == 22 * max(held, 1)  # q5_0: 22 bytes a block
    got = _run(model, local_kv_heads(CONFIG, tp), ids)
    assert_rank_logits(got, ref, REL_TOL, tp.rank, tp.world_size)


@pytest.mark.parametrize("split", ["width", "expert"])
@pytest.mark.parametrize("world", [2, 4])
def test_quant_tp_matches_single_process(world: int, split: str) -> None:
    spawn_ranks(_worker, world, (split,))
