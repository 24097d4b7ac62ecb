"""-sm graph over llama.cpp's quantization mixes (``weight_formats_for``: Q4_0, Q4_K_M) on CPU: 2 and 4 gloo
ranks give the single-process logits, the routed experts split along their width.

The config has K-quant-sized widths (hidden 256, 4 KV heads of 16 query heads: o_proj's 4 x 64 = 256 input
features a rank over 4 ranks); Q4_K_M gives the experts' down q6_k, whose 256-value blocks cut the 768-wide
inner width unevenly (3 blocks: 2,1 over 2 ranks; 1,1,1,0 over 4, the last holding a block of zeros), and
the dense down q4_k (512: 1,1,0,0). Q4_0 cuts the same width into 24 blocks of 32. The parent draws the
model and its logits once and hands both to the ranks (shared memory), each rank builds and fills its part
(``load_from_full``) and runs a prefill and two decode steps. The CPU runs the torch path (each rank
dequantizes its blocks, bitwise the whole tensor's values at those places).

Tolerance: as tests/parallel/test_tp_quant_gloo.py: the same float32 products summed in another order, 2e-5
of the largest logit; a mis-cut block moves logits by > 1e-3.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.formats.mix import weight_formats_for
from glmtg.parallel import TPGroup, build_tp_model, load_from_full, local_kv_heads
from tests.references.gloo import assert_rank_logits, prefill_then_decode, spawn_ranks
from tests.references.quant_tp import random_quant_model

REL_TOL = 2e-5
BATCH, PROMPT, DECODE_STEPS = 1, 4, 2
CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), hidden_size=256, num_attention_heads=16,
                             num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=768,
                             num_hidden_layers=2, vocab_size=256)


def _worker(tp: TPGroup, file_type: str, split: str, full, ids: torch.Tensor, ref: list) -> None:
    torch.set_num_threads(1)  # N processes share the machine's cores
    formats = weight_formats_for(file_type, CONFIG)
    model = load_from_full(build_tp_model(CONFIG, tp, torch.float32, weight_formats=formats,
                                          experts_split=split), full)
    experts = model.layers[1].mlp.experts
    if split == "width":  # the cut is real: this rank's blocks of down's format, at least one
        block = 256 if file_type == "Q4_K_M" else 32
        n = 768 // block
        assert experts.gate_proj.shape[:2] == (CONFIG.n_routed_experts,
                                               block * max(n // tp.world_size + (tp.rank < n % tp.world_size), 1))
    got = prefill_then_decode(model, CONFIG, CONFIG.num_hidden_layers, ids, PROMPT,
                              kv_heads=local_kv_heads(CONFIG, tp))
    assert_rank_logits(got, ref, REL_TOL, tp.rank, tp.world_size)


# Each case starts its ranks (~8 s on a loaded 2-core machine): the uneven K-quant cut over 4 ranks with a
# zero-block rank, and the 32-value cut over 2; the expert split over these mixes shares every code path with
# tests/parallel/test_tp_quant_gloo.py's.
@pytest.mark.parametrize("file_type, world, split", [("Q4_K_M", 4, "width"), ("Q4_0", 2, "width")])
def test_mix_tp_matches_single_process(file_type: str, world: int, split: str) -> None:
    full = random_quant_model(CONFIG, weight_formats=weight_formats_for(file_type, CONFIG))
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(3))
    ref = prefill_then_decode(full, CONFIG, CONFIG.num_hidden_layers, ids, PROMPT)
    spawn_ranks(_worker, world, (file_type, split, full, ids, ref))
