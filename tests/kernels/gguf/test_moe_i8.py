"""moe_i8 (a decode batch's routed experts by int8 tensor-core dots, q4_0 / q8_0 stacks) against float64.

Reference: x's own int8 blocks (quantize_activation) widened to float64; per pair g, u = x_q W_gᵀ, x_q W_uᵀ,
act = silu(g) · u, y = act D_eᵀ; out = Σ_s w_s y_s, all float64 over gguf's dequantized weights. Error bound
per pair, propagated (|d silu(g) / dg| <= 1.1):
- g, u: the integer block dots are exact; fp32 scaling and sums: e_g = (NB_H + 2) 2^-24 |x_q| |W_g|ᵀ (same u);
- act: 1.1 |u| e_g + |silu g| e_u, then its rounding to x's dtype (u_x |act|) and to int8 per 32 values (at
  most amax/254 of its group, amax over the kernel's act: within 1% of the reference's, so x 1.01);
- y: |D| e_act + (NB_I + 2) 2^-24 |act| |D|ᵀ, then rounded to x's dtype (u_x |y|);
- out: Σ_s |w_s| e_y + (k + 1) 2^-24 Σ_s |w_s y_s| + u_x |ref| (fp32 sum of the slots, one rounding).
A worst-case bound: a block, offset or expert slip fails it; a drift of act by ~1% would not (the int8
term is a sum of magnitudes), which the GPU test's comparison with the float-dot path bounds instead.
Odd shapes: T = 3 and 17 (17 pairs on one expert: two m-tiles of it), ids outside [0, E) adding nothing, output
poisoned with NaN; E = 5, I = 64 (two groups of 32 inner columns), H = 96.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.kernels.gguf.activation import quantize_activation
from glmtg.kernels.gguf.moe_i8 import moe_i8
from tests.references.gguf_gemm import UNIT, dequant64
from tests.references.gguf_weights import gguf_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _reference(x, ids, w, gate64, up64, down64, dtype):
    t, k = ids.shape
    h = x.shape[1]
    u_x = UNIT[dtype] if dtype != torch.float32 else 2.0 ** -24
    codes, dx, _ = quantize_activation(x)
    xq = (codes.double().view(t, -1, 32) * dx.double()[..., None]).view(t, h)
    nbh, nbi = h // 32, gate64.shape[1] // 32
    ref = torch.zeros(t, h, dtype=torch.float64)
    tol = torch.zeros_like(ref)
    mags = torch.zeros_like(ref)
    for tok in range(t):
        for s in range(k):
            e = int(ids[tok, s])
            if not 0 <= e < gate64.shape[0]:
                continue
            xr = xq[tok]
            g, up = gate64[e] @ xr, up64[e] @ xr
            e_g = (nbh + 2) * 2.0 ** -24 * (gate64[e].abs() @ xr.abs())
            e_u = (nbh + 2) * 2.0 ** -24 * (up64[e].abs() @ xr.abs())
            silu = g * torch.sigmoid(g)
            act = silu * up
            amax = act.abs().view(nbi, 32).amax(1).repeat_interleave(32)
            e_a = 1.1 * up.abs() * e_g + silu.abs() * e_u
            e_a = e_a + u_x * (act.abs() + e_a) + 1.01 * (amax + e_a) / 254
            y = down64[e] @ act
            e_y = down64[e].abs() @ e_a + (nbi + 2) * 2.0 ** -24 * (down64[e].abs() @ act.abs())
            e_y = e_y + u_x * (y.abs() + e_y)
            ref[tok] += float(w[tok, s]) * y
            tol[tok] += abs(float(w[tok, s])) * e_y
            mags[tok] += abs(float(w[tok, s])) * y.abs()
    return ref, tol + (k + 1) * 2.0 ** -24 * mags + u_x * ref.abs()


@pytest.mark.parametrize(("t", "dtype", "down_fmt"), [(3, torch.float16, "q8_0"), (17, torch.float32, "q4_0")])
def test_against_float64(t: int, dtype: torch.dtype, down_fmt: str) -> None:
    e, i, h = 5, 64, 96
    gate = gguf_weight("q4_0", (e, i), h, seed=1)
    up = gguf_weight("q4_0", (e, i), h, seed=2)
    down = gguf_weight(down_fmt, (e, h), i, seed=3)
    gen = torch.Generator().manual_seed(t)
    x = (torch.randn(t, h, generator=gen) / 4).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:3] for _ in range(t)])
    ids = torch.where(ids == 3, ids[:, :1], ids)
    ids[:, 0] = 3  # every token on expert 3
    ids[0, 2] = -1  # a slot held elsewhere
    w = torch.rand(t, 3, generator=gen)
    out = torch.full((t, h), float("nan"), dtype=dtype)
    assert moe_i8(x, gate, up, down, ids, w, "q4_0", down_fmt, out=out) is out
    ref, tol = _reference(x, ids, w, dequant64(gate, "q4_0"), dequant64(up, "q4_0"), dequant64(down, down_fmt),
                          dtype)
    err = (out.double() - ref).abs()
    assert bool((err <= tol).all()), float((err / tol).max())


def test_rejects_other_formats() -> None:
    gate = gguf_weight("q5_0", (2, 32), 64, seed=1)
    down = gguf_weight("q8_0", (2, 64), 32, seed=1)
    with pytest.raises(ValueError, match="moe_i8 reads"):
        moe_i8(torch.randn(2, 64), gate, gate, down, torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1),
               "q5_0", "q8_0")


@pytest.mark.gpu
@pytest.mark.parametrize("t", (2, 8, 64))
def test_air_shapes_captured_on_gpu(t: int) -> None:
    # Air's 128 experts (I = 1408, H = 4096) in q4_0, bf16 x: captured in a CUDA graph, replayed with new x,
    # routing and weights, bit-equal to eager runs on those; and within 3% of the float-dot path (int8
    # rounding of x and act: ~0.4% a rounding, sums of many terms).
    from glmtg.kernels.gguf.mmq_moe import moe_prefill

    gen = torch.Generator(device="cuda").manual_seed(t)

    def blocks(rows: int, width: int) -> torch.Tensor:
        return torch.randint(0, 256, (128, rows, width // 32 * 18), dtype=torch.uint8, device="cuda",
                             generator=gen) & 0xBF  # finite fp16 scales under 2

    gate, up, down = blocks(1408, 4096), blocks(1408, 4096), blocks(4096, 1408)

    def inputs():
        return ((torch.randn(t, 4096, device="cuda", generator=gen) / 16).to(torch.bfloat16),
                torch.rand(t, 128, device="cuda", generator=gen).argsort(dim=1)[:, :8],
                torch.rand(t, 8, device="cuda", generator=gen))

    static = list(inputs())
    y = moe_i8(gate=gate, up=up, down=down, x=static[0], ids=static[1], weights=static[2], gate_up_fmt="q4_0",
               down_fmt="q4_0")
    ref = moe_prefill(static[0], gate, up, down, static[1], static[2], "q4_0", "q4_0")
    assert float((y.float() - ref.float()).abs().max()) <= 0.03 * float(ref.float().abs().max())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_i8(static[0], gate, up, down, static[1], static[2], "q4_0", "q4_0")
    for _ in range(2):
        for buf, new in zip(static, inputs()):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, moe_i8(static[0], gate, up, down, static[1], static[2], "q4_0", "q4_0"))
