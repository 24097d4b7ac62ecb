"""Engine on the tiny preset on the CPU: chunked prefill, decode, truncate, generate, checks.

Sizes are small on purpose: on a CPU the KV-append kernel runs in the Triton interpreter
(~50 ms per token), so each test feeds a few dozen tokens at most.
"""

import dataclasses
import warnings

import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.engine import Engine, EngineConfig, check_kv_fits, kv_cache_bytes
from glmtg.kv_cache import KVCache
from glmtg.loading.presets import random_model
from glmtg.sampling import GREEDY, SamplingParams

CFG = ModelConfig.preset("tiny")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton kernels need the interpreter on a CPU


@pytest.fixture(scope="module")
def model32():
    # fp32 weights: the chunked and one-token paths then agree to ~1e-6, far from any argmax tie
    return random_model(CFG, seed=0, dtype=torch.float32, device=DEVICE)


def make(model, **kw):
    kw.setdefault("ctx_size", 32)
    kw.setdefault("ubatch", 8)
    # the torch path reads the fp32 model's K/V in fp32 whatever the chunking (the glmtg kernel, used for
    # short chunks on CUDA, computes in the cache's bf16); test_engine_gpu.py covers the kernel + graphs
    kw.setdefault("attn_backend", "sdpa")
    kw.setdefault("use_cuda_graph", False)
    return Engine(model, CFG, EngineConfig(**kw))


def test_chunked_prefill_matches_one_chunk(model32):
    ids = torch.randint(0, CFG.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    parts = []
    e = make(model32, ubatch=6)
    last = e.prefill(ids, on_logits=lambda start, lg: parts.append((start, lg)))
    assert [s for s, _ in parts] == [0, 6, 12, 18] and e.lengths == [20]
    assert int(e.cache.lengths[0]) == 20
    chunked = torch.cat([lg for _, lg in parts], dim=1)
    whole = []
    make(model32, ubatch=32).prefill(ids, on_logits=lambda s, lg: whole.append(lg))
    # same math in another order of fp32 sums; K/V are stored as bf16 either way
    torch.testing.assert_close(chunked, whole[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, whole[0][:, -1], rtol=1e-4, atol=1e-4)


def test_decode_step_is_greedy_next_token_of_prefill(model32):
    ids = torch.randint(0, CFG.vocab_size, (12,), generator=torch.Generator().manual_seed(2))
    logits = []
    make(model32).prefill(ids, on_logits=lambda s, lg: logits.append(lg))
    want = torch.cat(logits, dim=1)[0].argmax(-1)  # [12]: the greedy next token after each prefix
    e = make(model32)
    e.prefill(ids[:8])
    for pos in range(8, 12):
        out = e.decode_step(ids[pos:pos + 1])  # feed the true token, read the greedy next one
        assert int(out[0]) == int(want[pos])
    assert e.lengths == [12]


def test_truncate_and_context_checks(model32):
    e = make(model32, ctx_size=16, ubatch=8)
    e.prefill(list(range(10)))
    e.truncate(4)
    assert e.lengths == [4] and int(e.cache.lengths[0]) == 4
    with pytest.raises(ValueError, match="truncate"):
        e.truncate(5)
    with pytest.raises(ValueError, match="exceed ctx_size 16"):
        e.prefill(list(range(13)))
    assert e.lengths == [4]  # nothing ran
    with pytest.raises(ValueError, match="exceed ctx_size 16"):
        e.generate([1, 2, 3], 14)
    assert e.lengths == [4]


def test_generate_greedy_streams_and_stops_at_eos(model32):
    e = make(model32)
    seen = []
    r = e.generate([5, 6, 7], 6, GREEDY, eos_token_ids=[], on_token=seen.append)
    assert seen == r.tokens and len(r.tokens) == 6 and r.stop_reason == "length"
    assert r.decode_steps == 5 and e.lengths == [3 + 5]
    # make a later greedy token an EOS: generation stops right there, EOS included
    k = next(i for i in range(1, 6) if r.tokens[i] not in r.tokens[:i]) if len(set(r.tokens)) > 1 else 0
    r2 = e.generate([5, 6, 7], 6, GREEDY, eos_token_ids=[r.tokens[k]])
    assert r2.tokens == r.tokens[:k + 1] and r2.stop_reason == "eos"


def test_generate_seeded_sampling_is_reproducible(model32):
    e = make(model32)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    a = e.generate([1, 2], 5, p, eos_token_ids=[])
    b = e.generate([1, 2], 5, p, eos_token_ids=[])
    assert a.tokens == b.tokens and a.seed == 7


def test_batch_of_two_matches_one_by_one(model32):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, CFG.vocab_size, (2, 6), generator=gen)
    e2 = make(model32, batch=2)
    e2.prefill(ids)
    both = e2.decode_step().clone()
    for b in range(2):
        e1 = make(model32)
        e1.prefill(ids[b])
        assert int(e1.decode_step()[0]) == int(both[b])


def test_settings_are_checked(model32):
    with pytest.raises(ValueError, match="ctx_size"):
        make(model32, ctx_size=0)
    with pytest.raises(ValueError, match="ubatch"):
        make(model32, ubatch=True)  # bool is no size
    with pytest.raises(ValueError, match="k_format"):
        make(model32, k_format="q5_0")
    with pytest.raises(ValueError, match="attn_backend"):
        make(model32, attn_backend="flash")
    with pytest.raises(ValueError, match="prefill_backend"):
        make(model32, prefill_backend="flash")
    with pytest.raises(ValueError, match="settings must be an EngineConfig"):
        Engine(model32, CFG, {"ctx_size": 32})
    assert make(model32, attn_backend="eager").settings.prefill_backend == "eager"
    assert make(model32, attn_backend="eager", prefill_backend="sdpa").settings.prefill_backend == "sdpa"
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="use_cuda_graph needs a CUDA device"):
            Engine(model32, CFG, EngineConfig(ctx_size=32, use_cuda_graph=True))
        # None (the default) means "when the device is CUDA"
        assert Engine(model32, CFG, EngineConfig(ctx_size=32)).settings.use_cuda_graph is False


