"""prefill_attention: causal attention of a chunk of S new tokens over the cached prefix and itself.

CPU (interpreter): float64 attention over the *dequantized* cache (glmtg.formats.dequantize, the
kv_cache module's reading) is the reference, so the dequantized values are exact and only the kernel's
roundings differ:
- fp16 queries: K/V values rounded to fp16 (exact for q8_0/q4_0/fp8: codes times an fp16 scale, rounded
  once; f16 stores are already fp16), P rounded to fp16 (2^-11) before P @ V, fp32 accumulation, output
  rounded to fp16 -> 2e-3 relative (norm over the whole output), the decode tests' bound.
- fp32 queries over an fp32 store (IEEE dots): only fp32 accumulation order -> 1e-5 relative.
Every slot past a sequence's length holds NaN (values or scales) and the output starts NaN, so a read past
the context or an unwritten row fails. The 16 x 16 CPU tiles make tiny shapes cross several row tiles
(with padding rows) and key tiles (unmasked, and on the diagonal).

GPU: bf16 GLM shapes (96/8, D = 128, S = 4096 over prefixes 0 and 16k) against torch SDPA on the
dequantized cache in bf16: both round to bf16 (2^-8) in different places -> 1.5e-2 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmtg.formats import dequantize
from glmtg.kernels.attention.prefill_launch import plan_prefill, prefill_attention
from tests.references.attention import decode_attention_ref


def _run(cache, q, **kwargs):
    """prefill_attention of q over layer 0 of ``cache`` into a NaN-poisoned output."""
    kv, vv = cache.k(0), cache.v(0)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv.data, vv.data, cache.lengths, page_table=cache.page_table, k_scale=kv.scale,
                      v_scale=vv.scale, k_format=kv.format, v_format=vv.format, out=out, **kwargs)
    return out


def _reference(cache, q):
    """float64 causal attention over the dequantized cache (poisoned slots past the lengths zeroed)."""
    kv, vv = cache.k(0), cache.v(0)
    k = dequantize(kv.data, kv.scale, kv.format).nan_to_num(0.0)
    v = dequantize(vv.data, vv.scale, vv.format).nan_to_num(0.0)
    pt = None if cache.page_table is None else cache.page_table.cpu()
    ref, _ = decode_attention_ref(q.cpu(), k.cpu(), v.cpu(), cache.lengths.cpu(), pt)
    return ref


def _rel_err(out, ref):
    assert not torch.isnan(out).any(), "unwritten output or NaN read from past the context"
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


FORMATS_CPU = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("fp8", "fp8"), ("q8_0", "q4_0")]


@pytest.mark.parametrize("k_format, v_format", FORMATS_CPU)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("page_size", [None, 8])
def test_prefill_formats_cpu(k_format, v_format, group, page_size, filled_cache):
    """Batch 2 with different starts: 13 new tokens over prefixes 0 and 37, D = 64."""
    s, prefixes = 13, [0, 37]
    lengths = [p + s for p in prefixes]
    cache = filled_cache(2, 2, 64, lengths, 56, k_format, v_format, "cpu", page_size=page_size, seed=group)
    q = torch.randn(2, s, 2 * group, 64).half()
    err = _rel_err(_run(cache, q), _reference(cache, q))
    assert err < 2e-3, f"relative error {err:.2e}"


@pytest.mark.parametrize("s, prefixes", [(5, [7, 0]), (9, [37, 7])])
def test_prefill_fp32_head_dim_128_cpu(s, prefixes, filled_cache):
    """fp32 queries over an fp32 store (format None), D = 128, odd chunk and prefix sizes."""
    lengths = [p + s for p in prefixes]
    cache = filled_cache(2, 1, 128, lengths, 48, "f16", "f16", "cpu", seed=s)
    kv, vv = cache.k(0), cache.v(0)
    k32, v32 = kv.data.float(), vv.data.float()  # the NaN poison carries over
    q = torch.randn(2, s, 3, 128)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k32, v32, cache.lengths, out=out)
    err = _rel_err(out, _reference(cache, q))
    assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("fa2_step", [True, False], ids=["fa2-step", "decode-step"])
@pytest.mark.parametrize("k_format, v_format", [("q4_0", "fp8"), ("fp8", "q8_0")])
def test_prefill_tile_shapes_cpu(fa2_step, k_format, v_format, filled_cache):
    """32-row x 32-key tiles (group 3: a tile boundary inside a token's heads), a 16-key paged cache, fp8 on
    each side (its row scale is applied to scores or probabilities), with either online-softmax step."""
    s, lengths = 11, [11 + 37, 11 + 7]
    cache = filled_cache(2, 2, 64, lengths, 64, k_format, v_format, "cpu", page_size=16, seed=5)
    q = torch.randn(2, s, 6, 64).half()
    out = _run(cache, q, launch=plan_prefill(64, q.device, block_m=32, block_n=32, fa2_step=fa2_step))
    err = _rel_err(out, _reference(cache, q))
    assert err < 2e-3, f"relative error {err:.2e}"


def test_prefill_bad_arguments(filled_cache):
    cache = filled_cache(1, 2, 64, [10], 16, "q8_0", "q8_0", "cpu")
    kv, vv = cache.k(0), cache.v(0)
    q = torch.randn(1, 11, 12, 64).half()
    with pytest.raises(ValueError, match=r"lengths must lie in \[S=11"):
        prefill_attention(q, kv.data, vv.data, cache.lengths, k_scale=kv.scale, v_scale=vv.scale,
                          k_format="q8_0", v_format="q8_0")
    with pytest.raises(ValueError, match="head_dim 96"):
        prefill_attention(torch.randn(1, 2, 12, 96).half(), kv.data, vv.data, cache.lengths,
                          k_scale=kv.scale, v_scale=vv.scale, k_format="q8_0", v_format="q8_0")
    with pytest.raises(ValueError, match="multiple of cache KV heads"):
        prefill_attention(torch.randn(1, 2, 3, 64).half(), kv.data, vv.data, cache.lengths,
                          k_scale=kv.scale, v_scale=vv.scale, k_format="q8_0", v_format="q8_0")
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        plan_prefill(64, q.device, block_n=48)


# ---------------------------------------------------------------- GPU, GLM shapes, bf16

def _sdpa_reference(cache, q):
    """torch SDPA on the dequantized cache in bf16, per sequence, lower-right causal.

    K/V are repeated to the query heads and the mask is torch's causal bias, so that SDPA takes a fused
    kernel (flash or memory-efficient) rather than the math fallback a boolean mask with GQA sends it to
    (fp32 scores of [Hq, S, n]: tens of GB at these shapes)."""
    from torch.nn.attention.bias import causal_lower_right

    s, groups = q.shape[1], q.shape[2] // cache.num_kv_heads
    out = torch.empty_like(q)
    for b, n in enumerate(cache.lengths.tolist()):
        k, v = (x.to(q.dtype).repeat_interleave(groups, 0)[None] for x in cache.dequantized(0, b, n))  # [1, Hq, n, D]
        ob = F.scaled_dot_product_attention(q[b].transpose(0, 1)[None], k, v, attn_mask=causal_lower_right(s, n))[0]
        out[b] = ob.transpose(0, 1)
    return out


def _check_against_sdpa(cache, q) -> None:
    """The kernel's output against SDPA on the dequantized cache: every element written, 1.5e-2 relative
    (bf16 q and output, P rounded to the dot dtype; SDPA rounds differently)."""
    out = _run(cache, q)
    ref = _sdpa_reference(cache, q)
    assert not torch.isnan(out).any()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1.5e-2, f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0", "fp8"])
@pytest.mark.parametrize("prefix", [0, 16384])
def test_gpu_glm_shapes(fmt, prefix, filled_cache):
    s = 4096
    cache = filled_cache(1, 8, 128, [prefix + s], prefix + s + 64, fmt, fmt, "cuda", seed=prefix + 1)
    q = torch.randn(1, s, 96, 128, device="cuda").bfloat16()
    _check_against_sdpa(cache, q)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0", "fp8"])
def test_gpu_paged_ragged(fmt, filled_cache):
    """Batch 2 with different starts over a paged cache (64-token pages), 24 query heads per KV head."""
    s, prefixes = 1000, [3001, 0]
    cache = filled_cache(2, 2, 128, [p + s for p in prefixes], 4096, fmt, fmt, "cuda", page_size=64, seed=7)
    q = torch.randn(2, s, 48, 128, device="cuda").bfloat16()
    _check_against_sdpa(cache, q)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "q4_0"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_gpu_attend_takes_prefill_kernel(fmt, page_size, monkeypatch, filled_cache):
    """attend(backend="glmtg") on a 100-token chunk launches the prefill kernel, and agrees with "sdpa"."""
    from glmtg.kernels import attention as kernels
    from glmtg.layers.attention import attend

    launches = []
    real = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    s, prefixes = 100, [37, 250]
    cache = filled_cache(2, 2, 128, [p + s for p in prefixes], 400, fmt, fmt, "cuda", page_size=page_size, seed=9)
    q = torch.randn(2, s, 24, 128, device="cuda").bfloat16()
    out = attend(q, cache, 0, cache.lengths, "glmtg", 128 ** -0.5)
    ref = attend(q, cache, 0, cache.lengths, "sdpa", 128 ** -0.5)
    assert launches == [1]
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1.5e-2, f"relative error {err:.2e}"


def test_prefill_rejects_page_indices_outside_the_pool():
    # the live pages of a paged cache are checked on the host (launch.checked_problem, as decode does): a
    # bad index would otherwise be read by the kernel
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 17, 2, 64, generator=g).half()
    k = torch.randn(2, 1, 16, 64, generator=g).half()
    lengths = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(ValueError, match="page indices outside"):
        prefill_attention(q, k, k.clone(), lengths, page_table=torch.tensor([[0, 5]], dtype=torch.int32))
