"""Host-placed routed experts (glmtg.cpu.host_experts): a GGUF model loaded with a placement keeps those
stacks' blocks unchanged in one 64-byte-aligned host arena and runs them with the CPU expert kernel.

On this CPU-only machine the "GPU" is the CPU device, so the checks are: (1) the same file with and without
--cpu-moe gives close logits, (2) a host layer's experts against a float64 reference, (3) the engine turns
CUDA-graph decode off where host experts cannot run as CUDA host nodes.

Tolerances (why): the CPU kernel rounds its activations to int8 per 32 values (x, then silu(g)·u; the
mmvq path's rounding), which the CPU's device path (QuantExperts' float loop) does not. (2) reproduces
those roundings in the float64 reference (its docstring states the bound); (1) allows 2% of max |logits|
(the roundings move each expert's output by well under 1% of its size; measured 0.36% after 3 MoE layers),
and checks that zeroing the host experts moves the logits by far more than that.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import glmtg.engine as engine_module
from glmtg.cpu.host_experts import HostExperts, host_expert_layers
from glmtg.cpu.placement import resolve, rules_of
from glmtg.engine import Engine, EngineConfig, decode_graph_blocker
from glmtg.formats import quantize_blocks
from glmtg.layers.quant_experts import QuantExperts
from glmtg.loading.gguf_model import gguf_tensor_bytes, load_gguf_model
from glmtg.loading.gguf_writer import model_tensors, write_gguf
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from tests.references.cpu_experts import CONFIG, dequant_stack, mix, round_a, round_x
from tests.references.model import new_cache


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    model = Glm4MoeForCausalLM(CONFIG, dtype=torch.float32, device="meta", weight_formats=mix)
    gen = torch.Generator().manual_seed(0)
    for slot in list(model.tensor_slots()):
        base = 1.0 if slot.name.endswith("norm.weight") else 0.0
        value = base + torch.randn(slot.shape, generator=gen) * (0.01 if "bias" in slot.name else 0.08)
        value = quantize_blocks(value, slot.format) if slot.format else value.to(slot.dtype)
        model.load_tensor(slot.name, value, shard=slot.shard)
    out = tmp_path_factory.mktemp("gguf") / "tiny-hybrid.gguf"
    write_gguf(out, CONFIG, model_tensors(model))
    return out


def load(path, *flags, device="cpu"):
    host = resolve(rules_of(flags), gguf_tensor_bytes(path))
    model, _ = load_gguf_model(path, device=device, dtype=torch.float32, progress=False, host_experts=host)
    return model


def test_host_stacks_are_the_files_blocks_in_one_aligned_arena(path):
    device, host = load(path), load(path, ("--n-cpu-moe", 3))
    assert host_expert_layers(host) == [1, 2] and host_expert_layers(device) == []
    assert type(host.layers[3].mlp.experts) is QuantExperts
    arenas = {id(host.layers[i].mlp.experts.arena) for i in (1, 2)}
    assert len(arenas) == 1
    arena = host.layers[1].mlp.experts.arena
    lo, hi = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.buffer.numel()
    for i in (1, 2):
        got, want = host.layers[i].mlp.experts, device.layers[i].mlp.experts
        for p in ("gate_proj", "up_proj", "down_proj"):
            stack = getattr(got, p)
            assert stack.dtype == torch.uint8 and stack.device.type == "cpu"
            assert stack.data_ptr() % 64 == 0 and lo <= stack.data_ptr() < stack.data_ptr() + stack.numel() <= hi
            assert torch.equal(stack, getattr(want, p))  # blocks unchanged, no float copy


def test_cpu_moe_logits_match_the_device_path(path):
    device, host = load(path), load(path, ("--cpu-moe", None))
    assert host_expert_layers(host) == [1, 2, 3]
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    want = device(ids, new_cache(CONFIG, 2, 16))
    got = host(ids, new_cache(CONFIG, 2, 16))
    tol = 0.02 * float(want.abs().max())
    assert torch.isfinite(got).all() and float((got - want).abs().max()) <= tol
    # the host experts matter: without them (zero blocks: every expert outputs 0) the logits move by far more
    host.layers[1].mlp.experts.arena.buffer.zero_()
    assert float((host(ids, new_cache(CONFIG, 2, 16)) - want).abs().max()) > 10 * tol


def test_host_layer_against_float64_reference(path):
    """The host layer's output against float64 on the gguf package's dequantization, with the kernel's
    int8 roundings of x and silu(g)·u reproduced (the kernel's numerics are tested in test_cpu_moe.py; this
    checks that the layer hands it the right stacks, formats, ids, weights and activations).
    Tolerance per element: 1e-5 of Σ_s |w_s| Σ_i |down[h, i] · a_i| (fp32 sums and scales, measured
    well below), plus one int8 step of each intermediate value that sits at a rounding boundary."""
    experts = load(path, ("-ot", r"blk\.2\.ffn_(gate|up|down)_exps=CPU")).layers[2].mlp.experts
    assert isinstance(experts, HostExperts)
    gen = torch.Generator().manual_seed(7)
    t, k, h = 5, CONFIG.num_experts_per_tok, CONFIG.hidden_size
    x = torch.randn(t, h, generator=gen)
    ids = torch.stack([torch.randperm(CONFIG.n_routed_experts, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen) + 0.1
    got = experts(x, ids, w).double().numpy()

    fmt = experts.formats
    gate, up = dequant_stack(experts.gate_proj, fmt["gate_proj"]), dequant_stack(experts.up_proj, fmt["up_proj"])
    down = dequant_stack(experts.down_proj, fmt["down_proj"])
    xq, wd = round_x(x.numpy()), w.double().numpy()
    ref, bound = np.zeros((t, h)), np.zeros((t, h))
    for ti in range(t):
        for s in range(k):
            e = int(ids[ti, s])
            g, u = gate[e] @ xq[ti], up[e] @ xq[ti]
            aq, step = round_a(g / (1.0 + np.exp(-g)) * u)
            ref[ti] += wd[ti, s] * (down[e] @ aq)
            bound[ti] += wd[ti, s] * (1e-5 * (np.abs(down[e]) @ np.abs(aq)) + np.abs(down[e]) @ step)
    assert np.isfinite(got).all()
    assert (np.abs(got - ref) <= bound).all(), float((np.abs(got - ref) / bound).max())
    # the bound is far below a wrong expert, slot, weight or layout (errors of the size of ref itself)
    assert bound.max() < 1e-2 * np.abs(ref).max()


def test_engine_graph_rule_for_host_experts(path, monkeypatch):
    """Host experts block CUDA-graph decode only where they cannot run as CUDA host nodes (glmtg.cpu.host_node):
    then a one-line notice; the engine runs them eagerly on the CPU device either way."""
    host, device = load(path, ("--cpu-moe", None)), load(path)
    assert decode_graph_blocker(device) is None
    monkeypatch.setattr(engine_module, "node_available", lambda: True)
    assert decode_graph_blocker(host) is None
    monkeypatch.setattr(engine_module, "node_available", lambda: False)
    notice = decode_graph_blocker(host)
    assert notice.startswith("CUDA-graph decode is off: the routed experts of 3 layer(s) run on the CPU")
    assert "\n" not in notice
    engine = Engine(host, CONFIG, EngineConfig(ctx_size=32, ubatch=8, k_format="f16"))
    assert not engine.uses_cuda_graph
    engine.prefill([5, 6, 7])  # runs end to end on the host experts


@pytest.mark.gpu
def test_cuda_model_with_host_experts(path):
    """On CUDA the host experts are host nodes: the engine captures its decode step without a warning (the
    graph's results: tests/cpu/test_host_node_gpu.py)."""
    device, host = load(path, device="cuda"), load(path, ("--cpu-moe", None), device="cuda")
    assert host.layers[1].mlp.experts.arena.pinned and host.layers[1].mlp.experts.gate_proj.device.type == "cpu"
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3)).cuda()
    want = device(ids, new_cache(CONFIG, 2, 16, device="cuda"))
    got = host(ids, new_cache(CONFIG, 2, 16, device="cuda"))
    assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine = Engine(host, CONFIG, EngineConfig(ctx_size=32, ubatch=8, k_format="f16"))
    assert engine.uses_cuda_graph and decode_graph_blocker(host) is None
    assert [str(w.message) for w in seen] == []
