"""decode_attention against the float64 reference.

Tolerances (relative Frobenius error of the output, max |error| of the natural-log LSE):
- fp32: the kernel uses IEEE fp32 dots; only summation order differs -> 1e-5 / 1e-5.
- fp16: P is rounded to fp16 (2^-11) before the PV dot and the output is rounded to fp16 -> 2e-3 / 1e-3.
- bf16 (GPU): the same roundings with 2^-8 -> 1.5e-2 / 1e-2.
Cache slots beyond each length are filled with NaN, and outputs are poisoned with NaN before the
call, so a masked-load bug or an unwritten element cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from glmtg.kernels.attention import decode_attention, plan_launch
from glmtg.kernels.attention import launch as launcher
from tests.references.attention import decode_attention_ref

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.5e-2, 1e-2)}


def make_case(batch, sq, hq, hkv, d, lengths, capacity, dtype, device, page_size=None, seed=0):
    """Random q and cache; every slot past a sequence's length holds NaN."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(batch, hkv, capacity, d, generator=g).to(dtype)
    v = torch.randn(batch, hkv, capacity, d, generator=g).to(dtype)
    for b, n in enumerate(lengths):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    lens = torch.tensor(lengths, dtype=torch.int32)
    case = dict(q=q.to(device), k=k.to(device), v=v.to(device), lengths=lens.to(device), page_table=None)
    if page_size is not None:
        case.update(to_paged(k, v, page_size, g, device))
    return case


def to_paged(k, v, page_size, g, device):
    """Scatter a contiguous cache into shuffled pages (plus spare NaN pages) with a page table."""
    batch, hkv, capacity, d = k.shape
    pages_per_seq = math.ceil(capacity / page_size)
    num_pages = batch * pages_per_seq + 3
    perm = torch.randperm(num_pages, generator=g)[: batch * pages_per_seq].view(batch, pages_per_seq)
    kp = torch.full((num_pages, hkv, page_size, d), float("nan"), dtype=k.dtype)
    vp = kp.clone()
    for b in range(batch):
        for j in range(pages_per_seq):
            lo, hi = j * page_size, min((j + 1) * page_size, capacity)
            kp[perm[b, j], :, : hi - lo] = k[b, :, lo:hi]
            vp[perm[b, j], :, : hi - lo] = v[b, :, lo:hi]
    return dict(k=kp.to(device), v=vp.to(device), page_table=perm.to(torch.int32).to(device))


def run_and_check(case, dtype, **kwargs):
    q = case["q"]
    out = torch.full_like(q, float("nan"))
    out, lse = decode_attention(q, case["k"], case["v"], case["lengths"], page_table=case["page_table"],
                                return_lse=True, out=out, **kwargs)
    ref, ref_lse = decode_attention_ref(q, case["k"], case["v"], case["lengths"].cpu(),
                                        None if case["page_table"] is None else case["page_table"].cpu(),
                                        kwargs.get("scale"))
    assert not torch.isnan(out).any(), "some output elements were not written (or NaN leaked from the cache)"
    assert not torch.isnan(lse).any()
    rel_tol, lse_tol = TOL[dtype]
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < rel_tol, f"relative error {err:.2e} >= {rel_tol}"
    lse_err = (lse.double().cpu() - ref_lse).abs().max()
    assert lse_err < lse_tol, f"LSE error {lse_err:.2e} >= {lse_tol}"
    return out


# ---------------------------------------------------------------- CPU (Triton interpreter), small

@pytest.mark.parametrize("group", [1, 5, 12, 24])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_group_sizes_mixed_lengths(group, head_dim):
    hkv = 2 if group <= 12 else 1
    case = make_case(3, 1, group * hkv, hkv, head_dim, [1, 97, 45], 101, torch.float16, "cpu", seed=group)
    run_and_check(case, torch.float16)


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_split_counts_agree(num_splits):
    case = make_case(2, 1, 12, 1, 64, [83, 130], 131, torch.float32, "cpu", seed=num_splits)
    launch = plan_launch(2, 1, 12, 64, 131, torch.device("cpu"), num_splits=num_splits, block_n=16)
    run_and_check(case, torch.float32, launch=launch)


