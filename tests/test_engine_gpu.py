"""CUDA-only engine checks: the graph-captured decode step gives the eager step's tokens."""

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.engine import Engine, EngineConfig
from glmtg.loading.presets import random_model
from glmtg.sampling import GREEDY, SamplingParams

pytestmark = pytest.mark.gpu
CFG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=0, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("params", [
    GREEDY,
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3),  # full-vocabulary sort
    SamplingParams(seed=5),  # llama.cpp defaults: top-k 40 candidates
], ids=["greedy", "full", "topk"])
@pytest.mark.parametrize("k_format", ["bf16", "q8_0"])
# a path that cannot be captured makes the engine warn and decode eagerly: the tokens must be right either way
@pytest.mark.filterwarnings("ignore:CUDA graph capture")
def test_graph_decode_matches_eager(model, params, k_format):
    prompt = torch.randint(0, CFG.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    graphed = Engine(model, CFG, EngineConfig(ctx_size=256, ubatch=16, k_format=k_format, use_cuda_graph=True))
    eager = Engine(model, CFG, EngineConfig(ctx_size=256, ubatch=16, k_format=k_format, use_cuda_graph=False))
    a = graphed.generate(prompt, 60, params, eos_token_ids=[])
    b = eager.generate(prompt, 60, params, eos_token_ids=[])
    assert a.tokens == b.tokens
    if k_format == "bf16":  # the glmtg kernel path has no host sync, so the capture must succeed
        assert graphed.uses_cuda_graph
    # a second request reuses the captured graph from a reset cache
    assert graphed.generate(prompt, 60, params, eos_token_ids=[]).tokens == a.tokens


def test_graph_replay_after_truncate(model):
    def five(engine):
        return [int(engine.decode_step(7)[0])] + [int(engine.decode_step()[0]) for _ in range(4)]

    e = Engine(model, CFG, EngineConfig(ctx_size=128, ubatch=32))
    e.prefill(list(range(40)))
    first = five(e)
    e.truncate(40)  # drop the 5 decoded tokens: the same steps must give the same tokens
    assert five(e) == first and e.lengths == [45]
    ref = Engine(model, CFG, EngineConfig(ctx_size=128, ubatch=32, use_cuda_graph=False))
    ref.prefill(list(range(40)))
    assert five(ref) == first


def test_kv_cache_larger_than_free_memory_is_refused(model):
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="GB but only"):
        Engine(model, CFG, EngineConfig(ctx_size=2 * 10**9))


def test_capture_that_syncs_on_the_host_warns_and_matches_eager(model, monkeypatch):
    """A real capture failure: a step that reads a device value on the host cannot be captured."""
    e = Engine(model, CFG, EngineConfig(ctx_size=64, ubatch=16, use_cuda_graph=True))
    ref = Engine(model, CFG, EngineConfig(ctx_size=64, ubatch=16, use_cuda_graph=False))
    step = e._step

    def syncing_step():
        int(e.cache.lengths[0])  # a host read: illegal while a CUDA stream is capturing
        step()

    monkeypatch.setattr(e, "_step", syncing_step)
    prompt = list(range(1, 20))
    with pytest.warns(RuntimeWarning, match="capture of the decode step failed"):
        a = e.generate(prompt, 8, GREEDY, eos_token_ids=[])
    assert not e.uses_cuda_graph
    assert a.tokens == ref.generate(prompt, 8, GREEDY, eos_token_ids=[]).tokens


def test_eager_decode_step_of_batch_32_reads_nothing_back(model):
    # 32 tokens x top-2 > 8 experts: the many-pairs MoE path; bf16 on Hopper takes the grouped matmul.
    # torch raises on any synchronizing call (a .item(), .tolist(), a device-to-host copy) in the steps.
    e = Engine(model, CFG, EngineConfig(ctx_size=64, ubatch=16, batch=32, use_cuda_graph=False))
    e.prefill(list(range(5)))
    e.decode_step()  # kernels compile and lazy initialisations happen outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            e.decode_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert e.lengths == [9] * 32
