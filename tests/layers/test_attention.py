"""attend(): the graph-capturable (static-shape) torch attention equals the exact per-sequence path, and bad
backends are refused.

Both paths compute the same softmax over the same live keys; the static path only adds masked keys, so
the results agree to float32 rounding (1e-5 relative) for every backend, format and layout.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.layers.attention import attend
from glmtg.kv_cache import KVCache


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("fmt, page_size", [("f16", None), ("q8_0", 16), ("bf16", 16)])
@pytest.mark.parametrize("s", [1, 3])
def test_static_shapes_equal_per_sequence(backend, fmt, page_size, s):
    g = torch.Generator().manual_seed(s)
    batch, hkv, groups, d, capacity = 3, 2, 6, 64, 40
    cache = KVCache(num_layers=1, batch=batch, capacity=capacity, num_kv_heads=hkv, head_dim=d,
                    k_format=fmt, page_size=page_size)
    lengths = torch.tensor([s, 29, 40], dtype=torch.int32)
    kv = torch.randn(2, batch, capacity, hkv, d, generator=g)
    cache.append(0, kv[0], kv[1], torch.zeros(batch, dtype=torch.int32))
    q = torch.randn(batch, s, hkv * groups, d, generator=g)
    exact = attend(q, cache, 0, lengths, backend, d ** -0.5, static_shapes=False)
    static = attend(q, cache, 0, lengths, backend, d ** -0.5, static_shapes=True)
    err = ((static - exact).norm() / exact.norm()).item()
    assert err < 1e-5, f"static path differs from the exact path: {err:.2e}"


def test_unknown_backend_raises():
    cache = KVCache(num_layers=1, batch=1, capacity=4, num_kv_heads=2, head_dim=64)
    q = torch.zeros(1, 1, 4, 64)
    with pytest.raises(ValueError, match="backend"):
        attend(q, cache, 0, torch.ones(1, dtype=torch.int32), "nope", 0.1)
