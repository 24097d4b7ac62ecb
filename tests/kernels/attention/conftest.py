"""Helpers shared by the decode-attention tests, as fixtures (test modules import no other test module).

``filled_cache`` builds a one-layer KVCache of random K/V with every slot past each length poisoned (NaN
scales, or NaN values for float caches); ``check`` runs decode_attention into a NaN-poisoned output and
compares with float64 attention over the dequantized cache at a stated relative tolerance;
``check_graph_replay`` captures one decode step in a CUDA graph and replays it as lengths change.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import dequantize
from glmtg.kernels.attention import decode_attention
from glmtg.kv_cache import KVCache
from tests.references.attention import decode_attention_ref


def _filled_cache(batch, hkv, d, lengths, capacity, k_format, v_format, device, page_size=None, seed=0):
    """A one-layer KVCache holding random K/V for each sequence's first ``lengths[b]`` tokens."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(num_layers=1, batch=batch, capacity=capacity, num_kv_heads=hkv, head_dim=d,
                    k_format=k_format, v_format=v_format, page_size=page_size, device=device)
    k = torch.randn(batch, capacity, hkv, d, generator=g).to(device)
    v = torch.randn(batch, capacity, hkv, d, generator=g).to(device)
    cache.append(0, k, v, torch.zeros(batch, dtype=torch.int32, device=device))
    cache.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
    poison_past_lengths(cache, lengths)
    return cache


def poison_past_lengths(cache, lengths):
    for view in (cache.k(0), cache.v(0)):
        target = view.scale if view.scale is not None else view.data
        for b, n in enumerate(lengths):
            if cache.page_table is None:
                target[b, :, n:] = float("nan")
            else:
                pos = torch.arange(n, cache.capacity, device=target.device)
                pages = cache.page_table[b].long()[pos // cache.page_size]
                target[pages, :, pos % cache.page_size] = float("nan")


def _check(cache, q, dtype, tol, **kwargs):
    """decode_attention of ``q`` over layer 0 of ``cache`` vs float64 attention over the dequantized
    cache: relative error below ``tol``, no NaN (unwritten output, or a read past a length)."""
    kv, vv = cache.k(0), cache.v(0)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kv.data, vv.data, cache.lengths, page_table=cache.page_table, k_scale=kv.scale,
                     v_scale=vv.scale, k_format=kv.format, v_format=vv.format, out=out, **kwargs)
    k_deq = dequantize(kv.data, kv.scale, kv.format).nan_to_num(0.0)
    v_deq = dequantize(vv.data, vv.scale, vv.format).nan_to_num(0.0)
    pt = None if cache.page_table is None else cache.page_table.cpu()
    ref, _ = decode_attention_ref(q.cpu(), k_deq.cpu(), v_deq.cpu(), cache.lengths.cpu(), pt)
    assert not torch.isnan(out).any(), "unwritten output or NaN read from past the context"
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol}"
    return out


def _check_graph_replay(fmt, launch_for=None):
    """One decode step captured in a CUDA graph, replayed as the lengths change (grown and shrunk).

    ``launch_for(capacity, device)`` gives the launch to capture (None: the planner's)."""
    capacity = 9000
    cache = _filled_cache(2, 1, 128, [capacity, capacity], capacity, fmt, fmt, "cuda", seed=2)
    q = torch.randn(2, 1, 12, 128, device="cuda").bfloat16()
    kv, vv = cache.k(0), cache.v(0)
    lengths = torch.ones(2, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    launch = None if launch_for is None else launch_for(capacity, q.device)

    def step():
        decode_attention(q, kv.data, vv.data, lengths, k_scale=kv.scale, v_scale=vv.scale, k_format=fmt,
                         v_format=fmt, out=out, validate=False, launch=launch)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    k_deq = dequantize(kv.data, kv.scale, fmt).cpu()
    v_deq = dequantize(vv.data, vv.scale, fmt).cpu()
    for lens in ([1, 7], [4097, 300], [capacity, 8191]):
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = decode_attention_ref(q.cpu(), k_deq, v_deq, lengths.cpu())
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < 1.5e-2, f"lengths {lens}: relative error {err:.2e}"


@pytest.fixture
def filled_cache():
    return _filled_cache


@pytest.fixture
def check():
    return _check


@pytest.fixture
def check_graph_replay():
    return _check_graph_replay
