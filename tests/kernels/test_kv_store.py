"""kv_store (append + quantize into the cache) against gguf and the torch references.

Tolerances:
- q8_0 / q4_0: bit-exact. The stored bytes, interleaved into llama.cpp blocks, must equal
  ``gguf.quantize`` byte for byte, and the dequantized values gguf's dequantize (NaN where it is NaN).
- f16 / bf16 / fp8: bit-exact against the torch reference (one correctly rounded division and one
  round-to-nearest-even cast; nothing order-dependent), and fp8 also meets the format's error bound.
Every store is pre-filled with a sentinel byte, and the whole store (spare pages included) is
compared, so a write to a wrong place or a missing write cannot pass.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch

from glmtg.formats import FORMATS, KV_FORMATS
from glmtg.kernels.kv_store import kv_store

from tests.references.quant import dequantize, quantize, to_gguf_blocks

kv_store_triton = functools.partial(kv_store, backend="triton")  # the kernel, in the interpreter on a CPU

SENTINEL = 0x5A
GGUF_TYPE = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
# (device, store): the CPU's torch path, the Triton kernel in the interpreter, and the GPU.
PATHS = [pytest.param("cpu", kv_store, id="cpu-torch"), pytest.param("cpu", kv_store_triton, id="cpu-triton"),
         pytest.param("cuda", kv_store, id="cuda", marks=pytest.mark.gpu)]


def edge_blocks(n: int, g: torch.Generator, *, f32_only: bool = True) -> torch.Tensor:
    """[n, 32] float32 blocks cycling through the awkward cases of both block formats."""
    out = torch.empty(n, 32)
    for i in range(n):
        case = i % (11 if f32_only else 9)
        e = float(2.0 ** int(torch.randint(-12, 5, (1,), generator=g)))
        r = torch.randn(32, generator=g)
        if case == 0:  # mixed scales, block to block
            blk = r * 10.0 ** float(torch.empty(1).uniform_(-4, 3, generator=g))
        elif case == 1:  # all zero
            blk = torch.zeros(32)
        elif case == 2:  # the largest magnitude is negative (q4_0: d > 0)
            blk = r.clone()
            blk[int(torch.randint(0, 32, (1,), generator=g))] = -1.5 * float(r.abs().max())
        elif case == 3:  # q8_0 half-way points: d = 2^e exactly, x / d = k + 0.5
            blk = (torch.randint(-127, 127, (32,), generator=g) + 0.5) * e
            blk[0] = 127 * e
        elif case == 4:  # q4_0 half-way points: d = 2^e, x * id + 8.5 lands on integers
            blk = (torch.randint(-8, 8, (32,), generator=g) + 0.5) * e
            blk[int(torch.randint(0, 32, (1,), generator=g))] = -8 * e
        elif case == 5:  # +a and -a tie for the largest |x|: the first one wins (q4_0)
            sign = 1.0 if bool(torch.randint(0, 2, (1,), generator=g)) else -1.0
            blk = torch.tensor([sign, -sign] * 16) * 3.0
            blk[4:] = r[4:] * 0.5
        elif case == 6:  # signed zeros, a -0.0 first (q4_0: m = -0.0 -> d = +0.0)
            blk = torch.where(r > 0, 0.0, -0.0)
            blk[0] = -0.0
        elif case == 7:  # tiny: d rounds to fp16 zero or a subnormal, codes still nonzero
            blk = r * (1e-8 if i % 2 else 1e-5)
        elif case == 8:  # one outlier
            blk = r.clone()
            blk[7] = 40.0
        elif case == 9:  # large values
            blk = r * 1e5
        else:  # d = amax / 127 overflows fp16 (stored as inf; gguf does the same)
            blk = r.clone()
            blk[3] = 1e7
        out[i] = blk
    return out


def edge_input(shape: tuple[int, int, int, int], seed: int, *, f32_only: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, s, h, d = shape
    n = b * s * h * d // 32
    blocks = edge_blocks(n, g, f32_only=f32_only)
    return blocks[torch.randperm(n, generator=g)].reshape(shape)


def make_store(fmt: str, pages: int, heads: int, tokens: int, head_dim: int, device: str):
    """Sentinel-filled data and scale tensors of one store."""
    data_shape, data_dtype, scale_shape, scale_dtype = FORMATS[fmt].storage_shape(pages, heads, tokens, head_dim)
    data = torch.empty(data_shape, dtype=data_dtype, device=device)
    data.view(torch.uint8).fill_(SENTINEL)
    scale = None
    if scale_shape is not None:
        scale = torch.empty(scale_shape, dtype=scale_dtype, device=device)
        scale.view(torch.uint8).fill_(SENTINEL)
    return data, scale


def shuffled_page_table(batch: int, capacity: int, page_size: int, spare: int, seed: int) -> tuple[torch.Tensor, int]:
    max_pages = -(-capacity // page_size)
    num_pages = batch * max_pages + spare
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)[: batch * max_pages]
    return perm.view(batch, max_pages).to(torch.int32), num_pages


def expected_store(x, fmt, start, capacity, head_dim):
    """Reference contiguous store [B, H, capacity, ...]: sentinel everywhere not written."""
    batch, seq, heads, _ = x.shape
    data, scale = make_store(fmt, batch, heads, capacity, head_dim, "cpu")
    q, s = quantize(x.cpu(), fmt)  # [B, S, H, ...]
    for b in range(batch):
        for t in range(seq):
            pos = int(start[b]) + t
            if 0 <= pos < capacity:
                data[b, :, pos] = q[b, t]
                if scale is not None:
                    scale[b, :, pos] = s[b, t]
    return data, scale


def to_pages(data, page_table, num_pages, page_size):
    """Scatter a contiguous [B, H, capacity, ...] store into a sentinel-filled page pool."""
    batch, heads, capacity = data.shape[:3]
    pool = torch.empty((num_pages, heads, page_size, *data.shape[3:]), dtype=data.dtype)
    pool.view(torch.uint8).fill_(SENTINEL)
    for b in range(batch):
        for j in range(page_table.shape[1]):
            lo, hi = j * page_size, min((j + 1) * page_size, capacity)
            pool[int(page_table[b, j]), :, : hi - lo] = data[b, :, lo:hi]
    return pool


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # d = 1e7/127 -> fp16 inf, on purpose
@pytest.mark.parametrize("device, store", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_block_formats_match_gguf(fmt, dtype, device, store):
    """Bit-exact vs gguf: every edge-case block, 3 blocks per head (D=96), 3 heads."""
    f32 = dtype == torch.float32
    x = edge_input((2, 3, 3, 96), seed=1, f32_only=f32).to(dtype)  # f16 would turn 1e7 into inf
    start = torch.tensor([1, 4], dtype=torch.int32)
    capacity = 8
    data, scale = make_store(fmt, 2, 3, capacity, 96, device)
    store(x.to(device), data, scale, start.to(device), fmt)

    exp_data, exp_scale = expected_store(x, fmt, start, capacity, 96)
    assert same_bytes(data, exp_data) and same_bytes(scale, exp_scale)

    # The written rows, as llama.cpp blocks, against gguf's own quantizer and dequantizer.
    rows_d = torch.stack([data[b, :, int(start[b]):int(start[b]) + 3].transpose(0, 1) for b in range(2)])
    rows_s = torch.stack([scale[b, :, int(start[b]):int(start[b]) + 3].transpose(0, 1) for b in range(2)])
    ours = to_gguf_blocks(rows_d, rows_s, fmt)
    with np.errstate(all="ignore"):
        theirs = gguf.quantize(x.float().numpy(), GGUF_TYPE[fmt])
        theirs_deq = gguf.dequantize(theirs, GGUF_TYPE[fmt])
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs)
    with np.errstate(all="ignore"):
        ours_deq = dequantize(rows_d.cpu(), rows_s.cpu(), fmt).numpy()
    assert np.array_equal(ours_deq, theirs_deq, equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees 1/d overflow, on purpose
@pytest.mark.parametrize("device, store", PATHS)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_blocks_too_tiny_for_gguf_are_defined(fmt, device, store):
    """amax ~1e-38 (float32 subnormals): 1/d overflows, gguf's codes are undefined (float -> int of
    inf/NaN). Ours are clamped and deterministic, equal to the reference; d is fp16 0, values 0."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 1, 2, 64, generator=g) * 1e-39
    x[0, 0, 0, :32] = 0.0
    x[0, 0, 0, 5] = 3e-39
    data, scale = make_store(fmt, 1, 2, 1, 64, device)
    store(x.to(device), data, scale, torch.zeros(1, dtype=torch.int32, device=device), fmt)
    exp_data, exp_scale = expected_store(x, fmt, torch.zeros(1, dtype=torch.int32), 1, 64)
    assert same_bytes(data, exp_data) and same_bytes(scale, exp_scale)
    assert not dequantize(data.cpu(), scale.cpu(), fmt).any()


