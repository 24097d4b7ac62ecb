"""Host-placed experts streamed to the GPU for prefill (glmtg.cpu.stream_experts) on CUDA: a tiny random-weight
GGUF model (tests/references/cpu_experts.CONFIG: MoE layers 1-3, q5_0 gate/up and q8_0 down experts) with
``--cpu-moe`` against the same file all on the GPU, over prefill chunks of 70-100 tokens with decode steps between them.

Tolerances (why):
- streamed prefill vs the all-GPU model: 1e-5 of max |logits|. The same moe_prefill kernel reads a byte copy
  of the same blocks with the same inputs, so the logits should agree bit for bit; the slack only covers any
  run-to-run freedom of fp32 reductions, far below a wrong expert, layer or stale buffer (errors of the
  size of an expert's output, > 1% of the logits: the CPU-path check below shows the scale).
- streamed vs the CPU expert kernel (``--host-prefill cpu``) and decode steps (CPU kernel) vs the all-GPU
  model: 2% of max |logits|, tests/cpu/test_host_experts.py's bound for the CPU kernel's int8 roundings of
  the activations (measured 0.36% there).
- a split layer (device part + streamed host part) vs the whole layer on the GPU: 1e-5 of max |out| (two
  fp32 partial sums of the same kernel's terms added once).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from glmtg.cpu import stream_experts
from glmtg.cpu.placement import HostPlacement
from glmtg.cpu.stream_experts import configure, settings
from glmtg.kernels.gguf import mmq_moe
from glmtg.loading.gguf_model import load_gguf_model
from tests.references.cpu_experts import CONFIG, mix, write_random_gguf
from tests.references.model import new_cache

pytestmark = pytest.mark.gpu

ALL_HOST = HostPlacement(frozenset({1, 2, 3}))
SPLIT = HostPlacement(frozenset({1, 2, 3}), {2: frozenset({0, 3, 4, 6})})


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-stream.gguf"
    write_random_gguf(out, CONFIG, mix)
    return out


@pytest.fixture
def calls(monkeypatch):
    """moe_prefill launches (the real kernel still runs)."""
    count = [0]
    real = mmq_moe.moe_prefill

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mmq_moe, "moe_prefill", counted)
    return count


def load(path, host=None):
    model, _ = load_gguf_model(path, device="cuda", dtype=torch.float32, progress=False, host_experts=host)
    return model


def _run(model, steps, seed: int = 3) -> list[torch.Tensor]:
    """Logits of each step (sequence, tokens) in order: two sequences, each with its own cache, so that a
    sequence's prefill chunks do not read the K/V of the other's decode steps (CPU-kernel roundings)."""
    gen = torch.Generator().manual_seed(seed)
    caches = {}
    out = []
    for seq, n in steps:
        cache = caches.setdefault(seq, new_cache(CONFIG, 1, sum(m for s, m in steps if s == seq), device="cuda"))
        ids = torch.randint(0, CONFIG.vocab_size, (1, n), generator=gen).cuda()
        out.append(model(ids, cache))
        cache.lengths += n
    torch.cuda.synchronize()
    return out


def _max_err(got, want) -> tuple[float, float]:
    return float((got - want).abs().max()), float(want.abs().max())


def test_streamed_prefill_equals_the_all_gpu_model(path, calls):
    device, host = load(path), load(path, ALL_HOST)
    # sequence a: prefill chunks streamed; b: decode-size steps on the CPU kernel between them (a's next layer
    # is staged meanwhile and must serve a's next chunk unchanged)
    steps = (("a", 100), ("b", 1), ("b", 1), ("a", 90), ("b", 1), ("a", 70))
    want = _run(device, steps)
    calls[0] = 0
    got = _run(host, steps)
    assert calls[0] == 9  # 3 MoE layers x 3 prefill chunks streamed; decode steps on the CPU kernel
    assert settings(host)["copies"] >= 9 and settings(host)["staging_bytes"] > 0
    for (seq, n), g, w in zip(steps, got, want):
        err, size = _max_err(g, w)
        assert torch.isfinite(g).all() and err <= (1e-5 if seq == "a" else 0.02) * size, (seq, n, err / size)
    # the CPU path of the same chunks: int8 roundings, a visible but bounded difference
    configure(host, "cpu")
    calls[0] = 0
    on_cpu = _run(host, steps)
    assert calls[0] == 0 and settings(host)["staging_bytes"] == 0
    err, size = _max_err(on_cpu[0], got[0])
    assert 1e-5 * size < err <= 0.02 * size


def test_threshold_and_split_layer(path, calls):
    host, device = load(path, SPLIT), load(path)
    configure(host, "gpu", 50)
    layer, whole = host.layers[2].mlp.experts, device.layers[2].mlp.experts
    gen = torch.Generator().manual_seed(8)
    for t, streamed in ((49, False), (50, True), (120, True)):
        x = (torch.randn(t, CONFIG.hidden_size, generator=gen) / 4).cuda()
        ids = torch.stack([torch.randperm(CONFIG.n_routed_experts, generator=gen)[:CONFIG.num_experts_per_tok]
                           for _ in range(t)]).cuda()
        w = (torch.rand(ids.shape, generator=gen) + 0.1).cuda()
        calls[0] = 0
        got = layer(x, ids, w)
        # device part (grouped GEMM at these sizes) + host part streamed or on the CPU
        assert calls[0] == 1 + streamed
        want = whole(x, ids, w)
        err, size = _max_err(got, want)
        assert err <= (1e-5 if streamed else 0.02) * size, (t, err / size)


def test_no_room_for_staging_falls_back_to_the_cpu(path, calls, monkeypatch):
    host = load(path, ALL_HOST)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        calls[0] = 0
        _run(host, (("a", 100), ("a", 100)))
    assert calls[0] == 0
    notes = [str(w.message) for w in seen if "staging buffers" in str(w.message)]
    assert len(notes) == 1 and "prefill runs them on the CPU" in notes[0]
    assert settings(host)["staging_bytes"] == 0 and stream_experts.MIN_TOKENS <= 100
