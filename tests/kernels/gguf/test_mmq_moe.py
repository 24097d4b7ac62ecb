"""moe_prefill (routed experts over GGUF expert stacks, grouped by expert, tiles dequantized into tl.dot)
against a float64 reference.

Reference and tolerance: tests/references/gguf_gemm.py ``moe_reference`` (gguf.quants.dequantize of the same
bytes in float64; each step's error bound propagated through the next, derivation there). Slots whose expert
is outside [0, E) (both sides) add nothing; one expert gets no pair at all, another more pairs than one
m-tile. ``out`` is poisoned with NaN before each call. x is scaled so that the gate/up products are O(1)
(random k-quant blocks hold values up to ~100: fp16 would overflow otherwise).
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf.decode import DECODED
from glmtg.kernels.gguf.mmq import MmqConfig
from glmtg.kernels.gguf.mmq_moe import moe_prefill, sort_by_expert
from tests.references.gguf_gemm import dequant64, moe_reference
from tests.references.gguf_weights import gguf_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")

# (gate/up format, down format): Air's mixes (32-value down blocks because 1408 is no multiple of 256)
# and the hot types.
PAIRS = [("q4_0", "q5_0"), ("q8_0", "q8_0"), ("q4_k", "q6_k"), ("iq4_xs", "q5_0"), ("q6_k", "iq4_xs")]


def _values(name: str, small: int) -> int:
    """A row width: one 256-value super-block, else ``small`` (a multiple of 32)."""
    return 256 if REGISTRY[name].block_size >= 256 else small


def _problem(gu: str, dn: str, t: int, k: int, e: int, seed: int, hidden_small: int = 96, inter_small: int = 64):
    h = _values(gu, hidden_small)
    i = _values(dn, inter_small)
    gate, up = gguf_weight(gu, (e, i), h, seed), gguf_weight(gu, (e, i), h, seed + 1)
    down = gguf_weight(dn, (e, h), i, seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    g64, u64, d64 = dequant64(gate, gu), dequant64(up, gu), dequant64(down, dn)
    scale = 1.0 / (float(g64.abs().max()) * h ** 0.5)
    x = torch.randn(t, h, generator=gen) * scale
    ids = torch.randint(1, e, (t, k), generator=gen)  # expert 0 gets no pair
    ids[0, 1] = -1
    ids[-1, 0] = e
    ids[: t // 2, 0] = 1  # expert 1: more pairs than one m-tile
    weights = torch.rand(t, k, generator=gen)
    return x, gate, up, down, ids, weights, (g64, u64, d64)


def _check(gu: str, dn: str, dtype: torch.dtype, seed: int, t: int = 23, k: int = 3, e: int = 4,
           device: str = "cpu", **kw) -> None:
    x, gate, up, down, ids, weights, (g64, u64, d64) = _problem(gu, dn, t, k, e, seed,
                                                                **{a: kw.pop(a) for a in list(kw) if a.endswith("small")})
    x = x.to(dtype)
    ref, tol = moe_reference(x, g64, u64, d64, ids, weights, dtype)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=device)
    got = moe_prefill(x.to(device), gate.to(device), up.to(device), down.to(device), ids.to(device),
                      weights.to(device), gu, dn, out=out, **kw)
    assert got is out
    err = (got.cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"{gu}/{dn}: max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"


@pytest.mark.parametrize("gu,dn", PAIRS)
def test_moe_prefill_fp32(gu: str, dn: str) -> None:
    _check(gu, dn, torch.float32, seed=REGISTRY[gu].gguf_type * 7 + REGISTRY[dn].gguf_type)


@pytest.mark.parametrize("gu,dn", PAIRS[:3])
def test_moe_prefill_fp16(gu: str, dn: str) -> None:
    _check(gu, dn, torch.float16, seed=50 + REGISTRY[gu].gguf_type)


def test_moe_prefill_knobs_and_partial_steps() -> None:
    # 16-row m-tiles (several per expert), K steps of two blocks over three (a full and a partial step,
    # H = I = 96), 16-wide n-tiles, T·k = 58 pairs not a multiple of the m-tile
    cfg = MmqConfig(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=1)
    _check("q4_0", "q5_0", torch.float16, seed=70, t=29, k=2, e=3, inter_small=96, gate_up_config=cfg,
           down_config=cfg)


def test_sort_by_expert() -> None:
    ids = torch.tensor([[2, -1], [0, 2], [5, 0], [2, 3]])
    order, ends = sort_by_expert(ids, 4)
    assert order.tolist()[:6] == [2, 5, 0, 3, 6, 7]  # expert 0: pairs 2, 5; expert 2: 0, 3, 6; expert 3: 7
    assert sorted(order.tolist()[6:]) == [1, 4]  # the ids outside [0, 4) last
    assert ends.tolist() == [2, 2, 5, 6]
    assert ends.dtype == torch.int32


def test_moe_prefill_rejects_bad_input() -> None:
    x, gate, up, down, ids, weights, _ = _problem("q4_0", "q5_0", 5, 2, 3, seed=90)
    with pytest.raises(ValueError, match="gate_up_fmt"):
        moe_prefill(x, gate, up, down, ids, weights, "q9", "q5_0")
    with pytest.raises(ValueError, match="down_fmt"):
        moe_prefill(x, gate, up, down, ids, weights, "q4_0", "q9")
    with pytest.raises(ValueError, match="x dtype"):
        moe_prefill(x.double(), gate, up, down, ids, weights, "q4_0", "q5_0")
    with pytest.raises(ValueError, match="up must"):
        moe_prefill(x, gate, up[:2], down, ids, weights, "q4_0", "q5_0")
    with pytest.raises(ValueError, match="H=64"):
        moe_prefill(x[:, :64], gate, up, down, ids, weights, "q4_0", "q5_0")
    with pytest.raises(ValueError, match="down must"):
        moe_prefill(x, gate, up, down[:2], ids, weights, "q4_0", "q5_0")
    with pytest.raises(ValueError, match="ids"):
        moe_prefill(x, gate, up, down, ids.float(), weights, "q4_0", "q5_0")
    with pytest.raises(ValueError, match="weights"):
        moe_prefill(x, gate, up, down, ids, weights.half(), "q4_0", "q5_0")
    with pytest.raises(ValueError, match="out"):
        moe_prefill(x, gate, up, down, ids, weights, "q4_0", "q5_0", out=torch.empty(5, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("gu", DECODED)
def test_moe_prefill_bf16_on_gpu(gu: str) -> None:
    # every decoded format as gate/up (down in q5_0, as Air's) and as down (gate/up q4_k), compiled
    _check(gu, "q5_0", torch.bfloat16, seed=100, t=100, k=8, e=16, device="cuda", hidden_small=512,
           inter_small=192)
    _check("q4_k", gu, torch.bfloat16, seed=101, t=100, k=8, e=16, device="cuda", inter_small=192)


@pytest.mark.gpu
@pytest.mark.parametrize("gu,dn", [("q4_k", "q5_0"), ("q4_0", "q4_0"), ("iq4_xs", "iq4_nl"), ("q8_0", "q8_0")])
def test_moe_prefill_air_shapes_on_gpu(gu: str, dn: str) -> None:
    # GLM-4.5-Air expert shapes: H = 4096, I = 1408, top-8; 16 experts (not 128: the float64 reference holds
    # every expert's three matrices), a 300-token chunk
    t, k, e, h, i = 300, 8, 16, 4096, 1408
    gate, up = gguf_weight(gu, (e, i), h, 1), gguf_weight(gu, (e, i), h, 2)
    down = gguf_weight(dn, (e, h), i, 3)
    gen = torch.Generator().manual_seed(4)
    g64, u64, d64 = dequant64(gate, gu), dequant64(up, gu), dequant64(down, dn)
    x = (torch.randn(t, h, generator=gen) / (float(g64.abs().max()) * h ** 0.5)).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=gen)
    ref, tol = moe_reference(x, g64, u64, d64, ids, weights, torch.bfloat16)
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    got = moe_prefill(x.cuda(), gate.cuda(), up.cuda(), down.cuda(), ids.cuda(), weights.cuda(), gu, dn, out=out)
    err = (got.cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"
