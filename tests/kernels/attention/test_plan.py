"""The launch planner: every plan it makes is a valid launch, plans run correctly, and its measured
choices come from the per-architecture table.

Validity is checked over a grid of shapes for an H100 (132 SMs, sm_90), a smaller Hopper, an
unmeasured architecture and the CPU interpreter. Correctness: planned launches run in the interpreter
against float64 attention (tolerances as in test_launch.py: fp32 1e-5, fp16 2e-3 relative).
Only the decisions the table documents are asserted as such (test_documented_decisions).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import triton

from glmtg.formats import KV_FORMATS
from glmtg.kernels.attention import ARCH_PLANS, Target, decode_attention, plan_format, plan_launch
from glmtg.kernels.attention import cuda_loop as loop
from glmtg.kernels.attention.plan import SM90, cuda_loop_launch_for, plan_for
from glmtg.kv_cache import KVCache
from tests.references.attention import decode_attention_ref

H100 = Target(132, (9, 0))
TARGETS = [H100, Target(66, (9, 0)), Target(108, (8, 0)), Target(8)]
HEADS = [(96, 8), (48, 4), (24, 2), (12, 1), (48, 2), (40, 8), (8, 8)]
CONTEXTS = [1, 100, 1024, 4096, 16384, 65536, 131072]
FORMATS = [None, "q8_0", "q4_0", "fp8"]  # plan_format's outcomes
MAX_GRID_YZ = 65535


def assert_valid(launch, batch, hkv, rows, head_dim, max_context, fmt, sms):
    what = (batch, hkv, rows, head_dim, max_context, fmt, sms, launch)
    # Covers every query row, with no idle row tile.
    assert launch.m_tiles * launch.block_m >= rows > (launch.m_tiles - 1) * launch.block_m, what
    assert launch.block_m >= 16 and launch.block_m & (launch.block_m - 1) == 0, what
    assert launch.block_m <= (128 if head_dim <= 128 else 64), what
    assert launch.block_n >= 16 and launch.block_n & (launch.block_n - 1) == 0, what
    assert launch.num_splits >= 1 and launch.num_warps in (1, 2, 4, 8) and launch.num_stages >= 1, what
    # The grid fits CUDA's limits: (splits, sequences x KV heads, row tiles).
    assert launch.num_splits < 2**31 and batch * hkv <= MAX_GRID_YZ and launch.m_tiles <= MAX_GRID_YZ, what
    # One wave: more splits never start programs beyond what the SMs hold at once.
    work = batch * hkv * launch.m_tiles
    assert launch.num_splits == 1 or launch.num_splits * work <= 8 * sms, what
    # No slice shorter than 64 tokens of the declared context.
    assert launch.num_splits <= max(1, triton.cdiv(max_context, 64)), what
    if launch.cuda_loop:
        assert fmt is not None and head_dim == loop.HEAD_DIM and rows <= loop.MAX_ROWS, what
        assert (launch.block_m, launch.block_n, launch.num_warps) == (loop.ROWS, loop.TILE, 1), what
    elif fmt == "q4_0":
        assert launch.block_n >= 32, what  # the launcher refuses 16-token q4_0 tiles on the GPU


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t.sms}sm-{t.capability}")
def test_every_plan_is_a_valid_launch(target):
    n = 0
    for (hq, hkv), ctx, batch, fmt, sq, head_dim, cuda_loop in itertools.product(
            HEADS, CONTEXTS, (1, 8, 32), FORMATS, (1, 3), (64, 128, 256), (False, True)):
        rows = hq // hkv * sq
        launch = plan_for(target, batch, hkv, rows, head_dim, ctx, cache_format=fmt,
                          cuda_loop=cuda_loop and rows <= loop.MAX_ROWS)
        assert_valid(launch, batch, hkv, rows, head_dim, ctx, fmt, target.sms)
        n += 1
    assert n == len(HEADS) * len(CONTEXTS) * 3 * len(FORMATS) * 2 * 3 * 2


@pytest.mark.parametrize("target", TARGETS[:2], ids=lambda t: f"{t.sms}sm")
def test_cuda_loop_launches_are_valid(target):
    for (hq, hkv), ctx, batch, sq in itertools.product(HEADS, CONTEXTS, (1, 8, 32), (1, 2)):
        rows = hq // hkv * sq
        if rows <= loop.MAX_ROWS:
            launch = cuda_loop_launch_for(target, batch, hkv, ctx, rows=rows)
            assert_valid(launch, batch, hkv, rows, 128, ctx, "q8_0", target.sms)
            assert launch.cuda_loop


def test_pdl_only_where_the_hardware_has_it():
    assert plan_for(H100, 1, 8, 12, 128, 65536).pdl and plan_for(H100, 1, 8, 12, 128, 65536, pdl=False).pdl is False
    assert not plan_for(Target(108, (8, 0)), 1, 8, 12, 128, 65536).pdl
    assert not plan_launch(1, 8, 12, 128, 65536, torch.device("cpu")).pdl


def filled(batch, hkv, d, lengths, capacity, k_format, v_format, seed):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(num_layers=1, batch=batch, capacity=capacity, num_kv_heads=hkv, head_dim=d,
                    k_format=k_format, v_format=v_format)
    k = torch.randn(batch, capacity, hkv, d, generator=g)
    v = torch.randn(batch, capacity, hkv, d, generator=g)
    cache.append(0, k, v, torch.zeros(batch, dtype=torch.int32))
    cache.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
    return cache


@pytest.mark.parametrize("k_format, v_format", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "fp8"), ("fp8", "q8_0")])
@pytest.mark.parametrize("target", [H100, Target(8)], ids=["h100", "cpu"])
def test_planned_launches_are_correct(k_format, v_format, target):
    """Launches the planner makes for these targets (contexts short enough for the interpreter), run on
    the CPU: fp16 queries, 2e-3 relative to float64 attention over the dequantized cache."""
    hkv, group, d, capacity, lengths = 2, 12, 64, 200, [200, 37, 1]
    cache = filled(3, hkv, d, lengths, capacity, k_format, v_format, seed=len(k_format) + target.sms)
    q = torch.randn(3, 1, hkv * group, d, generator=torch.Generator().manual_seed(1)).half()
    kv, vv = cache.k(0), cache.v(0)
    fmt = plan_format(k_format, v_format)
    for ctx in (capacity, 64):  # the declared context: the cache, or shorter (more tokens per slice)
        launch = plan_for(target, 3, hkv, group, d, ctx, cache_format=fmt, pdl=False)
        out = torch.full_like(q, float("nan"))
        decode_attention(q, kv.data, vv.data, cache.lengths, k_scale=kv.scale, v_scale=vv.scale, k_format=k_format,
                         v_format=v_format, out=out, launch=launch)
        ks = torch.stack([cache.dequantized(0, b, capacity)[0] for b in range(3)])
        vs = torch.stack([cache.dequantized(0, b, capacity)[1] for b in range(3)])
        ref, _ = decode_attention_ref(q, ks, vs, cache.lengths)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, (launch, err)


def test_documented_decisions():
    """The plan table's documented choices (glmtg/kernels/attention/plan.py, bench/DECISIONS.md), for the
    H100 it was measured on: each asserted through the table's own values, not re-typed numbers."""
    arch = ARCH_PLANS[(9, 0)]
    # Deep q4_0 caches take the CUDA loop where it can run; q8_0 and fp8 keep Triton.
    deep = dict(batch=1, num_kv_heads=8, rows=12, head_dim=128, max_context=65536)
    assert plan_for(H100, **deep, cache_format="q4_0", cuda_loop=True).cuda_loop
    assert not plan_for(H100, **deep, cache_format="q4_0", cuda_loop=False).cuda_loop
    for fmt in ("q8_0", "fp8"):
        assert not plan_for(H100, **deep, cache_format=fmt, cuda_loop=True).cuda_loop
    # Deep q8_0: one-warp programs with the table's tile.
    one_warp = plan_for(H100, **deep, cache_format="q8_0")
    assert (one_warp.num_warps, one_warp.block_n) == (1, arch.one_warp["q8_0"].block_n)
    # Short contexts: quantized caches plan as plain ones (the extra slices would cost more than they win).
    for fmt in ("q8_0", "q4_0", "fp8"):
        assert plan_for(H100, 1, 4, 12, 128, 4096, cache_format=fmt) == plan_for(H100, 1, 4, 12, 128, 4096)
    # Format plans were measured at head_dim 128 only; an explicit override turns them off.
    assert plan_for(H100, 1, 8, 12, 64, 65536, cache_format="q8_0") == plan_for(H100, 1, 8, 12, 64, 65536)
    assert plan_for(H100, **deep, cache_format="q8_0", num_warps=4).num_warps == 4
    # Mixed caches plan for the costlier format.
    assert [plan_format(*p) for p in [("q8_0", "q4_0"), ("fp8", "q8_0"), ("bf16", "fp8"), (None, None)]] == \
        ["q4_0", "q8_0", "fp8", None]


def test_the_table_is_where_the_choices_live(monkeypatch):
    """Changing an architecture's table entry changes its plans, and only that architecture's."""
    deep = dict(batch=1, num_kv_heads=8, rows=12, head_dim=128, max_context=65536)
    before = plan_for(H100, **deep, cache_format="q4_0", cuda_loop=True)
    monkeypatch.setitem(ARCH_PLANS, (9, 0), replace(SM90, cuda_loop_formats=(), one_warp={}))
    after = plan_for(H100, **deep, cache_format="q4_0", cuda_loop=True)
    assert before.cuda_loop and not after.cuda_loop and after.num_warps == 4
    assert Target(132, (10, 0)).plan is SM90  # unlisted architectures: the default entry, the H100's


def test_bad_arguments():
    with pytest.raises(ValueError, match="cache_format"):
        plan_for(H100, 1, 8, 12, 128, 65536, cache_format="q8")
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        plan_for(H100, 1, 2, 24, 128, 64, block_m=24)
    assert set(KV_FORMATS) >= {f for f in FORMATS if f}
