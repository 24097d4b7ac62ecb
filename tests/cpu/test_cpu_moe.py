"""glmtg.cpu.cpu_moe (the CPU expert kernel, and its torch fallback) against a float64 reference.

Reference: gguf.quants.dequantize of the same blocks, in float64, applied to the same int8-rounded
activations (x rounded here in float32 by the kernel's formula: dx = amax / 127, codes = nearest-even of
x · (127 / amax), which in IEEE fp32 gives the kernel's codes bit for bit); silu(g) · u in float64, rounded
to int8 per 32 values in float64; down; the weighted sum over the slots whose id is in [0, E).

Tolerance, per output element h (why: the kernel is exact up to fp32 arithmetic, except where that
arithmetic moves an intermediate value across a rounding boundary of its int8 code):
- 1e-6 · mag[h], mag = Σ_s |w_s| Σ_i |down[h, i] · aq_i|: the fp32 block scales (d · dx rounded), the
  fp32 sums of the block terms, fp32 silu, and the intermediate's dx = amax / 127 computed from fp32 g, u
  (measured: errors ≤ 2e-7 of max |ref|, ≤ 15% of this bound);
- plus, for each intermediate value within 1e-4 code units of a rounding boundary (fp32 g, u are off by
  ~1e-7 relative, ~1e-5 code units: such a value may round the other way), one code step:
  Σ_s |w_s| Σ_ambiguous |down[h, i]| · dx_i.
A wrong block layout, scale, offset, silu or slot is off by orders of magnitude more (mag-sized errors).
"""

from __future__ import annotations

import platform
import warnings

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from glmtg.cpu import CPU_FORMATS, cpu_moe, kernel_isa
from glmtg.formats import REGISTRY
from tests.references.gguf_weights import gguf_weight

