"""CUDA checks of the host-node path (glmtg.cpu.host_node): host experts queued on the stream, captured in the
decode graph (tiny model in GGUF blocks, routed experts on the host: --cpu-moe, and split layers).

Tolerances (why):
- graph vs eager decode: bitwise. A replay runs the same kernels on the same inputs as the eager step, and the
  host node runs the same C function on the same bytes.
- host node vs the synchronous path (the kernel called from Python after blocking copies): bitwise at the
  layer; over the model 1e-5 of max |logits|, room only for a device kernel whose reduction order could
  differ between two runs (none is expected: the decode path's kernels are deterministic).
"""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch

import glmtg.cpu.host_experts as host_experts_module
import glmtg.cpu.split_experts as split_experts_module
from glmtg.cli import main
from glmtg.cpu.host_experts import HostExperts
from glmtg.cpu.host_node import node_available
from glmtg.cpu.placement import HostPlacement, resolve, rules_of
from glmtg.cpu.split_experts import SplitExperts
from glmtg.engine import Engine, EngineConfig, decode_graph_blocker
from glmtg.loading.gguf_model import gguf_tensor_bytes, load_gguf_model
from tests.references.cpu_experts import CONFIG, mix, write_random_gguf

pytestmark = pytest.mark.gpu

SPLIT = HostPlacement(frozenset({1, 2, 3}), {1: frozenset({5, 2}), 2: frozenset({0, 3, 4, 6}), 3: frozenset({6})})
PROMPT = [[(7 * i + 3) % CONFIG.vocab_size for i in range(21)], [(5 * i + 1) % CONFIG.vocab_size for i in range(21)]]
# forced decode inputs, different at every step: a replay must read the new step's activations
FORCED = [[(11 * s + 2) % CONFIG.vocab_size, (13 * s + 9) % CONFIG.vocab_size] for s in range(6)]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-host-node.gguf"
    write_random_gguf(out, CONFIG, mix)
    return out


def load(path, placement: str):
    host = SPLIT if placement == "split" else resolve(rules_of([("--cpu-moe", None)]), gguf_tensor_bytes(path))
    model, _ = load_gguf_model(path, device="cuda", dtype=torch.bfloat16, progress=False, host_experts=host)
    return model


@contextlib.contextmanager
def last_logits(model):
    """Yields a static fp32 [2, vocab] tensor that every forward of ``model`` overwrites with its last
    position's logits (a device copy, so it is captured with the decode step and refreshed by each replay)."""
    seen = torch.empty(2, CONFIG.vocab_size, device="cuda")

    def keep(module, args, out) -> None:  # returns None: the forward's output stays as it is
        seen.copy_(out[:, -1])

    hook = model.register_forward_hook(keep)
    try:
        yield seen
    finally:
        hook.remove()


def engine(model, graph: bool) -> Engine:
    e = Engine(model, CONFIG, EngineConfig(ctx_size=64, ubatch=16, batch=2, k_format="f16", use_cuda_graph=graph))
    e.prefill(PROMPT)
    return e


def decode_logits(model, graph: bool) -> tuple[bool, list[torch.Tensor]]:
    """(whether the engine captured its decode step, each forced step's fp32 logits [2, vocab])."""
    with last_logits(model) as seen:
        e = engine(model, graph)
        logits = []
        for tokens in FORCED:
            e.decode_step(tokens)
            logits.append(seen.clone())
    return e.uses_cuda_graph, logits


@pytest.mark.parametrize("placement", ["cpu-moe", "split"])
def test_graph_decode_with_host_nodes_matches_eager_and_the_sync_path(path, placement, monkeypatch):
    assert node_available()
    model = load(path, placement)
    kind = SplitExperts if placement == "split" else HostExperts
    assert isinstance(model.layers[2].mlp.experts, kind)
    assert decode_graph_blocker(model) is None
    captured, graphed = decode_logits(model, graph=True)
    assert captured  # the host nodes were captured: no fallback to eager
    _, eager = decode_logits(model, graph=False)
    for a, b in zip(graphed, eager):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    # every replay computed its own step (the pinned buffers are re-read), not the captured one's
    assert all(not torch.equal(a, b) for a, b in zip(graphed, graphed[1:]))
    # the synchronous path: blocking copies, the kernel called from Python (warns once per process)
    for module in (host_experts_module, split_experts_module):
        monkeypatch.setattr(module, "node_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, synced = decode_logits(model, graph=False)
    for a, b in zip(eager, synced):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_replay_reads_the_host_arena(path):
    """A captured graph reads the experts' blocks at replay time: zeroing them after the capture changes the
    replayed logits exactly as it changes the eager ones."""
    model = load(path, "cpu-moe")
    with last_logits(model) as seen:
        graphed = engine(model, graph=True)
        graphed.decode_step(FORCED[0])  # captures the graph, then replays it
        assert graphed.uses_cuda_graph
        before = seen.clone()
        model.layers[1].mlp.experts.arena.buffer.zero_()
        graphed.reset()
        graphed.prefill(PROMPT)  # eager, over the zeroed experts, as the reference engine's below
        graphed.decode_step(FORCED[0])  # the same step, replayed over zeroed experts
        replayed = seen.clone()
        engine(model, graph=False).decode_step(FORCED[0])
        assert torch.equal(replayed, seen) and not torch.equal(replayed, before)


@pytest.mark.parametrize("t", [1, 3, 4, 37])
def test_host_node_layer_is_bitwise_the_sync_path(path, t):
    """The layer's host-node result equals the kernel called from Python on the same inputs, for T sharing a
    staging set (3 and 4) and a prefill-sized one, called in turn (the staging is shared between layers)."""
    model = load(path, "cpu-moe")
    gen = torch.Generator().manual_seed(t)
    for layer in (1, 3, 2):
        experts = model.layers[layer].mlp.experts
        x = torch.randn(t, CONFIG.hidden_size, generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(CONFIG.n_routed_experts, generator=gen)[:CONFIG.num_experts_per_tok]
                           for _ in range(t)])
        w = torch.rand(t, CONFIG.num_experts_per_tok, generator=gen) + 0.1
        got = experts(x.cuda(), ids.cuda(), w.cuda())
        want = experts.host_sum(*experts.to_host(x, ids, w)).to(torch.bfloat16)
        assert got.is_cuda and got.dtype == torch.bfloat16
        assert want.abs().max() > 0 and torch.equal(got.cpu(), want)


def test_eager_step_with_host_nodes_reads_nothing_back(path):
    """No host sync in an eager decode step with host experts (torch raises on a synchronizing call)."""
    e = engine(load(path, "cpu-moe"), graph=False)
    e.decode_step()  # first calls: slot tables, staging, the kernel build
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            e.decode_step()  # the previous output as input: no host-to-device copy of tokens
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sweep_bench_cpu_moe_runs_with_cuda_graphs(tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = main(["sweep-bench", "--type", "Q8_0", "--device", "cuda", "--cpu-moe", "-c", "32", "-ub", "8", "-n", "4",
               "--no-progress", "-o", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    env = json.loads(out.read_text())["environment"]
    assert env["cuda_graph"] is True and env["host_expert_layers"]
    assert "cuda_graph = 1" in text.out
