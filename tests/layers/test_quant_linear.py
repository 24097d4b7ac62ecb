"""QuantLinear and QuantEmbedding against float64 products of the registry's decoded blocks.

Weights are random valid blocks (tests/layers/conftest.py), inputs random normal, sizes odd (rows 3..7,
1..3 blocks per row). Tolerance of an fp32 product of K terms: |err| <= K * 2^-24 * Σ|x||w| (the standard
dot-product bound), so each element is checked against 2^-24 * K * (|x| @ |W|ᵀ); a wrong row, shard, format
or bias moves an output by O(Σ|x||w|). The dequantized values themselves are exact in fp32 (gguf decodes
in fp32), so float32 inputs leave only the product's rounding.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.layers.quant_linear import QuantEmbedding, QuantLinear

FORMATS_32 = ("q8_0", "q4_0", "q5_1", "iq4_nl")  # 32-value blocks
FORMATS_256 = ("q4_k", "q6_k", "q3_k", "iq4_xs", "iq2_xs")  # 256-value blocks
HAS_GEMV = importlib.util.find_spec("glmtg.kernels.gguf.gemv") is not None


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = x.double() @ w.T + (0 if b is None else b.double())
    bound = x.double().abs() @ w.abs().T
    tol = w.shape[1] * 2.0 ** -24 * bound + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).abs() <= tol).all(), float(((y.double() - ref).abs() / tol).max())


@pytest.mark.parametrize("fmt", FORMATS_32 + FORMATS_256)
def test_single_format(blocks, fmt):
    random_blocks, values = blocks
    gen = torch.Generator().manual_seed(1)
    k = 3 * REGISTRY[fmt].block_size if REGISTRY[fmt].block_size == 32 else 512
    raw = random_blocks((7, k), fmt, gen)
    lin = QuantLinear(k, 7, bias=True, formats=fmt, dtype=torch.float32, backend="torch")
    lin.load_shard("weight", None, raw)
    bias = torch.randn(7, generator=gen)
    lin.load_shard("bias", None, bias)
    assert lin.weight is not None and lin.weight.data_ptr() == raw.data_ptr()  # stored as given
    x = torch.randn(2, 3, k, generator=gen)
    y = lin(x)
    assert y.shape == (2, 3, 7)
    check_close(y.view(6, 7), x.view(6, k), values(raw, fmt), bias)


def test_shards_in_runs(blocks):
    """q and k share a format (one buffer), v has its own: as attn_q/attn_k/attn_v of a Q4_K_M file."""
    random_blocks, values = blocks
    gen = torch.Generator().manual_seed(2)
    k = 256
    shards = (("q", 5), ("k", 3), ("v", 3))
    fmts = {"q": "q4_k", "k": "q4_k", "v": "q6_k"}
    lin = QuantLinear(k, shards, bias=True, formats=fmts, dtype=torch.float32, backend="torch")
    assert [(a, f, s, e) for a, f, s, e in lin.groups] == [("weight_0", "q4_k", 0, 8), ("weight_1", "q6_k", 8, 11)]
    w, b = [], []
    for name, rows in shards:
        raw = random_blocks((rows, k), fmts[name], gen)
        bias = torch.randn(rows, generator=gen)
        lin.load_shard("weight", name, raw)
        lin.load_shard("bias", name, bias)
        assert torch.equal(lin.raw_shard(name), raw)
        assert lin.slot_format("weight", name) == fmts[name] and lin.slot_format("bias", name) is None
        w.append(values(raw, fmts[name]))
        b.append(bias)
    x = torch.randn(4, k, generator=gen)
    y = lin(x)
    check_close(y, x, torch.cat(w), torch.cat(b))
    q, kk, v = lin.split(y)
    assert (q.shape[-1], kk.shape[-1], v.shape[-1]) == (5, 3, 3)


def test_float64_inputs(blocks):
    random_blocks, values = blocks
    gen = torch.Generator().manual_seed(3)
    raw = random_blocks((5, 64), "q5_0", gen)
    lin = QuantLinear(64, (("gate", 2), ("up", 3)), bias=False, formats="q5_0", dtype=torch.float64,
                      backend="torch")
    lin.load_shard("weight", "gate", raw[:2])
    lin.load_shard("weight", "up", raw[2:])
    x = torch.randn(3, 64, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(lin(x), x @ values(raw, "q5_0").T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", ("q8_0", "q4_k", "iq3_s"))
def test_embedding(blocks, fmt):
    random_blocks, values = blocks
    gen = torch.Generator().manual_seed(4)
    d = 512 if REGISTRY[fmt].block_size == 256 else 96
    raw = random_blocks((11, d), fmt, gen)
    emb = QuantEmbedding(11, d, format=fmt, dtype=torch.float32, backend="torch")
    emb.weight = torch.nn.Parameter(raw, requires_grad=False)
    ids = torch.tensor([[3, 0, 10], [3, 7, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, d) and out.dtype == torch.float32
    # decoded values are exact in fp32: equal, not close
    assert torch.equal(out.double(), values(raw, fmt)[ids])


def test_bad_input(blocks):
    random_blocks, _ = blocks
    with pytest.raises(ValueError, match="formats\\['v'\\]"):
        QuantLinear(64, (("q", 2), ("v", 2)), bias=False, formats={"q": "q8_0", "v": "q9"}, dtype=torch.float32)
    with pytest.raises(ValueError, match="formats must give"):
        QuantLinear(64, (("q", 2), ("v", 2)), bias=False, formats={"q": "q8_0"}, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not tile"):
        QuantLinear(96, 4, bias=False, formats="q4_k", dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(64, 4, bias=False, formats="q8_0", dtype=torch.float32, backend="cuda")
    with pytest.raises(ValueError, match="format"):
        QuantEmbedding(4, 64, format="f64", dtype=torch.float32)
    lin = QuantLinear(64, (("q", 2), ("v", 3)), bias=False, formats={"q": "q8_0", "v": "q4_0"},
                      dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match="expected shape"):
        lin.load_shard("weight", "q", random_blocks((3, 64), "q8_0", gen))
    with pytest.raises(ValueError, match="expected dtype"):
        lin.load_shard("weight", "q", torch.zeros(2, 68))
    with pytest.raises(ValueError, match="different formats"):
        lin.load_shard("weight", None, torch.zeros(5, 68, dtype=torch.uint8))
    with pytest.raises(ValueError, match="param must be"):
        lin.load_shard("bias", "q", torch.zeros(2))
    with pytest.raises(ValueError, match="x must be"):
        lin(torch.zeros(2, 32))
    with pytest.raises(ValueError, match="ids must be"):
        QuantEmbedding(4, 64, format="q8_0", dtype=torch.float32)(torch.zeros(2))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, from inside the Triton interpreter
@pytest.mark.skipif(not HAS_GEMV, reason="glmtg.kernels.gguf.gemv is not on this branch yet")
@pytest.mark.parametrize("tokens", ("gemv", "prefill"))
@pytest.mark.parametrize("fmt", ("q8_0", "q4_0"))
def test_kernel_backend(blocks, fmt, tokens):
    """The Triton paths (interpreter on CPU): the GEMV for few tokens, the dequantizing GEMM (mmq) beyond."""
    from glmtg.kernels.gguf.gemv import GEMV_MAX_TOKENS

    random_blocks, values = blocks
    gen = torch.Generator().manual_seed(6)
    raw = random_blocks((5, 96), fmt, gen)
    lin = QuantLinear(96, 5, bias=False, formats=fmt, dtype=torch.float32, backend="kernel")
    lin.dot = "float"  # the int8-dot path rounds x: tests/kernels/gguf/test_mmvq.py and the test below
    lin.load_shard("weight", None, raw)
    t = 2 if tokens == "gemv" else GEMV_MAX_TOKENS + 1
    x = torch.randn(t, 96, generator=gen)
    check_close(lin(x), x, values(raw, fmt), None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, from inside the Triton interpreter
@pytest.mark.parametrize("fmt", ("q8_0", "q4_0"))
def test_kernel_backend_int8_dot(blocks, fmt):
    """The default decode path for these formats (int8 dot products, glmtg/kernels/gguf/dispatch.py), within
    the error of rounding x to int8 per 32 values: |err| <= sum over groups of dx/2 * sum |w| per row."""
    random_blocks, values = blocks
    gen = torch.Generator().manual_seed(6)
    raw = random_blocks((5, 96), fmt, gen)
    lin = QuantLinear(96, 5, bias=False, formats=fmt, dtype=torch.float32, backend="kernel")
    lin.load_shard("weight", None, raw)
    x = torch.randn(2, 96, generator=gen)
    w = values(raw, fmt).double()  # [5, 96]
    want = x.double() @ w.T
    dx = x.double().view(2, 3, 32).abs().amax(-1) / 127  # [T, groups]
    bound = (dx[:, None, :] / 2 * w.abs().view(5, 3, 32).sum(-1)[None]).sum(-1)  # [T, N]
    err = (lin(x).double() - want).abs()
    assert bool((err <= bound * 1.001 + 1e-5).all()), (err / bound).max()
