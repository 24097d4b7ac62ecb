"""A GGUF decode step gives the same logits, bit for bit, with programmatic dependent launch and without.

PDL (glmtg/kernels/pdl.py) changes only when each kernel starts, never its arithmetic: a kernel that read
its input before its wait would see the previous step's or a half-written tensor, and the logits would
move. Air shapes (hidden 4096, 96/8 heads, 128 experts top-8) with 2 layers (one dense, one MoE), Q4_0 and
Q4_K_M mixes (mmvq, mmvq_moe, the fused glue, decode attention with its merge), f16 and q8_0 caches, eager
and replayed from a CUDA graph; each check draws fresh tokens, so a replay that ignored them would differ.
Tolerance: none (torch.equal); the kernels are deterministic and run the same reductions in both modes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.kernels import pdl
from glmtg.kv_cache import KVCache
from glmtg.loading.presets import random_model

PROMPT = 37  # not a multiple of any tile


@pytest.mark.gpu
@pytest.mark.parametrize("file_type", ["Q4_0", "Q4_K_M"])
@pytest.mark.parametrize("cache_format", ["f16", "q8_0"])
def test_decode_step_equal_with_and_without_pdl(file_type, cache_format):
    if not pdl.enabled(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0 or later")
    config = dataclasses.replace(ModelConfig.preset("glm-4.5-air"), num_hidden_layers=2, first_k_dense_replace=1,
                                 vocab_size=2048, eos_token_ids=(2047,))
    model = random_model(config, seed=0, device="cuda", file_type=file_type)
    cache = KVCache(num_layers=2, batch=1, capacity=256, num_kv_heads=config.num_key_value_heads,
                    head_dim=config.head_dim, k_format=cache_format, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    model(torch.randint(0, config.vocab_size, (1, PROMPT), generator=g, device="cuda"), cache, attn_backend="glmtg")
    cache.lengths += PROMPT
    token = torch.empty((1, 1), dtype=torch.long, device="cuda")

    def step() -> torch.Tensor:
        return model(token, cache, attn_backend="glmtg", validate=False)

    results = {}
    for mode in ("off", "auto"):
        with pdl.mode(mode):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # compile this mode's kernels outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            runs = []
            for seed in (11, 12):
                token.copy_(torch.randint(0, config.vocab_size, (1, 1), device="cuda",
                                          generator=torch.Generator(device="cuda").manual_seed(seed)))
                eager = step().clone()
                graph.replay()
                runs.append((eager, out.clone()))
            results[mode] = runs
    for (e_off, r_off), (e_on, r_on) in zip(results["off"], results["auto"]):
        assert torch.isfinite(e_off).all()
        assert torch.equal(e_off, r_off), "graph replay differs from eager without PDL"
        assert torch.equal(e_on, e_off), "eager logits differ with PDL"
        assert torch.equal(r_on, r_off), "graph logits differ with PDL"
    assert not torch.equal(results["off"][0][0], results["off"][1][0]), "two tokens gave the same logits"