E = 6
WINDOW = 1e-4  # code units: an intermediate this close to a rounding boundary may round either way
RTOL = 1e-6
# (gate/up format, down format, H, I): k-quant widths multiples of 256, 32-wide ones of 32 (Air's fallbacks)
CASES = [
    ("q8_0", "q8_0", 96, 160),
    ("q4_0", "q4_0", 160, 96),
    ("q5_0", "q5_0", 96, 224),
    ("q4_k", "q6_k", 512, 256),
    ("q6_k", "q4_k", 256, 512),
    ("q4_k", "q5_0", 256, 288),
    ("q5_0", "q8_0", 96, 352),
    ("q5_1", "q5_1", 160, 96),
    ("iq4_nl", "iq4_nl", 96, 288),
    ("q4_k", "iq4_nl", 256, 224),
    ("iq4_nl", "q5_1", 288, 160),
]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Kernels built for these tests go to a temporary cache, not the user's."""
    monkeypatch.setenv("GLMTG_CACHE", str(tmp_path_factory.getbasetemp() / "glmtg-cache"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("GLMTG_CPU_MARCH", raising=False)


def _dequant64(raw: torch.Tensor, fmt: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType(REGISTRY[fmt].gguf_type)
    return gguf.quants.dequantize(raw.numpy(), qtype).astype(np.float64)


def _round_fp32(x: np.ndarray) -> np.ndarray:
    """x fp32 [..., K] -> codes · dx in float64, codes computed in fp32 exactly as the kernel does."""
    g = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(g).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    codes = np.clip(np.rint((g * inv).astype(np.float32)), -127, 127)
    return (codes.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)).reshape(x.shape)


def _case(fmt_gu: str, fmt_d: str, h: int, i: int, t: int, k: int, seed: int):
    gate, up = (gguf_weight(fmt_gu, (E, i), h, seed + j) for j in (0, 1))
    down = gguf_weight(fmt_d, (E, h), i, seed + 2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * 0.1
    # distinct ids per token from [-1, E + 2): the out-of-range ones (-1, E, E + 1) must add nothing
    ids = torch.stack([torch.randperm(E + 3, generator=g)[:k] - 1 for _ in range(t)]).to(torch.int64)
    weights = torch.rand(t, k, generator=g) + 0.1
    return x, gate, up, down, ids, weights


def _reference(x, gate, up, down, ids, weights, fmt_gu, fmt_d):
    """(float64 reference [T, H], tolerance [T, H]) as the module docstring says."""
    t, h = x.shape
    xr = _round_fp32(x.numpy())
    ref, mag, amb = np.zeros((t, h)), np.zeros((t, h)), np.zeros((t, h))
    for tok in range(t):
        for s in range(ids.shape[1]):
            e = int(ids[tok, s])
            if not 0 <= e < E:
                continue
            w = float(weights[tok, s])
            gv = _dequant64(gate[e], fmt_gu) @ xr[tok]
            uv = _dequant64(up[e], fmt_gu) @ xr[tok]
            a = (gv / (1.0 + np.exp(-gv)) * uv).reshape(-1, 32)
            amax = np.abs(a).max(-1, keepdims=True)
            scaled = a * np.where(amax > 0, 127.0 / np.where(amax > 0, amax, 1.0), 0.0)
            dx = amax / 127.0
            aq = (np.rint(scaled) * dx).reshape(-1)
            near = (np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) < WINDOW)
            step = np.where(near, dx, 0.0).reshape(-1)
            dn = _dequant64(down[e], fmt_d)
            ref[tok] += w * (dn @ aq)
            mag[tok] += abs(w) * (np.abs(dn) @ np.abs(aq))
            amb[tok] += abs(w) * (np.abs(dn) @ step)
    return ref, RTOL * mag + amb


def _check_close(out: torch.Tensor, ref: np.ndarray, tol: np.ndarray) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = np.abs(out.numpy().astype(np.float64) - ref)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0  # a test that can fail
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert (err <= tol).all(), f"err {err[worst]:.3g} > tol {tol[worst]:.3g} at {worst} (ref {ref[worst]:.4g})"


@pytest.mark.parametrize("t", [1, 3, 5])
@pytest.mark.parametrize("fmt_gu,fmt_d,h,i", CASES, ids=[f"{a}-{b}" for a, b, _, _ in CASES])
def test_matches_float64_reference(fmt_gu, fmt_d, h, i, t):
    k = 2 + (CASES.index((fmt_gu, fmt_d, h, i)) * 3 + t) % 7  # k = 2..8 across the cases
    args = _case(fmt_gu, fmt_d, h, i, t, k, seed=100 * t + CASES.index((fmt_gu, fmt_d, h, i)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the compiled kernel, not the fallback
        out = cpu_moe(*args, fmt_gu, fmt_d)
    _check_close(out, *_reference(*args, fmt_gu, fmt_d))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 targets")
@pytest.mark.parametrize("march,isa", [("x86-64", "scalar"), ("x86-64-v3", "avx2")])
def test_other_targets_match_too(march, isa, monkeypatch):
    # the build for this machine is checked above; the portable C dots and plain AVX2 (no VNNI) here
    monkeypatch.setenv("GLMTG_CPU_MARCH", march)
    assert kernel_isa() == isa
    for n, (fmt_gu, fmt_d, h, i) in enumerate(CASES):
        args = _case(fmt_gu, fmt_d, h, i, 3, 2 + n % 7, seed=50 + n)  # k = 2..8 (at most E + 3 ids)
        _check_close(cpu_moe(*args, fmt_gu, fmt_d), *_reference(*args, fmt_gu, fmt_d))


def test_threads_do_not_change_the_result():
    # each output value is computed by one thread in a fixed order: any thread count gives the same bits
    args = _case("q4_k", "q6_k", 256, 512, 3, 8, seed=7)
    one = cpu_moe(*args, "q4_k", "q6_k", threads=1)
    assert torch.equal(one, cpu_moe(*args, "q4_k", "q6_k", threads=3))


def test_all_slots_elsewhere_give_zeros():
    x, gate, up, down, ids, weights = _case("q8_0", "q8_0", 64, 64, 3, 2, seed=3)
    out = cpu_moe(x, gate, up, down, torch.full_like(ids, -1), weights, "q8_0", "q8_0")
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("fmt_gu,fmt_d,h,i", [("q4_k", "q5_0", 256, 288), ("q5_1", "iq4_nl", 160, 96)])
@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"], ids=["missing", "failing"])
def test_fallback_without_compiler(cc, fmt_gu, fmt_d, h, i, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("GLMTG_CACHE", str(tmp_path))
    args = _case(fmt_gu, fmt_d, h, i, 3, 5, seed=11)
    with pytest.warns(RuntimeWarning, match="slower torch path"):
        out = cpu_moe(*args, fmt_gu, fmt_d)
    _check_close(out, *_reference(*args, fmt_gu, fmt_d))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # said once, not on every call
        again = cpu_moe(*args, fmt_gu, fmt_d)
    assert torch.equal(out, again)
    assert not any(p.suffix == ".so" for p in tmp_path.iterdir())


def test_builds_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMTG_CACHE", str(tmp_path / "c"))
    cpu_moe(*_case("q8_0", "q8_0", 32, 32, 1, 2, seed=1), "q8_0", "q8_0")
    assert [p.suffix for p in (tmp_path / "c").iterdir()] == [".so"]


def _bad(**change):
    x, gate, up, down, ids, weights = _case("q4_0", "q4_0", 64, 96, 3, 2, seed=5)
    args = dict(x=x, gate=gate, up=up, down=down, ids=ids, weights=weights, gate_up_fmt="q4_0", down_fmt="q4_0")
    args.update(change)
    return args


@pytest.mark.parametrize("name,change", [
    ("gate_up_fmt", dict(gate_up_fmt="q4_1")),
    ("down_fmt", dict(down_fmt="iq4_xs")),
    ("x", dict(x=torch.randn(3, 64, dtype=torch.float16))),
    ("x", dict(x=torch.randn(64, 3).T)),
    ("x", dict(x=torch.randn(3, 48))),
    ("gate", dict(gate=torch.zeros(E, 96, 37, dtype=torch.uint8))),
    ("up", dict(up=torch.zeros(E, 95, 36, dtype=torch.uint8))),
    ("down", dict(down=torch.zeros(E, 64, 18 * 3, dtype=torch.int8))),
    ("ids", dict(ids=torch.zeros(3, 2, dtype=torch.int32))),
    ("ids", dict(ids=torch.zeros(2, 2, dtype=torch.int64))),
    ("weights", dict(weights=torch.ones(3, 3))),
    ("threads", dict(threads=0)),
])
def test_bad_inputs_name_the_argument(name, change):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cpu_moe(**_bad(**change))


def test_unsupported_format_lists_the_supported():
    with pytest.raises(ValueError, match=", ".join(CPU_FORMATS)):
        cpu_moe(**_bad(gate_up_fmt="q2_k"))


def test_ids_outside_range_add_nothing_besides_valid_slots():
    # the same tokens with the out-of-range slots removed give the same output, bit for bit
    x, gate, up, down, ids, weights = _case("q6_k", "q6_k", 256, 256, 5, 4, seed=9)
    ids[:, 1] = torch.tensor([-1, E, 10 ** 12, -(10 ** 12), -2])
    kept = torch.cat([ids[:, :1], ids[:, 2:]], 1).contiguous()
    kw = torch.cat([weights[:, :1], weights[:, 2:]], 1).contiguous()
    assert torch.equal(cpu_moe(x, gate, up, down, ids, weights, "q6_k", "q6_k"),
                       cpu_moe(x, gate, up, down, kept, kw, "q6_k", "q6_k"))

