"""DenseLinear: shards are written into their rows at load time and the forward equals separate products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmtg.layers.linear import DenseLinear


def test_fused_shards_equal_separate_projections():
    # Shard sizes 7, 3, 5 (odd), input 11: each shard's rows are one projection; float64 so that the fused and
    # separate products agree to the last bit of summation order (tolerance 1e-12).
    g = torch.Generator().manual_seed(0)
    shards = (("q", 7), ("k", 3), ("v", 5))
    with torch.device("meta"):
        lin = DenseLinear(11, shards, bias=True, dtype=torch.float64)
    parts = {n: (torch.randn(r, 11, generator=g, dtype=torch.float64), torch.randn(r, generator=g, dtype=torch.float64))
             for n, r in shards}
    for name, (w, b) in parts.items():
        lin.load_shard("weight", name, w)
        lin.load_shard("bias", name, b)
    assert not lin.weight.is_meta and lin.weight.shape == (15, 11)
    assert [(p, s, shape) for p, s, shape in lin.slots()] == [
        ("weight", "q", (7, 11)), ("bias", "q", (7,)), ("weight", "k", (3, 11)), ("bias", "k", (3,)),
        ("weight", "v", (5, 11)), ("bias", "v", (5,))]
    x = torch.randn(2, 4, 11, generator=g, dtype=torch.float64)
    for got, (name, (w, b)) in zip(lin.split(lin(x)), parts.items()):
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=0, atol=1e-12, msg=name)


def test_whole_parameter_is_assigned_without_a_copy_and_bad_input_is_refused():
    with torch.device("meta"):
        lin = DenseLinear(4, 6, bias=False, dtype=torch.float32)
    w = torch.randn(6, 4)
    lin.load_shard("weight", None, w)
    assert lin.weight.data_ptr() == w.data_ptr()
    with pytest.raises(ValueError, match="param must be"):
        lin.load_shard("bias", None, torch.zeros(6))
    with pytest.raises(ValueError, match="expected shape"):
        lin.load_shard("weight", None, torch.zeros(4, 6))
    with pytest.raises(ValueError, match="expected dtype"):
        lin.load_shard("weight", None, torch.zeros(6, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="shard must be"):
        DenseLinear(4, (("gate", 3), ("up", 3)), bias=False, dtype=torch.float32).load_shard("weight", "down", w)
    with pytest.raises(ValueError, match="out must be"):
        DenseLinear(4, 0, bias=False, dtype=torch.float32)
