"""The decode-batch kernels (glmtg/kernels/gguf/mmq_small.py, mmq_i8.py, moe_i8.py; mmq_moe.py at small_batch's launches
and the pair grouping of moe_groups.py) compile for sm_80, sm_86, sm_89 and sm_90 at their default GPU launches for T = 8 and 64, bf16 x, on any machine:
tensor-core dots (mma / wgmma in the PTX), shared memory within each architecture's per-block limit (a launch
over it would be shrunk at run time by mmq.launch_fitted, at a cost), and no register spills on sm_90 (ptxas).

The CPU tests run the kernels in the interpreter, which neither compiles them nor has a tensor core. It runs
this file as a script in a subprocess (tests/kernels/conftest.py ``compile_report``), outside the interpreter.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as the compile script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import pytest  # noqa: E402

ARCHS = (80, 86, 89, 90)
DENSE = ("q4_0", "q5_0", "q8_0", "q4_k", "q6_k")
MOE = (("q4_0", "q8_0"), ("q4_k", "q5_0"), ("q4_k", "q6_k"))
TOKENS = (8, 64)
I8 = ("q4_0", "q8_0")


def _cases():
    from glmtg.formats import REGISTRY
    from glmtg.kernels.gguf import small_batch
    from glmtg.kernels.gguf.mmq_moe import _down_kernel, _gate_up_kernel
    from glmtg.kernels.gguf.mmq_small import _partial_kernel, _sum_kernel
    from glmtg.kernels.gguf.mmq_i8 import _i8_kernel, i8_config
    from glmtg.kernels.gguf.moe_groups import _group_kernel
    from glmtg.kernels.gguf import moe_i8

    def blocks(f) -> dict:
        return {"FMT": f.gguf_type, "BS": f.block_size, "TS": f.type_size}

    for name in DENSE:
        f = REGISTRY[name]
        for t in TOKENS:
            c = small_batch.dense_config(f.block_size, t, on_gpu=True)
            const = {**blocks(f), "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "G": c.block_k // f.block_size,
                     "IEEE": False}
            yield (f"partial {name} T={t}", True, _partial_kernel, const,
                   {"X": "*bf16", "W": "*u8", "P": "*fp32", "Aux": "*i32"},
                   {"num_warps": c.num_warps, "num_stages": c.num_stages})
    for name in I8:
        f = REGISTRY[name]
        for t in TOKENS:
            block_m, block_n, warps = i8_config(t, on_gpu=True)
            yield (f"i8 {name} T={t}", True, _i8_kernel,
                   {"Q4": name == "q4_0", "TS": f.type_size, "BLOCK_M": block_m, "BLOCK_N": block_n,
                    "PARTIAL": t == 8, "HAS_BIAS": True, "HAS_RES": True},
                   {"XQ": "*i8", "DX": "*fp32", "XS": "*i32", "W": "*u8", "Y": "*bf16", "P": "*fp32",
                    "Bias": "*bf16", "Res": "*bf16"}, {"num_warps": warps, "num_stages": 3})
    for name in I8:
        f = REGISTRY[name]
        yield (f"moe_i8 gate_up {name}", True, moe_i8._gate_up_kernel,
               {"Q4": name == "q4_0", "TS": f.type_size, "BLOCK_M": 16, "BLOCK_E": 128},
               {"XQ": "*i8", "DX": "*fp32", "XS": "*i32", "Gate": "*u8", "Up": "*u8", "AQ": "*i8", "ADX": "*fp32",
                "AS": "*i32", "Like": "*bf16", "Order": "*i64", "PairEnds": "*i32"}, {"num_warps": 4, "num_stages": 3})
        yield (f"moe_i8 down {name}", True, moe_i8._down_kernel,
               {"Q4": name == "q4_0", "TS": f.type_size, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_E": 128},
               {"AQ": "*i8", "ADX": "*fp32", "AS": "*i32", "Down": "*u8", "Y": "*bf16", "Order": "*i64",
                "PairEnds": "*i32"}, {"num_warps": 4, "num_stages": 3})
    yield ("sum bf16", False, _sum_kernel, {"BLOCK_T": 16, "BLOCK_N": 128, "HAS_BIAS": True, "HAS_RES": True},
           {"P": "*fp32", "Y": "*bf16", "Bias": "*bf16", "Res": "*bf16"}, {"num_warps": 4})
    yield ("group pairs", False, _group_kernel, {"BLOCK_P": 64, "BLOCK_E": 128}, {"Ids": "*i64", "Order": "*i64",
                                                                                 "Ends": "*i32"}, {"num_warps": 8})
    for gu, dn in MOE:
        fg, fd = REGISTRY[gu], REGISTRY[dn]
        gcfg, dcfg = small_batch.moe_configs(fg.block_size, fd.block_size, on_gpu=True)
        for kernel, f, c in ((_gate_up_kernel, fg, gcfg), (_down_kernel, fd, dcfg)):
            const = {**blocks(f), "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_E": 128,
                     "G": c.block_k // f.block_size, "IEEE": False}
            yield (f"{kernel.fn.__name__} {f.name}", True, kernel, const,
                   {"X": "*bf16", "Gate": "*u8", "Up": "*u8", "Down": "*u8", "Act": "*bf16", "Y": "*bf16",
                    "Order": "*i64", "PairEnds": "*i32", "Aux": "*i32"},
                   {"num_warps": c.num_warps, "num_stages": c.num_stages})


def _compile(kernel, const: dict, pointers: dict, options: dict, cc: int):
    """Compile for sm_<cc> (sm_90a for 90) as the launchers would: pointers and row widths 16-divisible."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    const = dict(const)
    divisible = ("ROW_BYTES", "STRIDE_XT", "STRIDE_YT", "H", "I", "N")
    for i, (name, param) in enumerate(inspect.signature(kernel.fn).parameters.items()):
        if name not in const and name not in pointers and param.default is not inspect.Parameter.empty:
            const[name] = param.default
        sig[name] = "constexpr" if name in const else pointers.get(name, "i32")
        if sig[name].startswith("*") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", cc, 32), options=options)