@pytest.mark.parametrize("device, store", PATHS)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_many_random_blocks_match_gguf(fmt, device, store):
    """Bit-exact vs gguf on 4096 blocks of normal data at block scales from 1e-6 to 1e4 (a 64-token
    prefill chunk, 8 KV heads of 256 values: 64 groups per program)."""
    g = torch.Generator().manual_seed(7)
    block_scale = 10.0 ** torch.empty(1, 64, 8, 8, 1).uniform_(-6, 4, generator=g)
    x = (torch.randn(1, 64, 8, 8, 32, generator=g) * block_scale).reshape(1, 64, 8, 256)
    data, scale = make_store(fmt, 1, 8, 64, 256, device)
    store(x.to(device), data, scale, torch.zeros(1, dtype=torch.int32, device=device), fmt)
    ours = to_gguf_blocks(data[0].transpose(0, 1), scale[0].transpose(0, 1), fmt)
    assert np.array_equal(ours, gguf.quantize(x[0].numpy(), GGUF_TYPE[fmt]))


@pytest.mark.parametrize("device, store", PATHS)
@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("seq, starts", [(1, [0, 12, 5, 9, 3]), (5, [0, 8, 3, 1, 6])])
@pytest.mark.parametrize("paged", [False, True])
def test_all_formats_exact_with_poison(fmt, seq, starts, paged, device, store):
    """Whole store equals the reference store: written rows bit-exact, all else still sentinel.

    Batch 5, capacity 13 and page size 4 (the last page is partial), shuffled pages plus 3 spare.
    """
    batch, heads, head_dim, capacity, page_size = 5, 2, 64, 13, 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, seq, heads, head_dim, generator=g) * torch.exp(torch.randn(batch, seq, heads, 1, generator=g))
    start = torch.tensor(starts, dtype=torch.int32)
    exp_data, exp_scale = expected_store(x, fmt, start, capacity, head_dim)
    if paged:
        pt, num_pages = shuffled_page_table(batch, capacity, page_size, spare=3, seed=3)
        data, scale = make_store(fmt, num_pages, heads, page_size, head_dim, device)
        store(x.to(device), data, scale, start.to(device), fmt, page_table=pt.to(device), capacity=capacity)
        exp_data = to_pages(exp_data, pt, num_pages, page_size)
        exp_scale = None if exp_scale is None else to_pages(exp_scale, pt, num_pages, page_size)
    else:
        data, scale = make_store(fmt, batch, heads, capacity, head_dim, device)
        store(x.to(device), data, scale, start.to(device), fmt)
    assert same_bytes(data, exp_data)
    assert scale is None if exp_scale is None else same_bytes(scale, exp_scale)


