"""The model over glmtg.kv_cache.KVCache (f16/bf16/q8_0 storage, contiguous and paged).

Reference: the same float32 model over the float32 stand-in cache, so the only difference is the rounding
of cached K/V. The config is dense-only here: with MoE layers a K/V rounding can flip a near-tied expert
choice and jump one token's logits, which would hide what this test checks (positions, pages, formats).
Measured on logits of size ~1.6: f16 (11 significant bits) 5e-4, bf16 (8 bits) 3e-3, q8_0 (1/254 of each
32-block's max) 1.3e-2; an off-by-one position moves them by 0.25. Tolerances are ~3x the measured error.
"""

from __future__ import annotations


import pytest
import torch

from glmtg.kv_cache import KVCache
from glmtg.loading.presets import random_model
from tests.references.model import glmtg_from_hf, hf_reference, new_cache, tiny

# KVCache.append is a Triton kernel: natively on a CUDA device, in the interpreter (conftest) on a CPU-only one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [("f16", None, "sdpa", 2e-3), ("bf16", 4, "eager", 1e-2), ("q8_0", 3, "glmtg", 4e-2)]


@pytest.mark.parametrize("fmt,page_size,backend,tol", CASES, ids=[f"{c[0]}-page{c[1]}-{c[2]}" for c in CASES])
def test_model_over_kv_cache(fmt, page_size, backend, tol):
    config = tiny(num_hidden_layers=2, first_k_dense_replace=2)
    model = glmtg_from_hf(hf_reference(config, seed=2), config).to(DEVICE)  # std 0.05: attention not flat
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cache = KVCache(num_layers=config.num_hidden_layers, batch=2, capacity=10,
                    num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, k_format=fmt,
                    page_size=page_size, device=DEVICE)
    ref_cache = new_cache(config, batch=2, capacity=10, device=DEVICE)
    for lo, hi in ((0, 5), (5, 6), (6, 8)):  # prefill, one decode step, a 2-token chunk
        got = model(ids[:, lo:hi], cache, attn_backend=backend)
        want = model(ids[:, lo:hi], ref_cache, attn_backend="eager")
        cache.lengths += hi - lo
        ref_cache.lengths += hi - lo
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,page_size", [("bf16", None), ("bf16", 16), ("q8_0", 16), ("q4_0", None)])
def test_glmtg_decode_kernel_matches_sdpa_on_cuda(fmt, page_size):
    # bf16 model on the GPU: the Triton decode kernel (reading bf16 or quantized rows in place) vs SDPA over
    # the same stored rows (dequantized). Both accumulate in fp32 over identical K/V values; bf16 activations
    # through 4 layers leave ~1e-2 on logits.
    config = tiny()
    model = random_model(config, seed=4, device="cuda")
    ids = torch.randint(0, config.vocab_size, (3, 40), device="cuda")
    caches = {b: KVCache(num_layers=config.num_hidden_layers, batch=3, capacity=64,
                         num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, k_format=fmt,
                         page_size=page_size, device="cuda") for b in ("glmtg", "sdpa")}
    for lo, hi in ((0, 32),) + tuple((i, i + 1) for i in range(32, 36)) + ((36, 40),):
        out = {b: model(ids[:, lo:hi], c, attn_backend=b) for b, c in caches.items()}
        for c in caches.values():
            c.lengths += hi - lo
        torch.testing.assert_close(out["glmtg"], out["sdpa"], rtol=0, atol=5e-2)


@pytest.mark.gpu
def test_decode_step_captures_in_cuda_graph():
    # The "glmtg" decode path must have no host sync (the engine captures it): one captured step replayed
    # as lengths grow must give what eager steps give, to the last bit (same kernels, same inputs).
    config = tiny()
    model = random_model(config, seed=5, device="cuda")
    ids = torch.randint(0, config.vocab_size, (2, 14), device="cuda")

    def new():
        c = KVCache(num_layers=config.num_hidden_layers, batch=2, capacity=32,
                    num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, k_format="bf16",
                    device="cuda")
        model(ids[:, :8], c, attn_backend="glmtg")
        c.lengths += 8
        return c

    eager_cache, graph_cache = new(), new()
    token = ids[:, 8:9].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (Triton compiles here)
        model(token, graph_cache, attn_backend="glmtg")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(token, graph_cache, attn_backend="glmtg")
        graph_cache.lengths += 1
    for step in range(8, 14):
        token.copy_(ids[:, step:step + 1])
        graph.replay()
        want = model(ids[:, step:step + 1], eager_cache, attn_backend="glmtg")
        eager_cache.lengths += 1
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert graph_cache.lengths.tolist() == [14, 14]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernel path runs natively (gpu tests)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, from inside the Triton interpreter
def test_glmtg_kernel_path_in_interpreter(monkeypatch):
    # On a CPU the "glmtg" backend falls back to SDPA; here the CUDA check is lifted so that the Triton prefill
    # (17 tokens) and decode kernels themselves run in the interpreter (f16 contiguous; q8_0 K with q4_0 V
    # paged) and must agree with SDPA over the same cache. Both read identical stored K/V (the kernels
    # dequantize in registers, SDPA through KVCache.dequantized) and accumulate in fp32; q and the softmax
    # probabilities are rounded to f16 for the kernels (2^-11 relative each), which moves logits of size ~1.6
    # by ~1e-3 typically and up to ~5.5e-3 at the worst of 34000 (measured): atol 1e-2.
    from glmtg.layers import attention, fused

    calls = []
    real = attention.decode_query_dtype

    def on_cpu_too(is_cuda, tokens, head_dim, dtype, k_view, v_view):  # the real rule, as if on CUDA
        dtype = real(True, tokens, head_dim, dtype, k_view, v_view)
        calls.append(dtype is not None)
        return dtype

    monkeypatch.setattr(attention, "decode_query_dtype", on_cpu_too)
    config = tiny(num_hidden_layers=2, first_k_dense_replace=2)
    model = glmtg_from_hf(hf_reference(config, seed=2), config)
    ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    for k_format, v_format, page_size in (("f16", "f16", None), ("q8_0", "q4_0", 8)):
        caches = {b: KVCache(num_layers=2, batch=2, capacity=24, num_kv_heads=config.num_key_value_heads,
                             head_dim=config.head_dim, k_format=k_format, v_format=v_format, page_size=page_size)
                  for b in ("glmtg", "sdpa")}
        for lo, hi in ((0, 17), (17, 18), (18, 20)):  # prefill above 16 tokens: the prefill kernel; then decode
            # the last run with the fused glue: qk_rope writes q in the kernel's dtype itself (f16 here)
            with fused.mode("on" if hi == 20 else "auto"):
                out = {b: model(ids[:, lo:hi], c, attn_backend=b) for b, c in caches.items()}
            for c in caches.values():
                c.lengths += hi - lo
            torch.testing.assert_close(out["glmtg"], out["sdpa"], rtol=0, atol=1e-2)
    assert all(calls)
