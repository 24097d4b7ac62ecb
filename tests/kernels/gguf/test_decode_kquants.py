"""The k-quant and IQ4_XS block decoders (glmtg/kernels/gguf/decode_kquants.py) on what test_dequant's
random bytes do not cover:

- finite scales, realistic (small positive fp16 ``d`` / ``dmin`` as llama.cpp's quantizers write) and
  any finite fp16 (subnormals, zeros, +-65504), against a float64 decode written here from
  ggml-quants.c's dequantize_row_* loops (independent of gguf's numpy and of our torch decoders) and
  against ``gguf.quants.dequantize`` itself. Tolerance zero against the float64 value rounded once to
  float32: for finite scales every product the decoders form is exact in float32 (Q6_K's last product,
  the one that is not, is followed by nothing), so each output is the exact value rounded once. On the
  GPU the compiler may contract ``scale * q - min`` into an FMA; the decoders compute in gguf's order so
  that this contraction is the only possible difference, and with the product exact it rounds to the
  same value, so the same zero tolerance holds there.
- a test kernel calling ``decode_blocks`` on [R, G] tiles with R, G > 1 over a grid whose edge tiles are
  partial: masked blocks point at bytes that decode to NaN, so they come back 0 only if the mask is
  applied; the output is poisoned with NaN first.
- the GPU compiler: the interpreter accepts code it may reject, so ``dequantize_rows``' kernel is compiled
  for sm_90 (PTX and ptxas, no GPU needed) for every type, in a subprocess (this file run as a script,
  ``python tests/kernels/gguf/test_decode_kquants.py`` prints the report): it must compile without spills.
Odd sizes throughout (3, 5, 7 rows or blocks). Interpreter on the CPU: tiny shapes.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from glmtg.formats import REGISTRY
from glmtg.formats.gguf_blocks import IQ4_LEVELS
from glmtg.kernels.gguf import decode_kquants as dk
from glmtg.kernels.gguf.decode import decode_blocks
from glmtg.kernels.gguf.dequant import dequantize_rows
from glmtg.kernels.gguf.tables import lookup_table

TYPES = ("q4_k", "q6_k", "q5_k", "iq4_xs", "q3_k", "q2_k")
# byte offsets of each type's fp16 fields (d, and dmin where it has one) inside its block
F16_FIELDS = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "iq4_xs": (0,), "q3_k": (108,), "q2_k": (80, 82)}


# --- float64 decoders, after ggml-quants.c ------------------------------------------------------------

def _h(b: np.ndarray, off: int) -> np.ndarray:
    """The fp16 at byte ``off`` of every block, as float64 [n, 1]."""
    return b[:, off:off + 2].copy().view(np.float16).astype(np.float64)


def _scale_min_k4(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for j = 0..7: int [n, 8] scales and mins."""
    q = sc12.astype(np.int64)
    d = np.empty((q.shape[0], 8), np.int64)
    m = np.empty_like(d)
    for j in range(8):
        if j < 4:
            d[:, j], m[:, j] = q[:, j] & 63, q[:, j + 4] & 63
        else:
            d[:, j] = (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4)
            m[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    return d, m


def _ref_q4_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _h(b, 0), _h(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    y = np.empty((b.shape[0], 256))
    for j in range(4):
        q = b[:, 16 + 32 * j:48 + 32 * j].astype(np.int64)
        y[:, 64 * j:64 * j + 32] = d * sc[:, 2 * j:2 * j + 1] * (q & 0xF) - dmin * mn[:, 2 * j:2 * j + 1]
        y[:, 64 * j + 32:64 * j + 64] = d * sc[:, 2 * j + 1:2 * j + 2] * (q >> 4) - dmin * mn[:, 2 * j + 1:2 * j + 2]
    return y


def _ref_q5_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _h(b, 0), _h(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48].astype(np.int64)
    y = np.empty((b.shape[0], 256))
    for j in range(4):
        ql = b[:, 48 + 32 * j:80 + 32 * j].astype(np.int64)
        u1, u2 = 1 << (2 * j), 2 << (2 * j)
        lo = (ql & 0xF) + np.where(qh & u1, 16, 0)
        hi = (ql >> 4) + np.where(qh & u2, 16, 0)
        y[:, 64 * j:64 * j + 32] = d * sc[:, 2 * j:2 * j + 1] * lo - dmin * mn[:, 2 * j:2 * j + 1]
        y[:, 64 * j + 32:64 * j + 64] = d * sc[:, 2 * j + 1:2 * j + 2] * hi - dmin * mn[:, 2 * j + 1:2 * j + 2]
    return y


def _ref_q6_k(b: np.ndarray) -> np.ndarray:
    d = _h(b, 208)
    y = np.empty((b.shape[0], 256))
    l = np.arange(32)
    for n in range(2):
        ql = b[:, 64 * n:64 * n + 64].astype(np.int64)
        qh = b[:, 128 + 32 * n:160 + 32 * n].astype(np.int64)
        sc = b[:, 192 + 8 * n:200 + 8 * n].view(np.int8).astype(np.int64)
        is_ = l // 16
        q1 = ((ql[:, l] & 0xF) | (((qh[:, l] >> 0) & 3) << 4)) - 32
        q2 = ((ql[:, l + 32] & 0xF) | (((qh[:, l] >> 2) & 3) << 4)) - 32
        q3 = ((ql[:, l] >> 4) | (((qh[:, l] >> 4) & 3) << 4)) - 32
        q4 = ((ql[:, l + 32] >> 4) | (((qh[:, l] >> 6) & 3) << 4)) - 32
        base = 128 * n
        y[:, base + l] = d * sc[:, is_] * q1
        y[:, base + l + 32] = d * sc[:, is_ + 2] * q2
        y[:, base + l + 64] = d * sc[:, is_ + 4] * q3
        y[:, base + l + 96] = d * sc[:, is_ + 6] * q4
    return y


def _ref_iq4_xs(b: np.ndarray) -> np.ndarray:
    d = _h(b, 0)
    scales_h = b[:, 2:4].copy().view(np.uint16).astype(np.int64)
    levels = np.array(IQ4_LEVELS, dtype=np.int64)
    y = np.empty((b.shape[0], 256))
    for ib in range(8):
        ls = ((b[:, 4 + ib // 2].astype(np.int64)[:, None] >> 4 * (ib % 2)) & 0xF) | (((scales_h >> 2 * ib) & 3) << 4)
        dl = d * (ls - 32)
        qs = b[:, 8 + 16 * ib:24 + 16 * ib].astype(np.int64)
        y[:, 32 * ib:32 * ib + 16] = dl * levels[qs & 0xF]
        y[:, 32 * ib + 16:32 * ib + 32] = dl * levels[qs >> 4]
    return y


def _ref_q3_k(b: np.ndarray) -> np.ndarray:
    d = _h(b, 108)
    aux = b[:, 96:108].copy().view(np.uint32).astype(np.int64)  # [n, 3] words, as the C code reads them
    k1, k2 = 0x03030303, 0x0F0F0F0F
    tmp = aux[:, 2]
    words = np.stack([(aux[:, 0] & k2) | (((tmp >> 0) & k1) << 4), (aux[:, 1] & k2) | (((tmp >> 2) & k1) << 4),
                      ((aux[:, 0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                      ((aux[:, 1] >> 4) & k2) | (((tmp >> 6) & k1) << 4)], axis=1)
    scales = words.astype(np.uint32).view(np.int8).astype(np.int64)  # [n, 16]
    hm = b[:, 0:32].astype(np.int64)
    y = np.empty((b.shape[0], 256))
    is_, m, pos = 0, 1, 0
    for n in range(2):
        q = b[:, 32 + 32 * n:64 + 32 * n].astype(np.int64)
        for j in range(4):
            for half in range(2):
                dl = d * (scales[:, is_:is_ + 1] - 32)
                part = slice(16 * half, 16 * half + 16)
                y[:, pos:pos + 16] = dl * (((q[:, part] >> 2 * j) & 3) - np.where(hm[:, part] & m, 0, 4))
                is_, pos = is_ + 1, pos + 16
            m <<= 1
    return y


def _ref_q2_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _h(b, 80), _h(b, 82)
    scales = b[:, 0:16].astype(np.int64)
    y = np.empty((b.shape[0], 256))
    is_, pos = 0, 0
    for n in range(2):
        q = b[:, 16 + 32 * n:48 + 32 * n].astype(np.int64)
        for j in range(4):
            for half in range(2):
                sc = scales[:, is_:is_ + 1]
                part = slice(16 * half, 16 * half + 16)
                y[:, pos:pos + 16] = d * (sc & 0xF) * ((q[:, part] >> 2 * j) & 3) - dmin * (sc >> 4)
                is_, pos = is_ + 1, pos + 16
    return y


REF64 = {"q4_k": _ref_q4_k, "q5_k": _ref_q5_k, "q6_k": _ref_q6_k, "iq4_xs": _ref_iq4_xs, "q3_k": _ref_q3_k,
         "q2_k": _ref_q2_k}


# --- inputs ------------------------------------------------------------------------------------------

def finite_rows(name: str, rows: int, blocks: int, seed: int, realistic: bool) -> torch.Tensor:
    """Random blocks whose fp16 fields are finite: realistic (d, dmin in [2^-14, 2^-7], as quantizers write
    for weights of magnitude ~0.01-1) or any finite fp16 bit pattern (Inf/NaN exponents pulled down)."""
    f = REGISTRY[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * blocks, f.type_size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        field = raw[:, off:off + 2].copy().view(np.uint16)
        if realistic:
            field = rng.uniform(2.0 ** -14, 2.0 ** -7, field.shape).astype(np.float16).view(np.uint16)
        else:
            inf_nan = (field & 0x7C00) == 0x7C00
            field = np.where(inf_nan, field & ~np.uint16(0x4000), field).astype(np.uint16)
        raw[:, off:off + 2] = field.view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, blocks * f.type_size))


def _want(name: str, raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, the same rounded once to float32), shaped [rows, blocks * 256]."""
    f = REGISTRY[name]
    b = raw.numpy().reshape(-1, f.type_size)
    v64 = REF64[name](b).reshape(raw.shape[0], -1)
    return v64, v64.astype(np.float32)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("realistic", [True, False], ids=["realistic", "any_finite"])
def test_decoders_match_float64_rounded_once(name: str, realistic: bool) -> None:
    raw = finite_rows(name, 7, 3, seed=10 * TYPES.index(name) + realistic, realistic=realistic)
    v64, want = _want(name, raw)
    assert np.isfinite(v64).all() and np.count_nonzero(v64) > v64.size // 2  # a test that can fail
    got = dequantize_rows(raw, name).numpy()
    # zero tolerance: each value is its exact (float64) expression rounded once to float32 (module docstring)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    # and gguf's own decoder, the definition of right, agrees bit for bit
    ref = gguf.quants.dequantize(raw.numpy(), REGISTRY[name].gguf_type).reshape(got.shape)
    np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32))


def test_iq4_level_polynomial_rounds_to_every_level() -> None:
    # The decoder computes IQ4_XS's levels as a rounded quartic; its error must stay well inside 0.5 in fp32
    # whether or not the GPU contracts the Horner steps into FMAs (float64 steps rounded to fp32 stand in
    # for fused ones: each product of two fp32 values is exact in float64).
    coef = [np.float32(c.value) for c in (dk.IQ4_POLY_4, dk.IQ4_POLY_3, dk.IQ4_POLY_2, dk.IQ4_POLY_1, dk.IQ4_POLY_0)]
    x = np.arange(16, dtype=np.float32)
    unfused, fused = np.full(16, coef[0], np.float32), np.full(16, coef[0], np.float32)
    for c in coef[1:]:
        unfused = (unfused * x).astype(np.float32) + c
        fused = (fused.astype(np.float64) * x + np.float64(c)).astype(np.float32)
    levels = np.array(IQ4_LEVELS, dtype=np.float32)
    for p in (unfused, fused):
        assert np.abs(p - levels).max() < 0.44
        np.testing.assert_array_equal((p + np.float32(12582912.0)) - np.float32(12582912.0), levels)


def test_iq4_xs_every_code_in_both_nibbles() -> None:
    # qs bytes 0..255 over two blocks: every code as a low and as a high nibble, next to every other
    raw = finite_rows("iq4_xs", 1, 2, seed=5, realistic=True).view(2, -1)
    raw[:, 8:] = torch.arange(256, dtype=torch.uint8).view(2, 128)
    raw = raw.reshape(1, -1)
    _, want = _want("iq4_xs", raw)
    got = dequantize_rows(raw, "iq4_xs").numpy()
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


# --- decode_blocks on partial [R, G] tiles ---------------------------------------------------------------

@triton.jit
def _tiles_kernel(W, Out, Aux, N, NB, ROW_BYTES, FMT: tl.constexpr, TS: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_G: tl.constexpr):
    # Stores the whole [BLOCK_R, BLOCK_G, 256] tile, masked blocks included (they must come back 0).
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    mask = (r < N)[:, None] & (g < NB)[None, :]
    blk = W + r[:, None] * ROW_BYTES + (g * TS)[None, :]
    v = decode_blocks(blk, mask, Aux, FMT, 256)
    j = tl.arange(0, 256)
    offs = r[:, None, None] * (tl.num_programs(1) * BLOCK_G * 256) + (g * 256)[None, :, None] + j[None, None, :]
    tl.store(Out + offs, v)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("block_r,block_g", [(2, 4), (1, 1)])
def test_decode_blocks_partial_tiles_masked_to_zero(name: str, block_r: int, block_g: int) -> None:
    f = REGISTRY[name]
    rows, blocks = 3, 5  # at 2 x 4: grid 2 x 2, the last row tile and block tile partial; 1 x 1: no mask
    grid = (triton.cdiv(rows, block_r), triton.cdiv(blocks, block_g))
    pr, pb = grid[0] * block_r, grid[1] * block_g
    raw = finite_rows(name, rows, blocks, seed=11, realistic=True)
    # the padding blocks are all 0xFF: every fp16 field NaN, so reading one unmasked would give NaN, not 0
    padded = torch.full((pr, pb * f.type_size), 0xFF, dtype=torch.uint8)
    padded[:rows, :blocks * f.type_size] = raw
    out = torch.full((pr, pb * 256), float("nan"), dtype=torch.float32)
    _tiles_kernel[grid](padded, out, lookup_table(name, "cpu"), rows, blocks, pb * f.type_size, FMT=f.gguf_type,
                        TS=f.type_size, BLOCK_R=block_r, BLOCK_G=block_g)
    _, want = _want(name, raw)
    got = out.view(pr, pb, 256)
    np.testing.assert_array_equal(got[:rows, :blocks].reshape(rows, -1).numpy().view(np.int32), want.view(np.int32))
    pad = torch.ones(pr, pb, dtype=torch.bool)
    pad[:rows, :blocks] = False
    assert bool((got[pad] == 0).all()), "masked blocks must decode to 0 without being read"


# --- compiles for sm_90 ----------------------------------------------------------------------------------

def _compile_sm90(name: str) -> dict[str, int]:
    """Compile dequantize_rows' kernel for ``name`` at the tile it launches for k-quants (4 rows x 4 blocks,
    4 warps) with the launcher's 16-divisibility hints; registers and spills from ptxas."""
    import inspect
    import os
    import re
    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from glmtg.kernels.gguf.dequant import _dequant_rows_kernel

    f = REGISTRY[name]
    const = {"FMT": f.gguf_type, "BS": 256, "TS": f.type_size, "BLOCK_R": 4, "BLOCK_G": 4}
    pointers = {"W": "*u8", "Out": "*fp32", "Aux": "*i32"}
    sig, attrs = {}, {}
    for i, p in enumerate(inspect.signature(_dequant_rows_kernel.fn).parameters):
        sig[p] = "constexpr" if p in const else pointers.get(p, "i32")
        if sig[p].startswith("*") or p == "ROW_BYTES":
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(_dequant_rows_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"decode_kquants_{name}_{os.getpid()}.ptx")
    with open(path, "w") as fh:
        fh.write(ptx)
    try:
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.remove(path)
    return {"regs": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spills": int(re.search(r"(\d+) bytes spill stores", log).group(1)), "loads": ptx.count("ld.global")}


def main() -> int:
    failed = 0
    print("| type | registers | spill bytes | global loads |")
    print("|---|---|---|---|")
    for name in TYPES:
        try:
            r = _compile_sm90(name)
        except Exception as exc:  # noqa: BLE001 - report and go on: one failure should not hide the others
            failed += 1
            cause = exc.__cause__ or exc
            print(f"| {name} | compile failed: {type(cause).__name__}: {str(cause)[:200]} |")
            continue
        print(f"| {name} | {r['regs']} | {r['spills']} | {r['loads']} |")
    return 1 if failed else 0


def test_decoders_compile_for_sm90_without_spills(compile_report) -> None:
    stdout, table = compile_report(__file__, timeout=300)
    rows = {cells[0]: [int(c) for c in cells[1:]] for cells in table if len(cells) == 4 and cells[0] in TYPES}
    assert sorted(rows) == sorted(TYPES), stdout
    for name, (_, spills, _) in rows.items():
        assert spills == 0, f"{name} spills {spills} bytes"


if __name__ == "__main__":
    sys.exit(main())
