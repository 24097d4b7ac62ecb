"""A batch-32 decode step of an Air-shaped model is captured in a CUDA graph, and replays equal eager runs.

Air shapes (hidden 4096, 96/8 heads of 128, 128 experts top-8, 1408 / 10944 intermediate) with 2 layers (one
dense, one MoE) and a 2048-token vocabulary; random bf16 weights. At batch 32, tokens x top-k = 256 > 128
experts, so the MoE runs its grouped path (torch._grouped_mm, offsets on the device); capture fails outright
if anything in the step reads the device from the host.

Tolerance: replay and eager launch the same kernels on the same inputs, so they agree to the bit unless
cuBLAS picks another algorithm under capture (bf16 rounding, < 1e-2 relative). A replay that ignored its
new inputs would differ by O(1): each check uses freshly drawn token ids.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.kv_cache import KVCache
from glmtg.layers.moe import grouped_mm_applies
from glmtg.loading.presets import random_model

BATCH, PROMPT = 32, 5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
def test_batch32_air_decode_step_captures_and_replays():
    config = dataclasses.replace(ModelConfig.preset("glm-4.5-air"), num_hidden_layers=2, first_k_dense_replace=1,
                                 vocab_size=2048, eos_token_ids=(2047,))
    model = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    experts = model.layers[1].mlp.experts
    x = torch.empty(BATCH, config.hidden_size, dtype=torch.bfloat16, device="cuda")
    assert BATCH * config.num_experts_per_tok > config.n_routed_experts
    assert grouped_mm_applies(x, experts.gate_proj, experts.down_proj), "Hopper bf16 must take torch._grouped_mm"

    cache = KVCache(num_layers=config.num_hidden_layers, batch=BATCH, capacity=64,
                    num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, k_format="bf16",
                    device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (BATCH, PROMPT), generator=g, device="cuda")
    model(prompt, cache, attn_backend="glmtg")
    cache.lengths += PROMPT
    # The step writes its K/V at cache.lengths without advancing it: every run below rewrites the same rows.
    step = torch.randint(0, config.vocab_size, (BATCH, 1), generator=g, device="cuda")

    def run() -> torch.Tensor:
        return model(step, cache, attn_backend="glmtg", validate=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the Triton kernels and warm cuBLAS outside the capture
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()

    previous = None
    for _ in range(3):
        step.copy_(torch.randint(0, config.vocab_size, step.shape, generator=g, device="cuda"))
        graph.replay()
        replayed = captured.clone()
        eager = model(step, cache, attn_backend="glmtg")  # validated eager run of the same step
        assert torch.isfinite(eager).all()
        assert relative(replayed, eager) < 1e-2
        if previous is not None:
            assert relative(replayed, previous) > 0.1, "the replay must read its new token ids"
        previous = replayed