def test_kv_bytes_and_memory_check(monkeypatch):
    need = kv_cache_bytes(CFG, 64, 1, "q8_0", "bf16")
    cache = KVCache(num_layers=CFG.num_hidden_layers, batch=1, capacity=64, num_kv_heads=CFG.num_key_value_heads,
                    head_dim=CFG.head_dim, k_format="q8_0", v_format="bf16")
    assert need == cache.nbytes
    big = ModelConfig.preset("glm-4.5-air")
    settings = EngineConfig(ctx_size=131072, k_format="bf16")
    # 46 layers x 2 (K, V) x 8 heads x 128 x 2 bytes x 131072 tokens = 24.70 GB
    assert kv_cache_bytes(big, 131072, 1, "bf16", "bf16") == 46 * 2 * 8 * 128 * 2 * 131072
    monkeypatch.setattr("glmtg.memory.available_bytes", lambda device: 30 * 10**9)
    check_kv_fits(big, settings, "cpu")
    monkeypatch.setattr("glmtg.memory.available_bytes", lambda device: 8 * 10**9)
    with pytest.raises(ValueError, match=r"ctx_size 131072 .*needs 24\.70 GB but only 8\.00 GB .*lower ctx_size"):
        check_kv_fits(big, settings, "cpu")


def test_kv_cache_beyond_host_memory_is_refused_before_allocation(model32):
    # the CPU gets the same up-front check as a GPU: one ValueError, not an allocator failure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ctx_size beyond max_position_embeddings
        with pytest.raises(ValueError, match=r"KV cache for ctx_size 1000000000 .* GB of host \(CPU\) memory"):
            Engine(model32, CFG, EngineConfig(ctx_size=10**9), device="cpu")


def test_context_beyond_trained_positions_warns_naming_the_parameter(model32):
    with pytest.warns(UserWarning, match="ctx_size 8192 exceeds the model's max_position_embeddings"):
        make(model32, ctx_size=8192)


def test_prefill_reports_progress_per_chunk(model32):
    seen = []
    make(model32, ubatch=4).prefill(list(range(10)), on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    seen.clear()
    make(model32, ubatch=4).generate([1, 2, 3, 4, 5], 2, on_prefill_progress=lambda d, t: seen.append(d))
    assert seen == [4, 5]


def test_failed_graph_capture_warns_with_the_cause_and_decodes_eagerly(model32, monkeypatch):
    ids = [3, 1, 4, 1, 5, 9]
    ref = make(model32)
    ref.prefill(ids)
    want = [int(ref.decode_step()[0]) for _ in range(3)]

    e = make(model32)
    # a CPU engine never captures; make this one try, with a capture that fails as a host sync would
    monkeypatch.setattr(e, "settings", dataclasses.replace(e.settings, use_cuda_graph=True))

    def fail(key):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(e, "_capture", fail)
    e.prefill(ids)
    with pytest.warns(RuntimeWarning, match=r"capture of the decode step failed \(RuntimeError: operation not "
                                            r"permitted when stream is capturing\); decoding eagerly"):
        got = [int(e.decode_step()[0])]
    assert not e.uses_cuda_graph  # the path change is visible, not silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per step
        got += [int(e.decode_step()[0]) for _ in range(2)]
    assert got == want


def test_default_ubatch_per_device(monkeypatch):
    from types import SimpleNamespace

    from glmtg.engine import default_ubatch

    assert default_ubatch("cpu", 4096) == 512
    assert default_ubatch("cpu", 300) == 300  # never above the context
    # a GPU: by its SM count (faked: the chunk is chosen from the properties alone)
    for sms, want in ((132, 4096), (108, 4096), (82, 2048)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, sms=sms: SimpleNamespace(
            multi_processor_count=sms))
        assert default_ubatch(torch.device("cuda", 0), 65536) == want
    assert default_ubatch(torch.device("cuda", 0), 1000) == 1000
