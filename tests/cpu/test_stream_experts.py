"""Host-placed experts streamed to the device for prefill (glmtg.cpu.stream_experts, ``--host-prefill``).

On this CPU-only machine the "device" is the CPU: ``stream_prefill`` copies a HostExperts layer's blocks
into a CPU staging buffer and runs ``moe_prefill`` there (Triton interpreter), the same call QuantExperts
makes for many pairs. (CUDA streams, events and the size threshold: tests/cpu/test_stream_experts_gpu.py.)

Tolerances (why): (1) streamed == QuantExperts on the same blocks, bit for bit (the same kernel on a byte copy
of the same stacks, the same launch configuration); (2) against float64: tests/references/gguf_gemm.py
``moe_reference``'s bound (the one the moe_prefill tests state: each step's fp32 error propagated).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from glmtg.cpu import stream_experts
from glmtg.cpu.host_experts import HostArena, HostExperts
from glmtg.cpu.stream_experts import configure, settings, stream_prefill, use_stream
from glmtg.kernels.gguf import mmq_moe
from glmtg.layers.moe import ExpertPlacement
from glmtg.layers.quant_experts import PARAMS, QuantExperts
from tests.references.cli_run import one_error_line, run
from tests.references.gguf_gemm import dequant64, moe_reference
from tests.references.gguf_weights import gguf_weight
from tests.references.model import tiny

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

E, K, I = 6, 2, 96
# (gate/up, down, H): Air's 32-wide types, and a K-quant (one 256-value super-block per row)
CASES = [("q4_0", "q8_0", 64), ("q8_0", "q4_0", 64), ("q4_k", "q8_0", 256)]


def _layers(gu: str, dn: str, h: int, n: int, placement: ExpertPlacement | None = None, seed: int = 0):
    """``n`` host layers in one arena, and the same blocks in QuantExperts (the device path), layer by layer."""
    config = tiny(hidden_size=h, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K)
    formats = {"gate_proj": gu, "up_proj": gu, "down_proj": dn}
    arena = HostArena(pin=False)
    host = [HostExperts(config, torch.float32, formats, arena, layer=1 + j, placement=placement) for j in range(n)]
    device = [QuantExperts(config, torch.float32, formats, placement=placement, backend="kernel") for _ in range(n)]
    full = []
    for j in range(n):
        values = {}
        for p, (rows, width, fmt) in zip(PARAMS, ((I, h, gu), (I, h, gu), (h, I, dn))):
            raw = gguf_weight(fmt, (E, rows), width, seed + 10 * j + PARAMS.index(p))
            values[p] = dequant64(raw, fmt)
            for e in range(E):
                host[j].load_expert(p, e, raw[e])
                device[j].load_expert(p, e, raw[e])
        full.append(values)
    return host, device, full


def _inputs(t: int, h: int, full: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    # gate/up products O(1): random blocks hold values up to ~10 (K-quants ~100)
    x = torch.randn(t, h, generator=gen) / (float(full["gate_proj"].abs().max()) * h ** 0.5)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)])
    return x, ids, torch.rand(t, K, generator=gen) + 0.1


def _reference(x, ids, weights, full, placement: ExpertPlacement | None = None):
    if placement is not None:  # experts held elsewhere add nothing
        ids = torch.where(torch.tensor([placement.holds(e) for e in range(E)])[ids], ids, -1)
    return moe_reference(x, full["gate_proj"], full["up_proj"], full["down_proj"], ids, weights, torch.float32)


def _close(got, ref, tol) -> None:
    err = (got.double() - ref).abs()
    assert got.dtype == torch.float32 and bool((err <= tol).all()), float((err / tol).max())


@pytest.mark.parametrize("gu,dn,h", CASES)
def test_streamed_equals_the_device_path_and_float64(gu, dn, h):
    host, device, full = _layers(gu, dn, h, 1, seed=len(gu) + h)
    for t in (5, 40):
        x, ids, weights = _inputs(t, h, full[0], seed=t)
        got = stream_prefill(host[0], x, ids, weights)
        assert torch.equal(got, device[0](x, ids, weights))  # the same kernel on a copy of the same bytes
        _close(got, *_reference(x, ids, weights, full[0]))


def test_streamed_part_of_a_layer():
    """A split layer's host part: ids of experts held elsewhere add nothing (local slots, -1 elsewhere)."""
    placement = ExpertPlacement.of_ids(E, [0, 2, 3, 5])
    host, device, full = _layers("q4_0", "q8_0", 64, 1, placement=placement, seed=7)
    x, ids, weights = _inputs(11, 64, full[0], seed=3)
    got = stream_prefill(host[0], x, ids, weights)
    assert torch.equal(got, device[0](x, ids, weights))
    _close(got, *_reference(x, ids, weights, full[0], placement))


def test_prefetch_in_sequence_then_out_of_order_never_stale():
    """Layers 1, 2 in model order (layer 2 prefetched during 1, layer 1 again after 2: the next chunk), then a
    decode-size call of layer 2 (not prefetched: the buffer holds layer 1) and layer 1: each result is its
    own layer's (the layers' weights differ, so a stale buffer would show), and the copies are the ones the
    prefetch rule makes."""
    host, device, full = _layers("q4_0", "q8_0", 64, 2, seed=20)
    model = nn.ModuleList(host)
    x, ids, weights = _inputs(9, 64, full[0], seed=5)
    copies = []
    for j, t in ((0, 9), (1, 9), (1, 1), (0, 9)):
        xs, ids_t, w_t = x[:t], ids[:t], weights[:t]
        got = stream_prefill(host[j], xs, ids_t, w_t)
        _close(got, *_reference(xs, ids_t, w_t, full[j]))
        if t > 1:
            assert torch.equal(got, device[j](xs, ids_t, w_t))
        copies.append(settings(model)["copies"])
    # 1: copy 1 + prefetch 2; 2: prefetched, prefetch 1; 2 again: copy (1 is already staged); 1: staged, prefetch 2
    assert copies == [2, 3, 4, 5]
    assert settings(model)["staging_bytes"] == 2 * stream_experts.stack_layout(host[0])[1]


