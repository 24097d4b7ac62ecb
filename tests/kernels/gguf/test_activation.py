"""silu_mul_quantize and the activation memo (glmtg/kernels/gguf/activation.py).

silu_mul_quantize must give quantize_activation's blocks of a = round(round(silu(gate)) · up), bit for bit
(compared with torch.equal, no tolerance). On the GPU the reference is torch's own F.silu(gate) * up. In
the interpreter the kernel's exp is numpy's, which differs from torch's CPU exp in the last bit, so the CPU
reference is the same expression with numpy's exp: it checks the formula and both roundings exactly, and a
float64 check bounds the result against silu(gate) · up itself (codes · dx within half a code step + the
dtype's roundings).

Memo: a hit is observed through mmvq using a remembered quantization that is deliberately not x's.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glmtg.kernels.gguf.activation import (
    forget,
    quantize_activation,
    quantized_of,
    remember,
    silu_mul_quantize,
)
from glmtg.kernels.gguf.mmvq import mmvq
from glmtg.kernels.gguf.mmvq_moe import mmvq_moe
from tests.references.gguf_weights import gguf_weight

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _gate_up(t: int, inter: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[t, 2I] as a column slice of a wider buffer (rows 2I + 7 apart), values ~N(0, 3)."""
    wide = torch.randn(t, 2 * inter + 7, generator=torch.Generator().manual_seed(seed)) * 3
    return wide.to(dtype)[:, 3:3 + 2 * inter]


