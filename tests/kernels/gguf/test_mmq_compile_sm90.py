"""The dequantizing GEMMs (glmtg/kernels/gguf/mmq.py, mmq_moe.py) compile for sm_90 at their default GPU
launches (GLM-4.5-Air prefill: T = 4096, 12288 rows; 128 experts, top 8), on any machine: tensor-core dots
(wgmma) for bf16 x, no register spills, shared memory within Hopper's 227 KB a block.

The CPU tests run the kernels in the interpreter, which neither compiles them nor has a tensor core; this
catches what only the compiler sees (layouts of the decoded tiles feeding tl.dot, the IEEE fp32 dot,
registers; fp32 x with 32-value blocks is checked too, 256-value ones spill there by design: see
mmq.fp32_config). It runs this file as a script in a subprocess (tests/kernels/conftest.py ``compile_report``),
outside the interpreter.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as the compile script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import pytest  # noqa: E402

DENSE = ("q4_0", "q5_0", "q8_0", "iq4_nl", "q4_k", "q6_k", "iq4_xs", "iq2_xxs", "f16")
MOE = ("q4_0", "q5_0", "q4_k", "q6_k")
HOPPER_SHARED = 227 * 1024


def _compile(kernel, const: dict, pointers: dict, options: dict) -> dict:
    """Compile for sm_90a; ptxas registers and spills, wgmma count and shared bytes."""
    from tests.references.ptxas import compile_sm90, ptxas_report

    # the launchers' 16-divisibility hints: aligned tensors, row strides and widths of the Air shapes
    compiled = compile_sm90(kernel, pointers, const, options=options,
                            divisible=("ROW_BYTES", "STRIDE_XT", "STRIDE_YT", "K", "H", "I"))
    report = ptxas_report(compiled.asm["ptx"], "mmq_sm90")
    return {**report, "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"), "shared": compiled.metadata.shared}


def _cases():
    from glmtg.formats import REGISTRY
    from glmtg.kernels.gguf.mmq import _mmq_kernel, default_config
    from glmtg.kernels.gguf.mmq_moe import (
        _combine_kernel,
        _down_kernel,
        _gate_up_kernel,
        default_moe_config,
    )

    for name, dtype in [(n, "bf16") for n in DENSE] + [("q4_0", "fp32")]:
        f = REGISTRY[name]
        c = default_config(f.block_size, 4096, 12288, True, dtype == "fp32")
        const = {"FMT": f.gguf_type, "BS": f.block_size, "TS": f.type_size, "BLOCK_M": c.block_m,
                 "BLOCK_N": c.block_n, "G": c.block_k // max(f.block_size, 1), "GROUP_M": c.group_m,
                 "HAS_BIAS": True, "HAS_RES": True, "IEEE": dtype == "fp32"}
        ptrs = {"X": f"*{dtype}", "W": "*u8", "Y": f"*{dtype}", "Bias": f"*{dtype}", "Res": f"*{dtype}", "Aux": "*i32"}
        yield f"mmq {name} {dtype}", dtype, _mmq_kernel, const, ptrs, {"num_warps": c.num_warps,
                                                                         "num_stages": c.num_stages}
    for name in MOE:
        f = REGISTRY[name]
        for kernel, pair in ((_gate_up_kernel, True), (_down_kernel, False)):
            c = default_moe_config(f.block_size, 4096 * 8, 128, True, pair)
            const = {"FMT": f.gguf_type, "BS": f.block_size, "TS": f.type_size, "BLOCK_M": c.block_m,
                     "BLOCK_N": c.block_n, "BLOCK_E": 128, "G": c.block_k // max(f.block_size, 1), "IEEE": False}
            ptrs = {"X": "*bf16", "Gate": "*u8", "Up": "*u8", "Down": "*u8", "Act": "*bf16", "Y": "*bf16",
                    "Order": "*i64", "PairEnds": "*i32", "TileEnds": "*i32", "Aux": "*i32"}
            yield f"{kernel.fn.__name__} {name} bf16", "bf16", kernel, const, ptrs, {"num_warps": c.num_warps,
                                                                                       "num_stages": c.num_stages}
    yield ("combine bf16", "none", _combine_kernel, {"TOP_K": 8, "BLOCK_T": 16, "BLOCK_H": 256},
           {"Y": "*bf16", "Ids": "*i64", "Weights": "*fp32", "Out": "*bf16"}, {"num_warps": 4})


def main() -> int:
    failed = 0
    print("| kernel | x | registers | spill bytes | wgmma | shared bytes |")
    print("|---|---|---|---|---|---|")
    for label, dtype, kernel, const, ptrs, options in _cases():
        try:
            r = _compile(kernel, const, ptrs, options)
        except Exception as exc:  # noqa: BLE001 - report and go on: one failure should not hide the others
            failed += 1
            cause = exc.__cause__ or exc
            print(f"| {label} | {dtype} | compile failed: {type(cause).__name__}: {str(cause)[:200]} | | | |")
            continue
        print(f"| {label} | {dtype} | {r['regs']} | {r['spills']} | {r['wgmma']} | {r['shared']} |")
    return 1 if failed else 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mmq_kernels_compile_for_sm90(compile_report) -> None:
    stdout, table = compile_report(__file__, timeout=300)
    rows = [cells for cells in table if len(cells) == 6 and cells[0] != "kernel" and not cells[0].startswith("-")]
    assert len(rows) == len(DENSE) + 1 + 2 * len(MOE) + 1, stdout
    for label, dtype, regs, spills, wgmma, shared in rows:
        assert int(spills) == 0, f"{label} spills {spills} bytes"
        assert int(shared) <= HOPPER_SHARED, f"{label} takes {shared} bytes of shared memory"
        if dtype == "bf16":
            assert int(wgmma) > 0, f"{label} does not use the tensor cores (no wgmma)"


if __name__ == "__main__":
    sys.exit(main())