def main() -> int:
    from glmtg.kernels.attention.plan import ARCH_PLANS
    from tests.references.ptxas import ptxas_report

    failed = 0
    print("| arch | kernel | dot | tensor-core ops | shared bytes | shared limit | sm_90 spill bytes |")
    print("|---|---|---|---|---|---|---|")
    for cc in ARCHS:
        limit = ARCH_PLANS[(cc // 10, cc % 10)].shared_kib_per_block * 1024
        for label, dot, kernel, const, ptrs, options in _cases():
            try:
                compiled = _compile(kernel, const, ptrs, options, cc)
                assert compiled.asm.get("cubin"), "no machine code"
                ptx = compiled.asm["ptx"]
                ops = ptx.count("wgmma.mma_async") + ptx.count("mma.sync")
                spills = ptxas_report(ptx, "mmq_small")["spills"] if cc == 90 else 0
            except Exception as exc:  # noqa: BLE001 - report and go on: one failure should not hide the others
                failed += 1
                cause = exc.__cause__ or exc
                print(f"| sm_{cc} | {label} | compile failed: {type(cause).__name__}: "
                      f"{' '.join(str(cause).split())[:200]} | | | | |")
                continue
            print(f"| sm_{cc} | {label} | {int(dot)} | {ops} | {compiled.metadata.shared} | {limit} | {spills} |")
    return 1 if failed else 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_small_batch_kernels_compile_for_every_arch(compile_report) -> None:
    stdout, table = compile_report(__file__, timeout=900)
    rows = [cells for cells in table if len(cells) == 7 and cells[0].startswith("sm_")]
    assert len(rows) == len(ARCHS) * ((len(DENSE) + len(I8)) * len(TOKENS) + 2 + 2 * len(MOE) + 2 * len(I8)), stdout
    for arch, label, dot, ops, shared, limit, spills in rows:
        assert int(shared) <= int(limit), f"{arch} {label} takes {shared} bytes of shared memory (limit {limit})"
        assert int(spills) == 0, f"{arch} {label} spills {spills} bytes"
        if dot == "1":
            assert int(ops) > 0, f"{arch} {label} does not use the tensor cores"


if __name__ == "__main__":
    sys.exit(main())