def _numpy_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """round(round(gate / (1 + exp(-gate)) in fp32) · up in fp32) in gate_up's dtype, numpy's exp."""
    inter = gate_up.shape[1] // 2
    gate, up = gate_up[:, :inter].float(), gate_up[:, inter:]
    e = torch.from_numpy(np.exp(-gate.numpy()))
    g = (gate / (1 + e)).to(gate_up.dtype)
    return (g.float() * up.float()).to(gate_up.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("t, inter", [(1, 96), (3, 160)])  # 160: 5 groups, a program of 8 half-masked
def test_silu_mul_quantize(dtype: torch.dtype, t: int, inter: int) -> None:
    gate_up = _gate_up(t, inter, dtype, seed=inter + t)
    got = silu_mul_quantize(gate_up)
    a = _numpy_silu_mul(gate_up)
    for g, w in zip(got, quantize_activation(a)):
        assert g.dtype == w.dtype and torch.equal(g, w)
    # float64: codes · dx against silu(gate) · up within half a code step, plus silu's, the product's
    # and the dtype's roundings (3 of at most ROUNDOFF relative, silu's fp32 exp a few ulps: 4 more)
    gate, up = gate_up[:, :inter].double(), gate_up[:, inter:].double()
    exact = gate * torch.sigmoid(gate) * up
    codes, dx, _ = got
    step = dx.double().repeat_interleave(32, dim=1)
    err = (codes.double() * step - exact).abs()
    assert bool((err <= step / 2 * (1 + 1e-6) + 7 * ROUNDOFF[dtype] * exact.abs()).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_silu_mul_quantize_equals_torch_on_gpu(dtype: torch.dtype) -> None:
    # compiled: libdevice's expf and div_rn must reproduce torch's CUDA silu; a large I, many programs
    t, inter = 5, 1408
    gate_up = _gate_up(t, inter, dtype, seed=7).cuda()
    want = quantize_activation(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
    for g, w in zip(silu_mul_quantize(gate_up), want):
        assert torch.equal(g, w)


def test_down_projection_reads_silu_mul_quantize() -> None:
    # the use: mmvq takes the blocks; x (here the gate half) gives only shape, dtype and device
    t, inter = 2, 64
    gate_up = _gate_up(t, inter, torch.float16, seed=3)
    down = gguf_weight("q4_0", (11,), inter, seed=4)
    got = mmvq(gate_up[:, :inter], down, "q4_0", quantized=silu_mul_quantize(gate_up))
    assert torch.equal(got, mmvq(_numpy_silu_mul(gate_up), down, "q4_0"))


def test_silu_mul_quantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="gate_up must be"):
        silu_mul_quantize(torch.randn(2, 2, 64))
    with pytest.raises(ValueError, match="gate_up must be"):
        silu_mul_quantize(torch.randn(2, 64).double())
    with pytest.raises(ValueError, match="gate_up: width 96"):
        silu_mul_quantize(torch.randn(2, 96))  # I = 48
    with pytest.raises(ValueError, match="gate_up: width 65"):
        silu_mul_quantize(torch.randn(2, 65))


def _other_blocks(x: torch.Tensor):
    """A valid quantization that is not x's (of 3x: same codes, dx three times as large)."""
    return quantize_activation(3 * x)


def test_memo_hit_on_the_same_tensor() -> None:
    forget()
    raw = gguf_weight("q4_0", (7,), 64, seed=1)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    y = mmvq(x, raw, "q4_0")  # remembers x's quantization
    hit = quantized_of(x)
    assert hit is not None and all(torch.equal(a, b) for a, b in zip(hit, quantize_activation(x)))
    assert quantized_of(x) is hit
    fake = _other_blocks(x)
    remember(x, fake)
    assert quantized_of(x) is fake
    # mmvq takes the remembered blocks: the result of 3x, not of x
    assert torch.equal(mmvq(x, raw, "q4_0"), mmvq(x, raw, "q4_0", quantized=fake))
    assert not torch.equal(mmvq(x, raw, "q4_0"), y)


def test_memo_misses_after_an_in_place_change() -> None:
    forget()
    raw = gguf_weight("q4_0", (7,), 64, seed=3)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    remember(x, _other_blocks(x))
    x.mul_(1.0)  # same values, but modified in place: the version moved
    assert quantized_of(x) is None
    assert torch.equal(mmvq(x, raw, "q4_0"), mmvq(x, raw, "q4_0", quantized=quantize_activation(x)))
    base = torch.randn(2, 64)
    view = base[:, :]
    remember(view, quantize_activation(view))
    base[0, 0] = 1.0  # through another view of the storage
    assert quantized_of(view) is None


def test_memo_views_and_tensors_at_the_same_address() -> None:
    """A same-layout view of the remembered tensor (the reshape a consumer makes) hits while it lives; another
    layout misses, and once it is gone a new tensor at its address misses."""
    forget()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    fake = _other_blocks(x)
    remember(x, fake)
    codes = weakref.ref(fake[0])
    same_memory = x.view(1, 2, 64).reshape(-1, 64)  # another tensor object, same layout, same version counter
    assert same_memory is not x and same_memory.data_ptr() == x.data_ptr()
    assert quantized_of(same_memory) is fake
    assert quantized_of(x.view(4, 32)) is None
    same_memory.add_(1.0)  # a change through the view moves the shared version counter
    assert quantized_of(x) is None
    del fake
    gone = weakref.ref(x)
    del x, same_memory
    gc.collect()
    assert gone() is None  # the memo kept no reference to x
    assert codes() is None  # and dropped its entry, codes freed, with it
    y = torch.randn(2, 64)  # may well reuse x's memory
    assert quantized_of(y) is None


def test_mmvq_out_write_invalidates_the_memo() -> None:
    # a Triton write is invisible to torch: mmvq bumps out's version itself
    forget()
    raw = gguf_weight("q8_0", (32,), 64, seed=6)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    out = torch.randn(2, 32)
    remember(out, quantize_activation(out))
    mmvq(x, raw, "q8_0", out=out)
    assert quantized_of(out) is None


def test_mmvq_moe_uses_the_memo() -> None:
    forget()
    hidden, inter, experts = 64, 32, 2
    gate = gguf_weight("q8_0", (experts, inter), hidden, seed=8)
    up = gguf_weight("q8_0", (experts, inter), hidden, seed=9)
    down = gguf_weight("q8_0", (experts, hidden), inter, seed=10)
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(11))
    ids, weights = torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.6]])
    args = (x, gate, up, down, ids, weights, "q8_0", "q8_0")
    y = mmvq_moe(*args)
    assert quantized_of(x) is not None  # remembered for the next reader of x
    remember(x, _other_blocks(x))
    y3 = mmvq_moe(*args)  # read the remembered (3x) blocks
    forget()
    assert torch.equal(mmvq_moe(3 * x, *args[1:]), y3) and not torch.equal(y3, y)


def test_memo_rejects_bad_input() -> None:
    x = torch.randn(2, 64)
    codes, dx, sums = quantize_activation(x)
    with pytest.raises(ValueError, match="quantized"):
        remember(x, (codes, dx))
    with pytest.raises(ValueError, match="quantized"):
        remember(x, (codes[:1], dx[:1], sums[:1]))
    with pytest.raises(ValueError, match="x must be"):
        remember(x.numpy(), (codes, dx, sums))
    assert quantized_of(x.numpy()) is None


@pytest.mark.gpu
def test_memo_is_not_used_across_a_capture_boundary() -> None:
    forget()
    x = torch.randn(2, 64, device="cuda")
    remember(x, quantize_activation(x))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # made before the capture: its kernel is not in the graph, so it must not be reused
        assert quantized_of(x) is None
        q = quantize_activation(x)
        remember(x, q)
        assert quantized_of(x) is q
    torch.cuda.synchronize()
    assert quantized_of(x) is None  # made inside: not used outside
