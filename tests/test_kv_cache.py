"""KVCache: layout, append/dequantized round trips, paging, sizes and argument errors.

Tolerances: the cache must hold exactly what the torch reference quantizer produces, so every
comparison of dequantized values is exact (0): the kernel is bit-exact (tests/kernels/test_kv_store.py)
and the dequantization is one float32 multiply per value, the same in both.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import KV_FORMATS, dequantize
from glmtg.kv_cache import KVCache, KVLayerView
from tests.references.quant import dequantize as ref_dequantize
from tests.references.quant import quantize as ref_quantize

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def roundtrip(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """What the cache should give back for x [..., D]: reference quantize then dequantize."""
    return ref_dequantize(*ref_quantize(x, fmt), fmt)


@pytest.mark.parametrize("page_size", [None, 3])
@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_views_have_the_documented_layout(fmt, page_size):
    cache = KVCache(num_layers=2, batch=3, capacity=7, num_kv_heads=2, head_dim=64, k_format=fmt,
                    page_size=page_size)
    p, t = (3, 7) if page_size is None else (9, 3)  # ceil(7 / 3) = 3 pages per sequence
    want = {
        "f16": ((p, 2, t, 64), torch.float16, None, None),
        "bf16": ((p, 2, t, 64), torch.bfloat16, None, None),
        "q8_0": ((p, 2, t, 64), torch.int8, (p, 2, t, 2), torch.float16),
        "q4_0": ((p, 2, t, 32), torch.uint8, (p, 2, t, 2), torch.float16),
        "fp8": ((p, 2, t, 64), torch.float8_e4m3fn, (p, 2, t), torch.float32),
    }[fmt]
    for view in (cache.k(0), cache.v(1)):
        assert isinstance(view, KVLayerView) and view.format == fmt
        assert tuple(view.data.shape) == want[0] and view.data.dtype == want[1] and view.data.is_contiguous()
        if want[2] is None:
            assert view.scale is None
        else:
            assert tuple(view.scale.shape) == want[2] and view.scale.dtype == want[3] and view.scale.is_contiguous()
    assert cache.lengths.dtype == torch.int32 and cache.lengths.tolist() == [0, 0, 0]
    if page_size is None:
        assert cache.page_table is None
    else:
        pt = cache.page_table
        assert pt.dtype == torch.int32 and tuple(pt.shape) == (3, 3)
        assert sorted(pt.flatten().tolist()) == list(range(9))  # every page owned exactly once


def test_layers_do_not_alias():
    cache = KVCache(num_layers=3, batch=1, capacity=4, num_kv_heads=1, head_dim=32, k_format="q8_0")
    cache.append(1, torch.ones(1, 2, 1, 32), torch.ones(1, 2, 1, 32), torch.zeros(1, dtype=torch.int32))
    for layer in (0, 2):
        assert not cache.k(layer).data.any() and not cache.v(layer).scale.any()
    assert cache.k(1).data[0, 0, :2].eq(127).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_format, v_format", [("bf16", None), ("f16", "f16"), ("q8_0", "q4_0"),
                                                ("q4_0", "q8_0"), ("fp8", None), ("q8_0", "bf16")])
def test_prefill_then_decode_matches_reference(k_format, v_format, device):
    """A chunked prefill (uneven per-sequence chunk starts) then decode steps, contiguous and paged;
    the caller advances lengths. Both caches give back exactly the reference round trip."""
    batch, heads, dim, capacity = 3, 2, 64, 11
    g = torch.Generator().manual_seed(0)
    total = torch.randn(batch, 9, heads, dim, generator=g) * 3
    caches = [KVCache(num_layers=2, batch=batch, capacity=capacity, num_kv_heads=heads, head_dim=dim,
                      k_format=k_format, v_format=v_format, page_size=ps, device=device) for ps in (None, 4)]
    vs = total.flip(-1) * 0.5
    for cache in caches:
        for lo, hi in ((0, 5), (5, 7), (7, 8), (8, 9)):  # prefill chunks of 5 and 2, then two decode steps
            start = cache.lengths.clone()
            cache.append(1, total[:, lo:hi].to(device), vs[:, lo:hi].to(device), start)
            assert cache.lengths.tolist() == [lo] * batch  # append leaves lengths alone
            cache.lengths += hi - lo
    vf = v_format or k_format
    for cache in caches:
        for b in range(batch):
            k, v = cache.dequantized(1, b, 9)
            assert k.dtype == torch.float32 and tuple(k.shape) == (heads, 9, dim)
            assert torch.equal(k.cpu(), roundtrip(total[b], k_format).transpose(0, 1))
            assert torch.equal(v.cpu(), roundtrip(vs[b], vf).transpose(0, 1))
        k0, v0 = cache.dequantized(0, 0, 9)  # layer 0 was never written: zeros
        assert not k0.any() and not v0.any()
    cache.reset()
    assert cache.lengths.tolist() == [0] * batch


def test_per_sequence_positions_and_partial_reads():
    """Different starts per sequence (a ragged batch); dequantized(n) reads exactly n tokens."""
    cache = KVCache(num_layers=1, batch=2, capacity=10, num_kv_heads=1, head_dim=32, k_format="q4_0", page_size=3)
    x = torch.randn(2, 4, 1, 32)
    cache.append(0, x, -x, torch.tensor([6, 1], dtype=torch.int32))
    k, v = cache.dequantized(0, 0, 10)
    assert torch.equal(k[:, 6:10], roundtrip(x[0], "q4_0").transpose(0, 1)) and not k[:, :6].any()
    k, v = cache.dequantized(0, 1, 3)
    assert tuple(k.shape) == (1, 3, 32) and not k[:, 0].any()
    assert torch.equal(v[:, 1:3], roundtrip(-x[1, :2], "q4_0").transpose(0, 1))
    assert tuple(cache.dequantized(0, 1, 0)[0].shape) == (1, 0, 32)


def test_dequantize_matches_reference_for_every_format():
    x = torch.randn(3, 2, 64) * 4
    for fmt in KV_FORMATS:
        data, scale = ref_quantize(x, fmt)
        assert torch.equal(dequantize(data, scale, fmt), ref_dequantize(data, scale, fmt))


@pytest.mark.parametrize("k_format, v_format, per_head", [
    ("f16", None, 256 + 256), ("bf16", "bf16", 512), ("q8_0", None, 136 * 2), ("q4_0", None, 72 * 2),
    ("fp8", None, 132 * 2), ("q8_0", "q4_0", 136 + 72),
])
def test_sizes(k_format, v_format, per_head):
    """D = 128: q8_0 = 128 + 4 x 2-byte d; q4_0 = 64 + 4 x 2; fp8 = 128 + one 4-byte scale."""
    cache = KVCache(num_layers=3, batch=2, capacity=5, num_kv_heads=2, head_dim=128,
                    k_format=k_format, v_format=v_format)
    assert cache.bytes_per_token == 3 * 2 * per_head
    assert cache.nbytes == cache.bytes_per_token * 2 * 5
    paged = KVCache(num_layers=3, batch=2, capacity=5, num_kv_heads=2, head_dim=128,
                    k_format=k_format, v_format=v_format, page_size=2)
    assert paged.nbytes == cache.bytes_per_token * paged.num_pages * 2  # 3 pages of 2 per sequence


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_format="q5_1"), "k_format"),
    (dict(v_format="int4"), "v_format"),
    (dict(k_format="q8_0", head_dim=48), "head_dim"),
    (dict(k_format="bf16", v_format="q4_0", head_dim=80), "head_dim"),
    (dict(capacity=0), "capacity"),
    (dict(batch=-1), "batch"),
    (dict(page_size=0), "page_size"),
])
def test_bad_construction_raises(kwargs, match):
    args = dict(num_layers=1, batch=1, capacity=4, num_kv_heads=1, head_dim=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KVCache(**args)


def test_non_block_formats_take_any_head_dim():
    cache = KVCache(num_layers=1, batch=1, capacity=2, num_kv_heads=1, head_dim=80, k_format="fp8", v_format="f16")
    x = torch.randn(1, 2, 1, 80)
    cache.append(0, x, x, torch.zeros(1, dtype=torch.int32))
    k, v = cache.dequantized(0, 0, 2)
    assert torch.equal(k, roundtrip(x[0], "fp8").transpose(0, 1))
    assert torch.equal(v, roundtrip(x[0], "f16").transpose(0, 1))


def _cache():
    return KVCache(num_layers=2, batch=2, capacity=6, num_kv_heads=2, head_dim=32, k_format="q8_0", page_size=4)


@pytest.mark.parametrize("call, match", [
    (lambda c, x, s: c.append(2, x, x, s), "layer"),
    (lambda c, x, s: c.append(0, x[:, :, :1], x, s), "k_new"),
    (lambda c, x, s: c.append(0, x, x[:1], s), "v_new"),
    (lambda c, x, s: c.append(0, x, x[:, :1], s), "v_new"),
    (lambda c, x, s: c.append(0, x, x, s.long()), "start"),
    (lambda c, x, s: c.append(0, x, x, s[:1]), "start"),
    (lambda c, x, s: c.append(0, x, x, s + 4), "capacity"),  # 4 + 3 > 6
    (lambda c, x, s: c.append(0, x, x, s - 1), "start"),
    (lambda c, x, s: c.k(-1), "layer"),
    (lambda c, x, s: c.dequantized(0, 2, 1), "b"),
    (lambda c, x, s: c.dequantized(0, 0, 7), "n"),
])
def test_bad_calls_raise(call, match):
    cache = _cache()
    x = torch.randn(2, 3, 2, 32)
    with pytest.raises(ValueError, match=match):
        call(cache, x, torch.zeros(2, dtype=torch.int32))
    assert not cache.k(0).data.any()  # nothing was written by a rejected call


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "fp8", "bf16"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_append_in_a_cuda_graph(fmt, page_size):
    """One decode step (append to every layer, then lengths += 1) captured once and replayed as the
    sequences grow: positions come from the device, so each replay writes the next slot."""
    batch, heads, dim, layers, steps = 3, 2, 128, 2, 5
    cache = KVCache(num_layers=layers, batch=batch, capacity=40, num_kv_heads=heads, head_dim=dim,
                    k_format=fmt, page_size=page_size, device="cuda")
    cache.lengths.copy_(torch.tensor([0, 7, 30], dtype=torch.int32))
    k_in = torch.zeros(batch, 1, heads, dim, device="cuda")
    v_in = torch.zeros_like(k_in)

    def step():
        for layer in range(layers):
            cache.append(layer, k_in, v_in, cache.lengths)
        cache.lengths += 1

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    cache.lengths.copy_(torch.tensor([0, 7, 30], dtype=torch.int32))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    cache.lengths.copy_(torch.tensor([0, 7, 30], dtype=torch.int32))  # capture does not run the step
    g = torch.Generator().manual_seed(9)
    ks = torch.randn(steps, batch, 1, heads, dim, generator=g)
    for t in range(steps):
        k_in.copy_(ks[t])
        v_in.copy_(-ks[t])
        graph.replay()
    torch.cuda.synchronize()
    assert cache.lengths.tolist() == [steps, 7 + steps, 30 + steps]
    for b, first in enumerate((0, 7, 30)):
        k, v = cache.dequantized(1, b, first + steps)
        want = roundtrip(ks[:, b, 0], fmt).transpose(0, 1)  # [H, steps, D]
        assert torch.equal(k[:, first:].cpu(), want)
        assert torch.equal(v[:, first:].cpu(), roundtrip(-ks[:, b, 0], fmt).transpose(0, 1))


def test_rows_view_shares_the_page_pool():
    # A view writes through its own page table into the parent's pool; another view over the same pages
    # reads those rows back exactly (f16 holds these float16 values unchanged: tolerance 0).
    cache = KVCache(num_layers=2, batch=2, capacity=7, num_kv_heads=2, head_dim=32, k_format="f16",
                    page_size=3)  # 2 * ceil(7 / 3) = 6 pages
    torch.manual_seed(0)
    k = torch.randn(1, 5, 2, 32).half().float()
    v = torch.randn(1, 5, 2, 32).half().float()
    writer = cache.rows(torch.tensor([1], dtype=torch.int32), torch.tensor([[4, 0, 5]], dtype=torch.int32))
    assert writer.batch == 1 and writer.num_pages == 6 and writer.capacity == 7
    writer.append(1, k, v, writer.lengths)  # positions 1..5: pages 4 (1, 2) and 0 (3..5)
    assert cache.k(1).data[4, :, 1:3].equal(k[0, :2].transpose(0, 1).half())
    assert cache.v(1).data[0, :, :3].equal(v[0, 2:].transpose(0, 1).half())
    assert not cache.k(0).data.any()  # layer 0 untouched
    # Two rows: the second reads the same pages at batch row 1; the first owns other pages.
    reader = cache.rows(torch.tensor([0, 6], dtype=torch.int32),
                        torch.tensor([[1, 2, 3], [4, 0, 5]], dtype=torch.int32))
    got_k, got_v = reader.dequantized(1, 1, 6)
    assert got_k[:, 1:6].equal(k[0].transpose(0, 1)) and got_v[:, 1:6].equal(v[0].transpose(0, 1))
    assert cache.lengths.tolist() == [0, 0] and cache.batch == 2  # the parent is unchanged


@pytest.mark.parametrize("call, match", [
    (lambda c: c.rows(torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int32)), "lengths"),
    (lambda c: c.rows(torch.zeros(0, dtype=torch.int32), torch.zeros(0, 3, dtype=torch.int32)), "lengths"),
    (lambda c: c.rows(torch.zeros(2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32)), "page_table"),
    (lambda c: c.rows(torch.zeros(2, dtype=torch.int32), torch.zeros(3, 3, dtype=torch.int32)), "page_table"),
    (lambda c: c.rows(torch.zeros(2, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int64)), "page_table"),
])
def test_rows_bad_arguments_raise(call, match):
    cache = KVCache(num_layers=1, batch=2, capacity=7, num_kv_heads=1, head_dim=32, page_size=3)
    with pytest.raises(ValueError, match=match):
        call(cache)


def test_rows_needs_a_paged_cache():
    cache = KVCache(num_layers=1, batch=2, capacity=7, num_kv_heads=1, head_dim=32)
    with pytest.raises(ValueError, match="paged"):
        cache.rows(torch.zeros(2, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32))
