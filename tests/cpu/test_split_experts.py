"""A MoE layer split between the device and host memory (glmtg.cpu.split_experts, ``--gpu-experts``), and the
ExpertPlacement of a set of expert ids it rests on.

On this CPU-only machine the "device" is the CPU: the device part runs QuantExperts' torch loop (float
activations), the host part the CPU expert kernel (int8-rounded activations).

Tolerances (why): (1) split == the all-device layer on the device experts' pairs + the all-host layer on the
host experts' pairs: 1e-6 of the output's size (the same products, only the fp32 add of the two partial
sums differs from the one-place sums); (2) split against float64: per element the host pairs' bound of
tests/references/cpu_experts.host_pair (the kernel's roundings reproduced) plus 1e-5 of Σ|w · down · a| for
the device pairs (fp32 products on dequantized weights); (3) model logits within 2% of max |logits| of the
all-device model (the host part's int8 roundings: tests/cpu/test_host_experts.py measured 0.36%).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glmtg.cpu.host_experts import HostExperts, host_expert_layers
from glmtg.cpu.host_node import node_available
from glmtg.cpu.placement import HostPlacement
from glmtg.cpu.split_experts import SplitExperts
from glmtg.engine import decode_graph_blocker
from glmtg.layers.moe import ExpertPlacement
from glmtg.layers.quant_experts import PARAMS, QuantExperts
from glmtg.loading.gguf_model import load_gguf_model
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from tests.references.cpu_experts import (
    CONFIG,
    dequant_stack,
    host_pair,
    mix,
    round_x,
    write_random_gguf,
)
from tests.references.model import new_cache, tiny

ON_DEVICE = {1: frozenset({5, 2}), 2: frozenset({0, 3, 4, 6}), 3: frozenset({6})}  # not ranges


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-split.gguf"
    write_random_gguf(out, CONFIG, mix)
    return out


def load(path, host=None, device="cpu"):
    model, _ = load_gguf_model(path, device=device, dtype=torch.float32, progress=False, host_experts=host)
    return model


SPLIT = HostPlacement(frozenset({1, 2, 3}), ON_DEVICE)


def test_placement_of_ids():
    p = ExpertPlacement.of_ids(9, [7, 2, 4])
    assert (p.start, p.stop, p.ids, p.count, p.held) == (2, 8, (2, 4, 7), 3, (2, 4, 7))
    assert [p.holds(e) for e in range(9)] == [e in (2, 4, 7) for e in range(9)]
    assert [p.slot(e) for e in (2, 4, 7)] == [0, 1, 2]
    ids = torch.tensor([[7, 0, 4], [2, 8, 3]])
    assert p.local_ids(ids).tolist() == [[2, -1, 1], [0, -1, -1]]
    r = ExpertPlacement.of_ids(9, [4, 3, 5])  # contiguous: the range spelling
    assert r == ExpertPlacement(9, 3, 6) and r.ids is None
    assert r.local_ids(ids).tolist() == [[-1, -1, 1], [-1, -1, 0]]
    with pytest.raises(ValueError, match="expert 3 is not held"):
        p.slot(3)
    for bad in ([], [1, 1], [9], [-1]):
        with pytest.raises(ValueError, match="ids"):
            ExpertPlacement.of_ids(9, bad)
    with pytest.raises(ValueError, match="ids must be a sorted tuple"):
        ExpertPlacement(9, 2, 8, (4, 2, 7))


def test_split_stacks_are_the_files_rows(path):
    whole, split = load(path), load(path, SPLIT)
    assert host_expert_layers(split) == [1, 2, 3]
    assert [s.name for s in split.tensor_slots()] == [s.name for s in whole.tensor_slots()]
    assert [s.shape for s in split.tensor_slots()] == [s.shape for s in whole.tensor_slots()]
    for layer, ids in ON_DEVICE.items():
        experts, want = split.layers[layer].mlp.experts, whole.layers[layer].mlp.experts
        assert isinstance(experts, SplitExperts)
        dev, host = experts.device_experts, experts.host_experts
        assert type(dev) is QuantExperts and isinstance(host, HostExperts)
        assert dev.placement.held == tuple(sorted(ids))
        assert host.placement.held == tuple(e for e in range(7) if e not in ids)
        for p in PARAMS:
            assert torch.equal(getattr(dev, p), getattr(want, p)[list(dev.placement.held)])
            assert torch.equal(getattr(host, p), getattr(want, p)[list(host.placement.held)])
            assert torch.equal(experts.stack(p), getattr(want, p))
    stacks = {s.name: v for s, v in split.slot_tensors()}
    assert torch.equal(stacks["layers.2.mlp.experts.up_proj"], whole.layers[2].mlp.experts.up_proj)


def _inputs(t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, CONFIG.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(CONFIG.n_routed_experts, generator=gen)[:CONFIG.num_experts_per_tok]
                       for _ in range(t)])
    return x, ids, torch.rand(t, CONFIG.num_experts_per_tok, generator=gen) + 0.1


def test_each_pair_computed_once(path):
    """The split layer = the all-device layer on the device pairs + the all-host layer on the host pairs."""
    split = load(path, SPLIT).layers[2].mlp.experts
    dev = load(path).layers[2].mlp.experts
    host = load(path, HostPlacement(frozenset({2}))).layers[2].mlp.experts
    x, ids, w = _inputs(11, 1)
    on_dev = torch.isin(ids, torch.tensor(sorted(ON_DEVICE[2])))
    assert on_dev.any() and (~on_dev).any()
    dev_part, host_part = dev(x, ids, torch.where(on_dev, w, 0.0)), host(x, ids, torch.where(on_dev, 0.0, w))
    want = dev_part + host_part
    got = split(x, ids, w)
    assert torch.isfinite(got).all()
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    # a part dropped (or added twice) moves the output by that part's size, far above the tolerance
    assert min(float(dev_part.abs().max()), float(host_part.abs().max())) > 0.1 * float(want.abs().max())


def test_split_layer_against_float64(path):
    experts = load(path, SPLIT).layers[1].mlp.experts
    x, ids, w = _inputs(7, 2)
    x = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.1, -3 * x, x)
    got = experts(x, ids, w).double().numpy()
    fmt = experts.formats
    file = load(path).layers[1].mlp.experts  # the file's whole stacks
    gate, up = dequant_stack(file.gate_proj, fmt["gate_proj"]), dequant_stack(file.up_proj, fmt["up_proj"])
    down = dequant_stack(file.down_proj, fmt["down_proj"])
    xd, xq, wd = x.double().numpy(), round_x(x.numpy()), w.double().numpy()
    ref, bound = np.zeros(got.shape), np.zeros(got.shape)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e in ON_DEVICE[1]:  # float activations on the device part
                g, u = gate[e] @ xd[t], up[e] @ xd[t]
                a = g / (1.0 + np.exp(-g)) * u
                y, err = down[e] @ a, 1e-5 * (np.abs(down[e]) @ np.abs(a))
            else:
                y, err = host_pair(gate[e], up[e], down[e], xq[t])
            ref[t] += wd[t, s] * y
            bound[t] += wd[t, s] * err
    assert np.isfinite(got).all()
    assert (np.abs(got - ref) <= bound).all(), float((np.abs(got - ref) / bound).max())
    assert bound.max() < 1e-2 * np.abs(ref).max()  # far below a wrong expert, slot or weight


def test_split_model_logits_and_no_graphs(path):
    whole, split = load(path), load(path, SPLIT)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    want = whole(ids, new_cache(CONFIG, 2, 16))
    got = split(ids, new_cache(CONFIG, 2, 16))
    tol = 0.02 * float(want.abs().max())
    assert torch.isfinite(got).all() and float((got - want).abs().max()) <= tol
    # the host parts matter: zero their blocks and the logits move by far more
    split.layers[1].mlp.experts.host_experts.arena.buffer.zero_()
    assert float((split(ids, new_cache(CONFIG, 2, 16)) - want).abs().max()) > 10 * tol
    blocker = decode_graph_blocker(split)  # the host parts count: None only where they run as CUDA host nodes
    assert (blocker is None) == node_available() and (node_available() or "3 layer(s)" in blocker)


def test_random_model_split_and_bad_ids():
    from glmtg.loading.presets import random_model

    config = tiny()
    host = HostPlacement(frozenset({1, 2}), {2: frozenset({0, 5})})
    a = random_model(config, dtype=torch.float32, file_type="Q8_0", host_experts=host)
    b = random_model(config, dtype=torch.float32, file_type="Q8_0")
    assert isinstance(a.layers[2].mlp.experts, SplitExperts) and isinstance(a.layers[1].mlp.experts, HostExperts)
    assert torch.equal(a.layers[2].mlp.experts.stack("down_proj"), b.layers[2].mlp.experts.down_proj)
    every = HostPlacement(frozenset({1}), {1: frozenset(range(config.n_routed_experts))})
    with pytest.raises(ValueError, match="no split layer"):
        Glm4MoeForCausalLM(config, device="meta", weight_formats=lambda n, s: None if "norm" in n else "q8_0",
                           host_experts=every)
    with pytest.raises(ValueError, match="device_experts: layer 3 is not one of the host layers"):
        HostPlacement(frozenset({1}), {3: frozenset({0})})


@pytest.mark.gpu
def test_split_layer_on_cuda(path):
    """The split layer on CUDA (device part on the GPU kernels, host part overlapped on the CPU) against the
    same layer on the CPU: the device part's GPU kernel rounds its activations to int8 (the mmvq path) where
    the CPU's torch loop does not, so 2% of the output's size, as the host-vs-device model test allows."""
    cpu = load(path, SPLIT).layers[2].mlp.experts
    gpu = load(path, SPLIT, device="cuda").layers[2].mlp.experts
    assert gpu.device_experts.gate_proj.is_cuda and gpu.host_experts.gate_proj.device.type == "cpu"
    for t in (1, 3, 40):  # decode kernel, and many pairs (grouped GEMM)
        x, ids, w = _inputs(t, 5 + t)
        want = cpu(x, ids, w)
        got = gpu(x.cuda(), ids.cuda(), w.cuda())
        assert got.is_cuda and torch.isfinite(got).all()
        assert float((got.cpu() - want).abs().max()) <= 0.02 * float(want.abs().max())
