"""quant_matvec (x @ W.T with W in GGUF blocks, read in place) against a float64 reference, every decoded type.

Reference: REGISTRY[fmt].dequantize_blocks(raw) (bit-exact with gguf) in float64 @ x in float64, from the
very same x values. Weights: tests/references/gguf_weights.py (finite, every code value occurring).

Tolerances. The kernel decodes each weight exactly (fp32 values as gguf's) and accumulates w * x in fp32
in its own order; each fp32 product and sum is off by at most 2^-24 relative, so the error of a dot product
of K terms (K products, K - 1 sums) is bounded by (K + 1) * 2^-24 * Σ|w||x| (the worst case; typically
sqrt(K) of that), so per element  |y - ref| <= (K + 1) * 2^-24 * (|W| @ |x|)  (a sum of magnitudes, so it
holds where terms cancel). K is 96 or 768 here: a 1e-4 relative error in the kernel fails it.
An fp16 / bf16 output is rounded once more: + 2^-11 / 2^-8 * |ref|. Outputs are poisoned with NaN before
the call.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.formats import GGUF_FORMATS, REGISTRY
from glmtg.kernels.gguf.decode import DECODED
from glmtg.kernels.gguf.dequant import dequantize_rows
from glmtg.kernels.gguf.gemv import GEMV_MAX_TOKENS, quant_matvec
from tests.references.gguf_weights import gguf_weight

# numpy's, from inside the Triton interpreter (a loop bound passed as a runtime int goes through __index__)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _k_for(name: str) -> int:
    """K of three blocks (float types: 3 x 32 values, still an odd number of 32-value steps)."""
    bs = REGISTRY[name].block_size
    return 3 * bs if bs > 1 else 96


def _check(name: str, t: int, n: int, dtype: torch.dtype, seed: int, device: str = "cpu", **knobs: int) -> None:
    k = _k_for(name)
    raw = gguf_weight(name, (n,), k, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, k, generator=gen).to(dtype)
    w64 = REGISTRY[name].dequantize_blocks(raw).double()
    ref = x.double() @ w64.T
    bound = x.double().abs() @ w64.abs().T
    out = torch.full((t, n), float("nan"), dtype=dtype, device=device)
    got = quant_matvec(x.to(device), raw.to(device), name, out=out, **knobs)
    assert got is out
    err = (got.cpu().double() - ref).abs()
    tol = (k + 1) * 2.0 ** -24 * bound + ROUNDOFF[dtype] * ref.abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst err/tol {(err / tol).max():.3g}"


@pytest.mark.parametrize("name", DECODED)
@pytest.mark.parametrize("t", [1, 3])
def test_quant_matvec_matches_float64(name: str, t: int) -> None:
    # 16 rows a program: 3 programs, the last ragged (few programs keep the interpreter fast).
    _check(name, t, n=37, dtype=torch.float32, seed=t * 10 + REGISTRY[name].gguf_type, block_n=16)


@pytest.mark.parametrize("t", [1, 3])
def test_quant_matvec_default_launch(t: int) -> None:
    _check("q8_0", t, n=37, dtype=torch.float32, seed=40 + t)


@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
def test_quant_matvec_half_input_and_knobs(name: str) -> None:
    # fp16 x and out; explicit knobs that split a row into several steps (a full step of two blocks and a
    # partial one; three of one block) and cut the rows into a ragged last program.
    _check(name, 1, n=21, dtype=torch.float16, seed=5, block_n=4, values_per_step=64)
    _check(name, 3, n=21, dtype=torch.float16, seed=6, block_n=2, values_per_step=32, num_warps=2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", DECODED)
@pytest.mark.parametrize("t", [1, 3])
def test_quant_matvec_bf16_on_gpu(name: str, t: int) -> None:
    # The compiled kernels (the CPU tests run the interpreter, where the decoders skip their inline PTX).
    _check(name, t, n=37, dtype=torch.bfloat16, seed=60 + t, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("name", DECODED)
def test_compiled_decoders_are_bit_exact(name: str) -> None:
    # dequantize_rows runs the same decoders as quant_matvec; compiled, some take inline-PTX paths that the
    # interpreter never runs. Random bytes: every code and scale bit pattern, NaNs counted equal.
    f = REGISTRY[name]
    raw = torch.randint(0, 256, (5, 7 * f.type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    want = f.dequantize_blocks(raw)
    got = dequantize_rows(raw.cuda(), name).cpu()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all())


def test_quant_matvec_rejects_bad_input() -> None:
    raw = gguf_weight("q8_0", (5,), 64, seed=1)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="fmt"):
        quant_matvec(x, raw, "q9_9")
    undecoded = [name for name in GGUF_FORMATS if name not in DECODED]
    if undecoded:  # a type with no decoder yet: a clear error, not a compile failure
        with pytest.raises(ValueError, match="fmt: no device decoder"):
            quant_matvec(x, raw, undecoded[0])
    with pytest.raises(ValueError, match="x dtype"):
        quant_matvec(x.to(torch.int32), raw, "q8_0")
    with pytest.raises(ValueError, match="weight must be"):
        quant_matvec(x, raw.view(torch.int8), "q8_0")
    with pytest.raises(ValueError, match="K=32"):
        quant_matvec(x[:, :32], raw, "q8_0")
    with pytest.raises(ValueError, match="whole number"):
        quant_matvec(x, raw[:, :-2].contiguous(), "q8_0")
    with pytest.raises(ValueError, match="contiguous"):
        quant_matvec(x, torch.cat([raw, raw], dim=1)[:, :68], "q8_0")
    with pytest.raises(ValueError, match="tokens"):
        quant_matvec(torch.randn(GEMV_MAX_TOKENS + 1, 64), raw, "q8_0")
    with pytest.raises(ValueError, match="out"):
        quant_matvec(x, raw, "q8_0", out=torch.empty(1, 4))
    with pytest.raises(ValueError, match="block_n"):
        quant_matvec(x, raw, "q8_0", block_n=3)
