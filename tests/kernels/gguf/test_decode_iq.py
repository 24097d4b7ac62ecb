"""The grid-type block decoders (glmtg/kernels/gguf/decode_iq.py) beyond test_dequant.py's random bytes:
blocks with finite fp16 scales checked bit for bit against ``gguf.quants.dequantize`` itself (random bytes
make many scales inf or NaN, where a wrong product can hide behind a NaN), odd row and block counts that
leave blocks of a program masked, an output poisoned with NaN, masked blocks decoding to 0, the lookup
tables equal to the gguf package's grids, and (this file run as a script, ``python tests/kernels/gguf/test_decode_iq.py``) each
decoder compiled for sm_90 inside a GEMV-like loop: no spills, and no per-group tensor moved between
layouts (through shared memory), which the interpreter cannot show.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from glmtg.formats import REGISTRY
from glmtg.kernels.gguf.decode import DECODED, decode_blocks
from glmtg.kernels.gguf.dequant import dequantize_rows
from glmtg.kernels.gguf.tables import lookup_table

GRID_TYPES = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m")
DONE = tuple(n for n in GRID_TYPES if n in DECODED)
# the interpreter on a CPU-only machine, the GPU where there is one
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _finite_scale_rows(name: str, rows: int, blocks: int, seed: int) -> torch.Tensor:
    """Random block bytes whose fp16 super-block scale is a random finite normal number, +-[2^-8, 2^4)."""
    f = REGISTRY[name]
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, blocks, f.type_size), dtype=torch.uint8, generator=gen)
    exponent = torch.randint(15 - 8, 15 + 4, (rows, blocks), generator=gen)  # fp16 bias 15
    bits = (torch.randint(0, 2, (rows, blocks), generator=gen) << 15) | (exponent << 10) \
        | torch.randint(0, 1 << 10, (rows, blocks), generator=gen)
    if name == "iq1_m":
        # the fp16 scale lives in the top nibbles of the four uint16 words at bytes 48..55, low nibble first
        for w in range(4):
            hi = raw[:, :, 48 + 2 * w + 1]
            raw[:, :, 48 + 2 * w + 1] = (hi & 0x0F) | (((bits >> (4 * w)) & 0xF) << 4).to(torch.uint8)
    else:
        raw[:, :, 0] = (bits & 0xFF).to(torch.uint8)
        raw[:, :, 1] = (bits >> 8).to(torch.uint8)
    return raw.reshape(rows, blocks * f.type_size)


@pytest.mark.parametrize("name", DONE)
@pytest.mark.parametrize("rows,blocks", [(3, 5), (1, 3)])
def test_finite_scales_bit_exact_with_gguf(name: str, rows: int, blocks: int) -> None:
    raw = _finite_scale_rows(name, rows, blocks, seed=rows * 10 + blocks)
    qtype = gguf.GGMLQuantizationType(REGISTRY[name].gguf_type)
    want = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).astype(np.float32))
    assert bool(want.isfinite().all())  # the point of this test: no scale hides an error behind NaN/Inf
    out = torch.full(want.shape, float("nan"), dtype=torch.float32, device=DEVICE)
    got = dequantize_rows(raw.to(DEVICE), name, out=out).cpu()
    # bit for bit: the decoders form gguf's fp32 products in gguf's order
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@triton.jit
def _decode_2x2_kernel(W, Out, Aux, Mask, FMT: tl.constexpr, TS: tl.constexpr):
    # blocks [2, 2] (block b = 2 r + g at W + b * TS) decoded under Mask, all 4 x 256 values stored
    b = tl.arange(0, 2)[:, None] * 2 + tl.arange(0, 2)[None, :]
    v = decode_blocks(W + b * TS, tl.load(Mask + b) != 0, Aux, FMT, 256)
    tl.store(Out + b[:, :, None] * 256 + tl.arange(0, 256)[None, None, :], v)


@pytest.mark.parametrize("name", DONE)
def test_masked_blocks_decode_to_zero(name: str) -> None:
    raw = _finite_scale_rows(name, 1, 4, seed=5)
    qtype = gguf.GGMLQuantizationType(REGISTRY[name].gguf_type)
    want = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).astype(np.float32)).view(4, 256)
    keep = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    out = torch.full((4, 256), float("nan"), dtype=torch.float32, device=DEVICE)
    f = REGISTRY[name]
    _decode_2x2_kernel[(1,)](raw.to(DEVICE), out, lookup_table(name, DEVICE), keep.to(DEVICE), FMT=f.gguf_type,
                             TS=f.type_size)
    got = out.cpu()
    assert bool((got[1:3] == 0).all())  # masked: 0 (either sign), whatever the bytes hold
    assert torch.equal(got[[0, 3]].view(torch.int32), want[[0, 3]].view(torch.int32))


@pytest.mark.parametrize("name", GRID_TYPES)
def test_lookup_table_is_gguf_grid(name: str) -> None:
    cls = getattr(gguf.quants, name.upper())
    cls.init_grid()
    grid = torch.from_numpy(cls.grid.reshape(cls.grid_shape).astype(np.float32))
    table = lookup_table(name, "cpu")
    assert table.dtype == (torch.int64 if grid.shape[1] == 8 else torch.int32)
    assert table.shape == (grid.shape[0],)
    # entry e holds row e's levels as little-endian signed bytes, level k in byte k
    shifts = torch.arange(grid.shape[1], dtype=torch.int64) * 8
    levels = ((table.to(torch.int64)[:, None] >> shifts) & 0xFF).to(torch.uint8).view(torch.int8)
    assert torch.equal(levels.float(), grid)
    assert lookup_table(name, "cpu") is table  # built once per type and device


# --- compile for sm_90 (as a script, outside the interpreter: see tests/kernels/conftest.py) --------------

# The decode tile of the check: 4 rows x 2 blocks (512 values a row a step, the GEMV's one-token step).
# With fewer groups than threads (R * G * 32 < 32 * num_warps) the per-group tensors are replicated across
# threads and conversions do appear: GEMV configurations should keep R * G * 32 >= 32 * num_warps.
_R, _G = 4, 2


def _gemv_like_kernel():
    import triton
    import triton.language as tl

    from glmtg.kernels.gguf.decode import decode_blocks

    @triton.jit
    def kernel(X, W, Y, Aux, N, NB, ROW_BYTES, FMT: tl.constexpr, TS: tl.constexpr, R: tl.constexpr,
               G: tl.constexpr):
        rows = tl.program_id(0) * R + tl.arange(0, R)
        acc = tl.zeros((R, G, 256), dtype=tl.float32)
        for g0 in range(0, NB, G):
            g = g0 + tl.arange(0, G)
            mask = (rows < N)[:, None] & (g < NB)[None, :]
            w = decode_blocks(W + rows.to(tl.int64)[:, None] * ROW_BYTES + (g * TS)[None, :], mask, Aux, FMT, 256)
            xv = tl.load(X + (g * 256)[:, None] + tl.arange(0, 256)[None, :], mask=(g < NB)[:, None], other=0.0)
            acc += w * xv.to(tl.float32)[None, :, :]
        tl.store(Y + rows, tl.sum(tl.sum(acc, axis=2), axis=1), mask=rows < N)

    return kernel


def _compile(name: str) -> dict[str, int]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    f = REGISTRY[name]
    aux = "*i64" if lookup_table(name, "cpu").dtype == torch.int64 else "*i32"
    sig = {"X": "*bf16", "W": "*u8", "Y": "*fp32", "Aux": aux, "N": "i32", "NB": "i32", "ROW_BYTES": "i32",
           "FMT": "constexpr", "TS": "constexpr", "R": "constexpr", "G": "constexpr"}
    const = {"FMT": f.gguf_type, "TS": f.type_size, "R": _R, "G": _G}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}  # the pointers, as real launches see them
    compiled = triton.compile(ASTSource(_gemv_like_kernel(), sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"decode_iq_{name}_{os.getpid()}.ptx")
    with open(path, "w") as fh:
        fh.write(compiled.asm["ptx"])
    try:
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.remove(path)
    # the decoder's own tensors are [R, G, 32] (joins: [R, G, 32, 2, ...]; [R, G, 64] for 4-wide rows) and
    # must stay where they are computed; the x tile and the decoded [R, G, 256] tile are the consumer's
    group_shape = re.compile(rf"tensor<{_R}x{_G}x(32|64)x")
    moved = sum(1 for line in compiled.asm["ttgir"].splitlines()
                if "ttg.convert_layout" in line and group_shape.search(line))
    return {"regs": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spills": int(re.search(r"(\d+) bytes spill stores", log).group(1)), "moved": moved}


def main() -> int:
    failed = 0
    print("| type | registers | spill bytes | per-group layout conversions |")
    print("|---|---|---|---|")
    for name in DONE:
        try:
            r = _compile(name)
        except Exception as exc:  # report and go on: one failure should not hide the others
            failed += 1
            cause = exc.__cause__ or exc
            print(f"| {name} | compile failed: {type(cause).__name__}: {str(cause)[:200]} |")
            continue
        print(f"| {name} | {r['regs']} | {r['spills']} | {r['moved']} |")
    return 1 if failed else 0


def test_decoders_compile_for_sm90_without_spills_or_conversions(compile_report) -> None:
    stdout, table = compile_report(__file__, timeout=300)
    rows = {cells[0]: [int(c) for c in cells[1:]] for cells in table if len(cells) == 4 and cells[0] in DONE}
    assert set(rows) == set(DONE), stdout
    for name, (_regs, spills, moved) in rows.items():
        assert spills == 0, f"{name} spills {spills} bytes\n{stdout}"
        assert moved == 0, f"{name} moves {moved} per-group tensors between layouts\n{stdout}"


if __name__ == "__main__":
    sys.exit(main())