@pytest.mark.parametrize("device, store", PATHS)
def test_fp8_error_bound(device, store):
    """fp8 e4m3 with a per-row scale: |x - deq| <= 2^-4 |x| + 2^-10 scale (half an ulp of a 3-bit
    mantissa in the normal range; half the 2^-9 subnormal step below it), times 1.0001 for the
    fp32 rounding of the scale and the division. All-zero rows give scale 0 and exact zeros."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 128, generator=g) * 10.0 ** torch.empty(2, 3, 4, 1).uniform_(-3, 3, generator=g)
    x[1, 2, 3] = 0.0
    data, scale = make_store("fp8", 2, 4, 3, 128, device)
    store(x.to(device), data, scale, torch.zeros(2, dtype=torch.int32, device=device), "fp8")
    deq = dequantize(data.cpu(), scale.cpu(), "fp8").transpose(1, 2)  # [B, S, H, D]
    s = scale.cpu().transpose(1, 2)[..., None]
    bound = (2.0 ** -4 * x.abs() + 2.0 ** -10 * s) * 1.0001
    assert bool(((deq - x).abs() <= bound).all())
    assert float(scale[1, 3, 2]) == 0.0 and bool((deq[1, 2, 3] == 0).all())
    assert bool(torch.isfinite(deq).all())
    # The row maximum is exactly representable: it maps to 448 * scale.
    assert bool((data.cpu().float().abs().amax(-1)[scale.cpu() > 0] == 448).all())


@pytest.mark.parametrize("device, store", PATHS)
@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_nan_inf_confined_to_their_group(fmt, device, store):
    """A NaN/Inf makes its own scale group (32-value block; fp8: the row) NaN and nothing else:
    other blocks of the row, other heads and other tokens equal the clean quantization exactly.
    f16/bf16 keep NaN/Inf element-wise."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 2, 64, generator=g)
    bad = x.clone()
    bad[0, 1, 0, 35] = float("nan")  # block 1 of head 0
    bad[1, 0, 1, 2] = float("inf")   # block 0 of head 1
    bad[1, 1, 0, 63] = float("-inf")  # block 1 of head 0
    data, scale = make_store(fmt, 2, 2, 2, 64, device)
    store(bad.to(device), data, scale, torch.zeros(2, dtype=torch.int32, device=device), fmt)
    got = dequantize(data.cpu(), scale.cpu() if scale is not None else None, fmt).transpose(1, 2)
    clean = dequantize(*quantize(x, fmt), fmt)
    group = torch.zeros_like(x, dtype=torch.bool)  # where NaN is allowed
    if fmt in ("f16", "bf16"):
        group = ~torch.isfinite(bad)
        torch.testing.assert_close(got[group], bad[group].float(), rtol=0, atol=0, equal_nan=True)
    else:
        for (b, s, h, i) in ((0, 1, 0, 35), (1, 0, 1, 2), (1, 1, 0, 63)):
            lo, hi = (i // 32 * 32, i // 32 * 32 + 32) if fmt != "fp8" else (0, 64)
            group[b, s, h, lo:hi] = True
        assert bool(got[group].isnan().all())
    assert torch.equal(got[~group], clean[~group])


@pytest.mark.parametrize("store", [kv_store, kv_store_triton], ids=["torch", "triton"])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "fp8", "bf16"])
@pytest.mark.parametrize("paged", [False, True])
def test_out_of_range_positions_are_skipped(fmt, paged, store):
    """Without host validation (as in a CUDA graph) a position outside the cache, or a page-table
    entry outside the pool, is not written at all; in-range tokens of the same call still are."""
    batch, heads, head_dim, capacity, page_size = 3, 1, 32, 6, 2
    x = torch.randn(batch, 2, heads, head_dim)
    start = torch.tensor([-1, capacity - 1, 2], dtype=torch.int32)
    # Written: b0 pos 0; b1 pos 5; b2 pos 2, 3 (on page 1, which the page table breaks when paged).
    exp_data, exp_scale = expected_store(x, fmt, start, capacity, head_dim)
    if paged:
        pt, num_pages = shuffled_page_table(batch, capacity, page_size, spare=1, seed=6)
        exp_data = to_pages(exp_data, pt, num_pages, page_size)
        exp_scale = None if exp_scale is None else to_pages(exp_scale, pt, num_pages, page_size)
        broken_page = int(pt[2, 1])
        exp_data[broken_page].view(torch.uint8).fill_(SENTINEL)
        if exp_scale is not None:
            exp_scale[broken_page].view(torch.uint8).fill_(SENTINEL)
        pt[2, 1] = num_pages + 5
        data, scale = make_store(fmt, num_pages, heads, page_size, head_dim, "cpu")
        store(x, data, scale, start, fmt, page_table=pt, validate=False)
    else:
        data, scale = make_store(fmt, batch, heads, capacity, head_dim, "cpu")
        store(x, data, scale, start, fmt, validate=False)
    assert same_bytes(data, exp_data)
    assert scale is None or same_bytes(scale, exp_scale)


