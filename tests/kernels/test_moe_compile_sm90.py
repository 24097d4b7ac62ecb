"""The MoE decode kernels compile for the H100 (sm_90) on any machine, with the code their speed rests on.

The interpreter (CPU tests) accepts code the GPU compiler may reject, and says nothing about the machine
code. Compiling to PTX and cubin needs no GPU; it runs in a subprocess (this file as a script) because the
interpreter replaces the kernels in the test process. Checked for bf16 at the default blocks: weight tiles
are read with 16-byte loads and nothing spills (the kernels rely on many resident programs to keep bytes
in flight). ``python tests/kernels/test_moe_compile_sm90.py`` prints the report.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as the compile script: the repository root on the path (tests.references)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

KERNELS = ("gate_up", "down")
DTYPES = ("bf16", "fp16", "fp32")


def _compile(kernel_name: str, dtype: str):
    import inspect

    from glmtg.kernels import moe_decode as md
    from tests.references.ptxas import compile_sm90_report

    defaults = {n: p.default for n, p in inspect.signature(md.moe_decode).parameters.items()}
    if kernel_name == "gate_up":
        kernel = md._gate_up_kernel
        ptrs = dict(X=dtype, Gate=dtype, Up=dtype, Ids="i64", Act="fp32")
        const = dict(BLOCK_I=defaults["block_i"], BLOCK_K=defaults["block_k"])
    else:
        kernel = md._down_kernel
        ptrs = dict(Act="fp32", Down=dtype, Ids="i64", Weights="fp32", Y=dtype)
        const = dict(BLOCK_H=defaults["block_h"], BLOCK_K=defaults["block_k_down"])
    # The launcher's 16-divisibility specialisation for real launches: pointers, and HIDDEN = 4096, INTER = 1408
    return compile_sm90_report(kernel, {name: "*" + t for name, t in ptrs.items()}, const,
                               divisible=("HIDDEN", "INTER"), num_warps=defaults["num_warps"], tag="moe")


def main() -> int:
    failed = 0
    print("| kernel | dtype | registers | spill bytes | 16-B loads | all global loads |")
    print("|---|---|---|---|---|---|")
    for kernel_name in KERNELS:
        for dtype in DTYPES:
            try:
                r = _compile(kernel_name, dtype)
            except Exception as exc:  # report and go on: one failure should not hide the others
                failed += 1
                cause = exc.__cause__ or exc
                print(f"| {kernel_name} | {dtype} | compile failed: {type(cause).__name__}: {str(cause)[:200]} |")
                continue
            print(f"| {kernel_name} | {dtype} | {r['regs']} | {r['spills']} | {r['v4']} | {r['loads']} |")
    return 1 if failed else 0


def test_moe_decode_kernels_compile_for_sm90(compile_report):
    stdout, table = compile_report(__file__, timeout=600)
    rows = {(cells[0], cells[1]): [int(c) for c in cells[2:]] for cells in table
            if len(cells) == 6 and cells[0] in KERNELS}
    assert len(rows) == len(KERNELS) * len(DTYPES), stdout
    for (kernel_name, dtype), cells in rows.items():
        assert cells[1] == 0, f"{kernel_name} {dtype} spills {cells[1]} bytes"
    # bf16 at the default blocks: per thread, 4 16-byte loads per weight tile (gate and up: 8), not scalars
    assert rows["gate_up", "bf16"][2] >= 8, stdout
    assert rows["down", "bf16"][2] >= 4, stdout


if __name__ == "__main__":
    sys.exit(main())