@pytest.mark.parametrize("num_splits", [1, 3], ids=["direct", "merged"])
def test_out_in_another_dtype_is_one_rounding(num_splits):
    # ``out`` in another dtype than q (a bf16 model reading an f16 cache): the fp32 result is rounded once
    # into it, in the direct write and in the merge. An fp32 out holds the unrounded result, so rounding it
    # to q's dtype afterwards must give the f16 call's output bit for bit.
    case = make_case(2, 1, 6, 2, 64, [19, 40], 41, torch.float16, "cpu", seed=5)
    launch = plan_launch(2, 1, 6, 64, 41, torch.device("cpu"), num_splits=num_splits, block_n=16)
    args = (case["q"], case["k"], case["v"], case["lengths"])
    wide = torch.full(case["q"].shape, float("nan"), dtype=torch.float32)
    assert decode_attention(*args, launch=launch, out=wide) is wide
    assert torch.equal(wide.to(torch.float16), decode_attention(*args, launch=launch))
    with pytest.raises(ValueError, match="out must match q in shape"):
        decode_attention(*args, launch=launch, out=torch.empty(2, 1, 6, 32))


@pytest.mark.parametrize("merge_block", [2, 256], ids=["merge-loop", "merge-one-pass"])
def test_merge_paths_agree(monkeypatch, merge_block):
    # More splits than the merge loads at once take its two-pass loop; GPUs reach it past 256 splits.
    monkeypatch.setattr(launcher, "MERGE_SPLIT_BLOCK", merge_block)
    case = make_case(2, 1, 12, 1, 64, [83, 130], 131, torch.float32, "cpu", seed=merge_block)
    launch = plan_launch(2, 1, 12, 64, 131, torch.device("cpu"), num_splits=7, block_n=16)
    run_and_check(case, torch.float32, launch=launch)


@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_equals_contiguous(page_size):
    lengths = [70, 1, 33]
    contiguous = make_case(3, 1, 10, 2, 64, lengths, 75, torch.float16, "cpu", seed=7)
    paged = make_case(3, 1, 10, 2, 64, lengths, 75, torch.float16, "cpu", page_size=page_size, seed=7)
    a = run_and_check(contiguous, torch.float16)
    b = run_and_check(paged, torch.float16)
    assert torch.equal(a, b), "paged and contiguous caches hold the same values and must give identical output"


@pytest.mark.parametrize("sq", [2, 3])
def test_multi_token_causal(sq):
    case = make_case(2, sq, 12, 1, 64, [sq, 59], 64, torch.float32, "cpu", seed=sq)
    run_and_check(case, torch.float32)


def test_multi_token_paged_many_splits():
    case = make_case(2, 4, 10, 2, 64, [4, 90], 96, torch.float16, "cpu", page_size=16, seed=11)
    launch = plan_launch(2, 2, 20, 64, 96, torch.device("cpu"), num_splits=5, block_n=16)
    run_and_check(case, torch.float16, launch=launch)


def test_custom_scale_and_noncontiguous_q():
    case = make_case(1, 1, 24, 2, 128, [77], 80, torch.float32, "cpu", seed=3)
    wide = torch.randn(1, 1, 24, 256)
    case["q"] = wide[..., :128]  # strided heads: stride(2) = 256
    run_and_check(case, torch.float32, scale=0.3)


def test_large_group_splits_query_rows():
    # G * Sq = 160 rows > the 128-row tile: several M tiles, each still one pass over its slice.
    case = make_case(1, 2, 80, 1, 64, [40], 41, torch.float32, "cpu", seed=5)
    run_and_check(case, torch.float32)


# ---------------------------------------------------------------- bad input

