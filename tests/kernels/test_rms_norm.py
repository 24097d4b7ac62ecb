"""glmtg.kernels.rms_norm: the fused [residual +] RMSNorm [+ int8 blocks] against a float64 reference of the
same math, the torch module it replaces (glmtg/layers/norm.py) and quantize_activation; and the kernel
compiles for sm_90 without spilling (run as a script in a subprocess: ``python tests/kernels/test_rms_norm.py``
prints the report; the interpreter accepts code the GPU compiler may reject)."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as the compile script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytest  # noqa: E402
import torch  # noqa: E402

from glmtg.kernels.gguf.mmvq import quantize_activation  # noqa: E402
from glmtg.kernels.rms_norm import MAX_H, Quantized, rms_norm  # noqa: E402
from glmtg.layers.norm import RMSNorm  # noqa: E402

EPS = 1e-5
CPU_DTYPES = (torch.float16, torch.float32)  # bf16 is wrong in the Triton interpreter: GPU tests only


def inputs(t: int, h: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """x, weight, residual: random normal (weights around 1 like trained norms, never 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(h, generator=g, dtype=torch.float64)
    r = 2 * torch.randn(t, h, generator=g, dtype=torch.float64)
    return tuple(v.to(dtype).to(device) for v in (x, w, r))


def module(weight: torch.Tensor) -> RMSNorm:
    m = RMSNorm(weight.shape[0], EPS, weight.dtype).to(weight.device)
    m.weight.data.copy_(weight)
    return m


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each |v| (the subnormal spacing below the normal range)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(v.double().abs().clamp_min(fi.tiny))
    return fi.eps * torch.exp2((e - 1).double())


def reference64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = w * (x / rms(x)) in float64, unrounded."""
    xd = x.double()
    return w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("t,h", [(1, 96), (3, 100), (3, 160), (1, 4128)])
def test_matches_float64_and_module(dtype, t, h):
    x, w, _ = inputs(t, h, dtype, seed=h + t)
    y = rms_norm(x, w, EPS)
    assert y.dtype == dtype and y.shape == (t, h)
    # Float64: y rounds twice in dtype, the normalised value n (<= ulp(n)/2, scaled by |w| in the product)
    # and the product (<= ulp(y)/2); on top, the fp32 statistic (a sum of <= 4128 squares and rsqrt, a few
    # fp32 ulps: 2e-6 relative is ample) and the fp32 product before n's rounding (negligible).
    want = reference64(x, w)
    n = want / w.double()
    err = (y.double() - want).abs()
    bound = 1.001 * (w.double().abs() * ulp(n, dtype) + ulp(want, dtype)) / 2 + 2e-6 * want.abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"
    # The torch module: identical rounding steps; only the fp32 sum of squares (order; torch on CPU divides
    # by H where the kernel multiplies by fp32(1/H)) and rsqrt (numpy's against torch's) may differ, by an
    # fp32 ulp or a few. That moves n by at most one ulp of fp16 (rarely), or a few ulps of fp32 (k below),
    # and y by that times |w| plus the product's rounding.
    ref = module(w)(x)
    k = 1 if dtype == torch.float16 else 4
    diff = (y.double() - ref.double()).abs()
    assert (diff <= k * w.double().abs() * ulp(ref.double() / w.double(), dtype) + ulp(ref, dtype)).all(), \
        f"max |y - module| {diff.max():.3g}"
    if dtype == torch.float16:  # a flip needs n within ~2^-13 of an fp16 rounding midpoint: rare
        assert (y != ref).double().mean() <= 0.01


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("t,h", [(1, 100), (3, 96)])
def test_residual_rounds_the_sum_then_norms_it(dtype, t, h):
    x, w, r = inputs(t, h, dtype, seed=7 * h + t)
    y, s = rms_norm(x, w, EPS, residual=r)
    assert torch.equal(s, x + r), "s must be torch's x + residual (fp32 add, one rounding)"
    assert torch.equal(y, rms_norm(s, w, EPS)), "y must be the norm of the rounded sum"
    assert not torch.equal(y, rms_norm(x, w, EPS))  # the residual was used


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("t,h", [(1, 96), (3, 160)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_quantize_equals_quantize_activation(dtype, t, h, with_residual):
    x, w, r = inputs(t, h, dtype, seed=11 * h + t)
    x[0, :32] = r[0, :32] = 0  # an all-zero group: dx 0 and codes 0 on both paths
    res = r if with_residual else None
    out = rms_norm(x, w, EPS, residual=res, quantize=True)
    assert len(out) == (3 if with_residual else 2) and isinstance(out[-1], Quantized)
    plain = rms_norm(x, w, EPS, residual=res)
    assert torch.equal(out[0], plain[0] if with_residual else plain), "quantizing must not change y"
    if with_residual:
        assert torch.equal(out[1], plain[1])
    # Exact: the same y values through the same quantize_groups.
    for got, want, name in zip(out[-1], quantize_activation(out[0]), Quantized._fields):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert (out[-1].codes[:, 32:] != 0).any() and out[-1].dx[0, 0] == 0 and (out[-1].dx[:, 1:] > 0).all()


def test_outputs_fully_written(monkeypatch):
    """Every output allocation poisoned (NaN; an impossible value for the ints) and then compared in full."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        v = empty(*args, **kwargs)
        return v.fill_(float("nan") if v.is_floating_point() else torch.iinfo(v.dtype).min)

    x, w, r = inputs(3, 160, torch.float16, seed=5)
    want_y, want_s = module(w)(x + r), x + r
    monkeypatch.setattr(torch, "empty", poisoned)
    y, s, q = rms_norm(x, w, EPS, residual=r, quantize=True)
    assert not y.isnan().any() and not s.isnan().any() and not q.dx.isnan().any()
    assert (q.codes > -128).all() and (q.sums > torch.iinfo(torch.int32).min).all()
    assert torch.equal(s, want_s)
    assert ((y.double() - want_y.double()).abs() <= 2 * ulp(want_y, y.dtype)).all()  # as in the test above


def test_no_tokens():
    w = torch.ones(64, dtype=torch.float16)
    x = torch.empty(0, 64, dtype=torch.float16)
    y, s, q = rms_norm(x, w, EPS, residual=x.clone(), quantize=True)
    assert y.shape == s.shape == q.codes.shape == (0, 64) and q.dx.shape == q.sums.shape == (0, 2)


def test_strided_rows():
    """Rows may be spaced (a view of a wider buffer) as long as each row is contiguous."""
    x, w, r = inputs(3, 96, torch.float32, seed=3)
    wide = torch.randn(3, 200).to(torch.float32)
    wide[:, 50:146] = x
    assert torch.equal(rms_norm(wide[:, 50:146], w, EPS), rms_norm(x, w, EPS))


_X = torch.randn(2, 64, dtype=torch.float16)
_W = torch.randn(64, dtype=torch.float16)


@pytest.mark.parametrize("kwargs,name", [
    (dict(x=_X[0]), "x must be a 2-D"),
    (dict(x=_X.int()), "x dtype"),
    (dict(x=_X.double(), weight=_W.double()), "x dtype"),
    (dict(x=torch.randn(64, 2, dtype=torch.float16).t()), "x rows"),
    (dict(x=torch.randn(1, MAX_H + 1, dtype=torch.float16)), "x: H="),
    (dict(weight=_W[:32]), "weight"),
    (dict(weight=_W.float()), "weight"),
    (dict(weight=torch.randn(128, dtype=torch.float16)[::2]), "weight"),
    (dict(weight=_W.to("meta")), "weight"),
    (dict(eps=0.0), "eps"), (dict(eps=-1e-5), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(eps="1e-5"), "eps"), (dict(eps=True), "eps"),
    (dict(residual=_X[:1]), "residual"),
    (dict(residual=_X.float()), "residual"),
    (dict(residual=_X.to("meta")), "residual"),
    (dict(residual=torch.randn(64, 2, dtype=torch.float16).t()), "residual rows"),
    (dict(x=_X[:, :48], weight=_W[:48], quantize=True), "quantize: H=48"),
    (dict(quantize=1), "quantize must be"),
])
def test_bad_inputs(kwargs, name):
    args = dict(x=_X, weight=_W, eps=EPS) | kwargs
    with pytest.raises(ValueError, match=name):
        rms_norm(args.pop("x"), args.pop("weight"), args.pop("eps"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h", [4096, 5120])
@pytest.mark.parametrize("t", [1, 3, 16])
def test_gpu_bit_equal_to_module(dtype, h, t):
    # Values k/16 with |k| <= 28 (x + residual: |k| <= 56): every square and partial sum of squares is an
    # integer / 256 below 2^24 / 256, exact in fp32 in any order, so the kernel's statistic is torch's and
    # y must be bit for bit the module's (same fp32 * fp32(1/H), rsqrt, roundings).
    g = torch.Generator().manual_seed(h + t)
    x, r = (torch.randint(-28, 29, (t, h), generator=g).to(dtype).div(16).cuda() for _ in range(2))
    w = (1 + 0.5 * torch.randn(h, generator=g)).to(dtype).cuda()
    m = module(w)
    assert torch.equal(rms_norm(x, w, EPS), m(x))
    y, s, q = rms_norm(x, w, EPS, residual=r, quantize=True)
    assert torch.equal(s, x + r) and torch.equal(y, m(x + r))
    assert all(torch.equal(a, b) for a, b in zip(q, quantize_activation(y)))
    # Random normal inputs: the fp32 sum order differs from torch's, so the normalised value may differ by
    # one ulp in a few elements (~1e-4 of them per fp32 ulp of statistic difference), y by that times |w|
    # plus the product's rounding, never more.
    x, w, _ = inputs(t, h, dtype, seed=h * t, device="cuda")
    y, ref = rms_norm(x, w, EPS), module(w)(x)
    bound = w.double().abs() * ulp(ref.double() / w.double(), dtype) + ulp(ref, dtype)
    assert ((y.double() - ref.double()).abs() <= bound).all()
    assert (y != ref).double().mean() <= 1e-2


COMPILE_CASES = ((4096, True, True), (5120, True, True), (16384, True, True), (100, False, False))  # H, res, quant


def _compile(h: int, residual: bool, quantize: bool) -> dict:
    """Compile the bf16 kernel for sm_90 as rms_norm launches it; registers and spills from ptxas."""
    import triton

    from glmtg.kernels import rms_norm as rn
    from tests.references.ptxas import compile_sm90_report

    block = max(triton.next_power_of_2(h), 32)
    const = dict(BLOCK=block, RESIDUAL=residual, QUANTIZE=quantize)
    types = dict(X="*bf16", R="*bf16", W="*bf16", Y="*bf16", S="*bf16", Q="*i8", DX="*fp32", QS="*i32",
                 INV_H="fp32", EPS="fp32")
    # the launcher's specialisation of real launches: these scalars are multiples of 16 when H is
    divisible = ("H", "STRIDE_X", "STRIDE_R") if h % 16 == 0 else ()
    return compile_sm90_report(rn._rms_norm_kernel, types, const, divisible=divisible,
                               num_warps=rn._num_warps(block), tag="rms_norm")


def main() -> int:
    failed = 0
    print("| H | residual | quantize | registers | spill bytes | 16-B loads |")
    print("|---|---|---|---|---|---|")
    for h, residual, quantize in COMPILE_CASES:
        try:
            r = _compile(h, residual, quantize)
        except Exception as exc:  # report and go on: one failure should not hide the others
            failed += 1
            print(f"| {h} | {residual} | {quantize} | compile failed: {type(exc).__name__}: {str(exc)[:200]} |")
            continue
        print(f"| {h} | {residual} | {quantize} | {r['regs']} | {r['spills']} | {r['v4']} |")
    return 1 if failed else 0


def test_compiles_for_sm90_without_spills(compile_report):
    stdout, table = compile_report(__file__, timeout=600)
    rows = {int(c[0]): [int(v) for v in c[3:]] for c in table if len(c) == 6 and c[0].isdigit()}
    assert sorted(rows) == sorted(h for h, _, _ in COMPILE_CASES), stdout
    for h, (_, spills, _) in rows.items():
        assert spills == 0, f"H={h} spills {spills} bytes"
    assert rows[4096][2] > 0, "x, residual and weight rows should be read with 16-byte loads"


if __name__ == "__main__":
    sys.exit(main())
