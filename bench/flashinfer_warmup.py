"""Trigger FlashInfer's JIT builds for the decode shapes the benchmark uses (bf16, D = 128)."""

import time

import torch

t0 = time.time()
import flashinfer  # noqa: E402

print("flashinfer", flashinfer.__version__, "imported in", round(time.time() - t0, 1), "s", flush=True)
for hq, hkv in [(96, 8), (12, 1), (48, 2)]:
    q = torch.randn(hq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(hkv, 1000, 128, device="cuda", dtype=torch.bfloat16)
    t = time.time()
    flashinfer.single_decode_with_kv_cache(q, k, k, kv_layout="HND", use_tensor_cores=True)
    ws = torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, kv_layout="HND", use_tensor_cores=True)
    ind = torch.arange(3, dtype=torch.int32, device="cuda")
    w.plan(ind, ind[:2], torch.tensor([1000, 999], dtype=torch.int32, device="cuda"), hq, hkv, 128, 1000,
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    kk = torch.randn(2, hkv, 1000, 128, device="cuda", dtype=torch.bfloat16)
    w.run(torch.randn(2, hq, 128, device="cuda", dtype=torch.bfloat16), (kk, kk))
    torch.cuda.synchronize()
    print(f"{hq}/{hkv}: built and ran in {time.time() - t:.1f} s", flush=True)