@pytest.mark.parametrize("store", [kv_store, kv_store_triton], ids=["torch", "triton"])
def test_non_contiguous_input(store):
    """Strided [B, S, H, D] views (from [B, H, S, D], and every other head) are read correctly."""
    base = torch.randn(2, 6, 3, 64)  # [B, 2H, S, D]
    x = base[:, ::2].transpose(1, 2)  # [B, S=3, H=3, D], strides neither contiguous nor dense
    start = torch.tensor([0, 2], dtype=torch.int32)
    for fmt in ("q4_0", "fp8"):
        data, scale = make_store(fmt, 2, 3, 5, 64, "cpu")
        store(x, data, scale, start, fmt)
        exp_data, exp_scale = expected_store(x.contiguous(), fmt, start, 5, 64)
        assert same_bytes(data, exp_data) and same_bytes(scale, exp_scale)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf/NaN, on purpose
@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("paged", [False, True])
def test_torch_path_equals_kernel(fmt, paged):
    """The CPU's torch path and the Triton kernel (interpreter) write the same bytes: odd sizes (3
    sequences, 5 new tokens, 3 heads of 96 values, capacity 11, pages of 3), values over many scales,
    all-zero blocks, and scale groups holding NaN, +-Inf, or both. f16 NaNs are compared as NaN (their
    payload is not kept); every other byte must be equal."""
    batch, seq, heads, head_dim, capacity, page_size = 3, 5, 3, 96, 11, 3
    g = torch.Generator().manual_seed(11)
    x = edge_input((batch, seq, heads, head_dim), seed=12)
    x[0, 1, 2, :32] = 0.0
    x[1, 0, 0, 7] = float("nan")
    x[1, 3, 1, 40] = float("inf")
    x[2, 4, 2, 95] = float("-inf")
    x[2, 2, 0, 3], x[2, 2, 0, 70] = float("nan"), float("inf")
    start = torch.randint(0, capacity - seq + 1, (batch,), generator=g, dtype=torch.int32)
    got = {}
    for store in (kv_store, kv_store_triton):
        if paged:
            pt, num_pages = shuffled_page_table(batch, capacity, page_size, spare=2, seed=13)
            data, scale = make_store(fmt, num_pages, heads, page_size, head_dim, "cpu")
            store(x, data, scale, start, fmt, page_table=pt, capacity=capacity)
        else:
            data, scale = make_store(fmt, batch, heads, capacity, head_dim, "cpu")
            store(x, data, scale, start, fmt)
        got[store] = data, scale
    (d_torch, s_torch), (d_triton, s_triton) = got[kv_store], got[kv_store_triton]
    if fmt == "f16":  # NaN payloads are not kept in f16 (each device writes its own NaN)
        nan = d_torch.isnan()
        assert torch.equal(nan, d_triton.isnan()) and int(nan.sum()) == 2  # the NaN inputs
        d_torch, d_triton = d_torch[~nan], d_triton[~nan]
    assert same_bytes(d_torch, d_triton)
    assert s_torch is None if s_triton is None else same_bytes(s_torch, s_triton)
    if s_torch is not None:
        # Poisoned groups: five 32-value blocks, in four rows.
        assert int(s_torch.isnan().sum()) == (4 if fmt == "fp8" else 5)