def _good(device="cpu"):
    return make_case(2, 1, 12, 1, 64, [5, 9], 16, torch.float16, device)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.update(q=c["q"][0]), "q must be a 4-D"),
        (lambda c: c.update(k=c["k"][0]), "k_cache must be a 4-D"),
        (lambda c: c.update(v=c["v"][:, :, :8]), "v_cache shape"),
        (lambda c: c.update(q=c["q"].float()), "dtype"),
        (lambda c: c.update(q=torch.randn(2, 1, 10, 64, dtype=torch.float16), k=torch.randn(2, 3, 16, 64, dtype=torch.float16),
                            v=torch.randn(2, 3, 16, 64, dtype=torch.float16)), "multiple of cache KV heads"),
        (lambda c: c.update(q=torch.randn(2, 1, 12, 96, dtype=torch.float16), k=torch.randn(2, 1, 16, 96, dtype=torch.float16),
                            v=torch.randn(2, 1, 16, 96, dtype=torch.float16)), "head_dim 96"),
        (lambda c: c.update(lengths=torch.tensor([5, 17], dtype=torch.int32)), "capacity"),
        (lambda c: c.update(lengths=torch.tensor([0, 3], dtype=torch.int32)), ">= Sq"),
        (lambda c: c.update(lengths=torch.tensor([5, 9], dtype=torch.int64)), "lengths must be int32"),
        (lambda c: c.update(lengths=torch.tensor([5], dtype=torch.int32)), "lengths must be int32 of shape"),
        (lambda c: c.update(q=c["q"].repeat(2, 1, 1, 1), lengths=c["lengths"].repeat(2)), "k_cache batch"),
        (lambda c: c.update(page_table=torch.zeros(2, 1, dtype=torch.int64)), "page_table must be int32"),
        (lambda c: c.update(page_table=torch.full((2, 1), 5, dtype=torch.int32)), "page indices"),
    ],
)
def test_bad_input_raises_value_error(mutate, match):
    case = _good()
    mutate(case)
    with pytest.raises(ValueError, match=match):
        decode_attention(case["q"], case["k"], case["v"], case["lengths"], page_table=case["page_table"])


def test_meta_device_mismatch_rejected():
    case = _good()
    with pytest.raises(ValueError, match="lengths is on"):
        decode_attention(case["q"], case["k"], case["v"], case["lengths"].to("meta"))


# ---------------------------------------------------------------- GPU, real sizes, bf16

@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv", [(96, 8), (48, 4), (24, 2), (12, 1), (48, 2), (8, 8), (40, 8)])
def test_gpu_head_configs(hq, hkv):
    case = make_case(1, 1, hq, hkv, 128, [16383], 16400, torch.bfloat16, "cuda", seed=hq + hkv)
    run_and_check(case, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_batch_mixed_lengths(head_dim):
    lengths = [1, 97, 16383, 4000, 2, 513, 31, 8191, 777, 12000, 5, 1500, 64, 65, 3333, 129, 10000, 7, 2049]
    case = make_case(19, 1, 96, 8, head_dim, lengths, 16384, torch.bfloat16, "cuda", seed=head_dim)
    run_and_check(case, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_gpu_paged_equals_contiguous(page_size):
    lengths = [5000, 1, 12345, 700]
    a = run_and_check(make_case(4, 1, 96, 8, 128, lengths, 12400, torch.bfloat16, "cuda", seed=1), torch.bfloat16)
    b = run_and_check(make_case(4, 1, 96, 8, 128, lengths, 12400, torch.bfloat16, "cuda", page_size=page_size, seed=1),
                      torch.bfloat16)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("sq", [2, 4, 7])
def test_gpu_multi_token_causal(sq):
    case = make_case(3, sq, 96, 8, 128, [sq, 4099, 900], 4100, torch.bfloat16, "cuda", page_size=64, seed=sq)
    run_and_check(case, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(dtype):
    case = make_case(2, 1, 60, 5, 128, [3000, 17], 3001, dtype, "cuda", seed=9)
    run_and_check(case, dtype)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_growing_lengths():
    capacity = 20000
    case = make_case(2, 1, 96, 8, 128, [capacity, capacity], capacity, torch.bfloat16, "cuda", seed=4)
    q, k, v = case["q"], case["k"], case["v"]
    # NaN only past the longest length used below, so every replay sees real values.
    lengths = torch.tensor([1, 1], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    launch = plan_launch(2, 8, 12, 128, capacity, q.device)
    decode_attention(q, k, v, lengths, out=out, launch=launch)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, lengths, out=out, launch=launch)
    for lens in ([1, 1], [17, 300], [4097, 1], [12345, 19999], [capacity, 640]):
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = decode_attention_ref(q, k, v, lengths.cpu())
        assert not torch.isnan(out).any()
        err = (out.double().cpu() - ref).norm() / ref.norm()
        assert err < TOL[torch.bfloat16][0], f"lengths {lens}: relative error {err:.2e}"