def test_the_switch_and_its_checks():
    host, _, full = _layers("q4_0", "q8_0", 64, 1, seed=30)
    model = nn.ModuleList(host)
    x = _inputs(70, 64, full[0], seed=1)[0]
    assert settings(model) == {"mode": "gpu", "min_tokens": stream_experts.MIN_TOKENS, "staging_bytes": 0,
                               "copies": 0}
    assert not use_stream(host[0], x)  # x on the CPU: the CPU kernel, whatever the size
    configure(model, "cpu", 100)
    assert settings(model)["mode"] == "cpu" and settings(model)["min_tokens"] == 100
    assert settings(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="--host-prefill wants gpu or cpu"):
        configure(model, "xpu")
    with pytest.raises(ValueError, match="min_tokens"):
        configure(model, "gpu", 0)
    assert stream_experts.parse_min_tokens("32") == 32
    for bad in ("0", "-3", "x", "1.5"):
        with pytest.raises(ValueError, match="--host-prefill-min wants a token count"):
            stream_experts.parse_min_tokens(bad)


def test_forward_on_the_cpu_device_keeps_the_cpu_kernel(monkeypatch):
    """HostExperts.forward with CPU inputs never streams (no copy would pay): moe_prefill is not called."""
    host, _, full = _layers("q4_0", "q8_0", 64, 1, seed=40)
    called = []
    monkeypatch.setattr(mmq_moe, "moe_prefill", lambda *a, **k: called.append(1))
    x, ids, weights = _inputs(70, 64, full[0], seed=2)
    y = host[0](x, ids, weights)
    assert not called and y.shape == x.shape and torch.isfinite(y).all()


BASE = ["sweep-bench", "--type", "Q8_0", "--device", "cpu", "--no-warmup", "-c", "16"]


@pytest.mark.parametrize("flags, message", [
    (["--cpu-moe", "--host-prefill", "xpu"], "argument --host-prefill: wants gpu or cpu, got 'xpu'"),
    (["--cpu-moe", "--host-prefill-min", "0"], "argument --host-prefill-min: wants a token count >= 1"),
    (["--host-prefill", "cpu"], "--host-prefill applies to host-placed experts"),
    (["--host-prefill-min", "8"], "--host-prefill-min applies to host-placed experts"),
])
def test_bad_flags(capsys, flags, message):
    rc, _, err = run(capsys, *BASE, *flags)
    assert rc == 2 and one_error_line(err) and message in err, err


def test_sweep_bench_applies_and_records_the_flags(capsys, tmp_path):
    out = tmp_path / "r.json"
    rc, stdout, err = run(capsys, *BASE, "--cpu-moe", "--host-prefill", "cpu", "--host-prefill-min", "8",
                          "-ub", "8", "-n", "2", "--no-progress", "-o", str(out))
    assert rc == 0, err
    assert json.loads(out.read_text())["environment"]["host_prefill"] == {
        "mode": "cpu", "min_tokens": 8, "staging_bytes": 0, "copies": 0}
    assert "host prefill: cpu from 8 tokens, 0.00 GB staging, 0 layer copies" in stdout


def test_buffers_made_in_inference_mode_serve_later_calls():
    host, device, full = _layers("q8_0", "q4_0", 64, 1, seed=50)
    x, ids, weights = _inputs(8, 64, full[0], seed=4)
    with torch.inference_mode():
        first = stream_prefill(host[0], x, ids, weights)
    assert torch.equal(stream_prefill(host[0], x, ids, weights), first)
    assert torch.equal(first, device[0](x, ids, weights))


def test_gpu_experts_budget_leaves_room_for_staging(monkeypatch, capsys):
    """--gpu-experts auto on a GPU: the staging buffers (2 x the largest host layer) come off the budget,
    unless --host-prefill cpu. (mem_get_info stubbed: this machine has no GPU; nothing else touches CUDA.)"""
    from glmtg.cli.experts import place_gpu_experts
    from glmtg.cpu.gpu_experts import MARGIN_MIN, expert_bytes, staging_bytes
    from glmtg.cpu.placement import HostPlacement
    from glmtg.loading.presets import mix_tensor_bytes, preset_config

    config = preset_config("tiny", None)
    sizes = mix_tensor_bytes(config, "Q8_0")
    host = HostPlacement(frozenset({1, 2, 3}))
    layer = sum(sizes[f"blk.2.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
    assert staging_bytes(sizes, host.layers) == 2 * (layer + 3 * 256) and staging_bytes(sizes, []) == 0
    per_expert = expert_bytes(sizes, [1, 2, 3], config.n_routed_experts)[1]
    free = MARGIN_MIN + 2 * (layer + 3 * 256) + 5 * per_expert  # room for 5 experts beside the staging
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, free))
    moved = {}
    for mode in (None, "cpu"):
        args = argparse.Namespace(gpu_experts="auto", gpu_experts_budget=None, host_prefill=mode)
        with pytest.warns(UserWarning, match="without counts"):
            moved[mode] = place_gpu_experts(args, config, host, sizes, torch.device("cuda"), needed=0)[1]
    assert moved[None] == 5 * per_expert and moved["cpu"] > moved[None]