def _bad_calls():
    x = torch.randn(2, 3, 2, 64)
    start = torch.zeros(2, dtype=torch.int32)
    data, scale = make_store("q8_0", 2, 2, 8, 64, "cpu")
    pt, num_pages = shuffled_page_table(2, 8, 4, spare=0, seed=0)
    pdata, pscale = make_store("q8_0", num_pages, 2, 4, 64, "cpu")
    d48, s48 = torch.zeros(2, 2, 8, 48, dtype=torch.int8), torch.zeros(2, 2, 8, 1, dtype=torch.float16)
    return [
        ("fmt", lambda: kv_store(x, data, scale, start, "q5_0")),
        ("x must be a 4-D", lambda: kv_store(x[0], data, scale, start, "q8_0")),
        ("x dtype", lambda: kv_store(x.to(torch.int32), data, scale, start, "q8_0")),
        ("head_dim 48", lambda: kv_store(torch.randn(2, 3, 2, 48), d48, s48, start, "q8_0")),
        ("data must be", lambda: kv_store(x, data.to(torch.uint8), scale, start, "q8_0")),
        ("data must be", lambda: kv_store(x, data[:, :1], scale, start, "q8_0")),
        ("scale must be", lambda: kv_store(x, data, scale.float(), start, "q8_0")),
        ("scale must be", lambda: kv_store(x, data, None, start, "q8_0")),
        ("start must be int32", lambda: kv_store(x, data, scale, start.long(), "q8_0")),
        ("start must be int32", lambda: kv_store(x, data, scale, start[:1], "q8_0")),
        ("capacity", lambda: kv_store(x, data, scale, torch.tensor([0, 6], dtype=torch.int32), "q8_0")),
        ("start positions must be >= 0", lambda: kv_store(x, data, scale, torch.tensor([-1, 0], dtype=torch.int32), "q8_0")),
        ("capacity must be", lambda: kv_store(x, data, scale, start, "q8_0", capacity=9)),
        ("contiguous data batch", lambda: kv_store(x[:1], data, scale, start[:1], "q8_0")),
        ("page_table must be int32", lambda: kv_store(x, pdata, pscale, start, "q8_0", page_table=pt.long())),
        ("page_table holds", lambda: kv_store(x, pdata, pscale, start, "q8_0",
                                              page_table=torch.full_like(pt, num_pages))),
        ("k_new", lambda: kv_store(x[0], data, scale, start, "q8_0", name="k_new")),
    ]


@pytest.mark.parametrize("match, call", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise(match, call):
    with pytest.raises(ValueError, match=match):
        call()
