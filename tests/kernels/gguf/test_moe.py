"""quant_moe_decode (routed experts, weights in GGUF blocks read in place) against a float64 reference.

Reference: the same formula in float64 over REGISTRY[fmt].dequantize_blocks of the same bytes (bit-exact
with gguf) and the same x values; a slot whose id is outside [0, E) contributes nothing.

Tolerances. The kernel decodes each weight exactly and accumulates in fp32 (gate/up dots over H, down dots
over I and the k slots), rounding once to the output dtype. fp32 accumulation over these few terms
(H, I <= 512 here, k = 3) is off by at most ~n * 2^-24 of the magnitudes summed, bounded here by
2e-6 * max|ref| (silu and the product h add a few fp32 roundings, same order). Checked per element:
    |y - ref| <= u * |ref| + 2e-6 * max|ref|,   u = 2^-11 (fp16 out), 2^-8 (bf16), 0 (fp32)
A kernel 1e-4 off in relative terms fails it. Outputs are poisoned with NaN before each call.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import GGUF_FORMATS, REGISTRY
from glmtg.kernels.gguf.decode import DECODED
from glmtg.kernels.gguf.moe import quant_moe_decode
from tests.references.gguf_weights import gguf_weight

# numpy's, from inside the Triton interpreter (a loop bound passed as a runtime int goes through __index__)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
NUM_EXPERTS = 5


def _values(name: str, blocks: int) -> int:
    """``blocks`` blocks of ``name`` (one fewer for 256-value super-blocks, to keep the interpreter fast;
    float types: 32-value "blocks")."""
    bs = REGISTRY[name].block_size
    return (blocks - 1) * bs if bs >= 256 else blocks * max(bs, 32)


def _problem(gu: str, dn: str, t: int, seed: int, dtype: torch.dtype, device: str = "cpu"):
    hidden, inter = _values(gu, 3), _values(dn, 2)
    gate = gguf_weight(gu, (NUM_EXPERTS, inter), hidden, seed)
    up = gguf_weight(gu, (NUM_EXPERTS, inter), hidden, seed + 1)
    down = gguf_weight(dn, (NUM_EXPERTS, hidden), inter, seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(t, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, NUM_EXPERTS, (t, 3), generator=gen)
    ids[0, 1] = -1  # out of range on both sides: these slots contribute zero
    ids[-1, 0] = NUM_EXPERTS
    weights = torch.rand(t, 3, generator=gen)
    tensors = [v.to(device) for v in (x, gate, up, down, ids, weights)]
    return tensors, (gu, dn)


def _reference(x, gate, up, down, ids, weights, gu: str, dn: str) -> torch.Tensor:
    g64 = REGISTRY[gu].dequantize_blocks(gate.cpu()).double()
    u64 = REGISTRY[gu].dequantize_blocks(up.cpu()).double()
    d64 = REGISTRY[dn].dequantize_blocks(down.cpu()).double()
    xs = x.cpu().double()
    y = torch.zeros_like(xs)
    for t in range(xs.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            if 0 <= e < NUM_EXPERTS:
                h = torch.nn.functional.silu(g64[e] @ xs[t]) * (u64[e] @ xs[t])
                y[t] += float(weights[t, slot]) * (d64[e] @ h)
    return y


def _check(gu: str, dn: str, t: int, dtype: torch.dtype, seed: int, device: str = "cpu", **knobs: int) -> None:
    (x, gate, up, down, ids, weights), _ = _problem(gu, dn, t, seed, dtype, device)
    ref = _reference(x, gate, up, down, ids, weights, gu, dn)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=device)
    got = quant_moe_decode(x, gate, up, down, ids, weights, gu, dn, out=out, **knobs)
    assert got is out
    err = (got.cpu().double() - ref).abs()
    tol = ROUNDOFF[dtype] * ref.abs() + 2e-6 * ref.abs().max()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"


# Each decoded type as gate/up, with the next one as down (so both formats vary and differ).
PAIRS = [(gu, DECODED[(i + 1) % len(DECODED)]) for i, gu in enumerate(DECODED)]


@pytest.mark.parametrize("gu,dn", PAIRS)
def test_quant_moe_decode_matches_float64(gu: str, dn: str) -> None:
    # Tokens are a grid dimension here (no per-T code path): 2 tokens cover one token's code too. Large
    # row blocks: few programs keep the interpreter fast (the knob test below takes small ones).
    _check(gu, dn, 2, torch.float32, seed=100 + REGISTRY[gu].gguf_type, block_i=32, block_h=32)


def test_quant_moe_decode_half_input_and_knobs() -> None:
    # fp16 x and out; small steps and row blocks: gate/up takes one full step of 2 blocks and a partial one
    # (H = 3 blocks), down two full steps of one block; ragged last programs.
    _check("q4_0", "q8_0", 2, torch.float16, seed=9, block_i=4, values_per_step=64, block_h=32,
           values_per_step_down=32, num_warps=2)


@pytest.mark.gpu
@pytest.mark.parametrize("gu,dn", [("q4_0", "q8_0"), ("q8_0", "q4_0")])
def test_quant_moe_decode_bf16_on_gpu(gu: str, dn: str) -> None:
    _check(gu, dn, 3, torch.bfloat16, seed=11, device="cuda")


def test_quant_moe_decode_rejects_bad_input() -> None:
    (x, gate, up, down, ids, weights), _ = _problem("q8_0", "q4_0", 2, 1, torch.float32)
    args = (x, gate, up, down, ids, weights)
    with pytest.raises(ValueError, match="gate_up_fmt"):
        quant_moe_decode(*args, "q9_9", "q4_0")
    with pytest.raises(ValueError, match="down row of 36 bytes"):
        quant_moe_decode(*args, "q8_0", "q8_0")  # down rows are two q4_0 blocks: no whole q8_0 block
    undecoded = [name for name in GGUF_FORMATS if name not in DECODED]
    if undecoded:
        with pytest.raises(ValueError, match="down_fmt: no device decoder"):
            quant_moe_decode(*args, "q8_0", undecoded[0])
    with pytest.raises(ValueError, match="x dtype"):
        quant_moe_decode(x.to(torch.int32), *args[1:], "q8_0", "q4_0")
    with pytest.raises(ValueError, match="hold 96 q8_0 values but x has H=64"):
        quant_moe_decode(torch.randn(2, 64), *args[1:], "q8_0", "q4_0")
    with pytest.raises(ValueError, match="gate must be"):
        quant_moe_decode(x, gate.view(torch.int8), *args[2:], "q8_0", "q4_0")
    with pytest.raises(ValueError, match="up must be contiguous"):
        quant_moe_decode(x, gate, up.transpose(0, 1).contiguous().transpose(0, 1), *args[3:], "q8_0", "q4_0")
    with pytest.raises(ValueError, match="up shape"):
        quant_moe_decode(x, gate, up[:, :-1].contiguous(), *args[3:], "q8_0", "q4_0")
    with pytest.raises(ValueError, match="ids dtype"):
        quant_moe_decode(*args[:4], ids.int(), weights, "q8_0", "q4_0")
    with pytest.raises(ValueError, match="weights must"):
        quant_moe_decode(*args[:5], weights[:, :2], "q8_0", "q4_0")
    with pytest.raises(ValueError, match="block_h"):
        quant_moe_decode(*args, "q8_0", "q4_0", block_h=6)
