"""The decode step's kernels compiled for sm_90 with programmatic dependent launch (glmtg/kernels/pdl.py):
each waits (griddepcontrol.wait) and releases the next launch (griddepcontrol.launch_dependents), and
none loads or stores global memory before its wait (the kernel before may still write what it reads).
mmvq_moe is compiled also with the shared expert as one more slot (``SHARED``); so are its lanes variants
(mmvq_moe_lanes.py), beside the 32-value lanes GEMV (mmvq_lanes32.py).

PDL only runs on a GPU of compute capability 9.0 and later, so these checks read the PTX; the GPU tests
(test_pdl_gpu.py) check that a step's logits are the same with and without it. Runs as a subprocess (this
file as a script, see tests/kernels/conftest.py): the interpreter replaces the kernels in the test process.
``python tests/kernels/test_pdl_compile_sm90.py`` prints the table.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as the compile script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

WAIT, RELEASE = "griddepcontrol.wait", "griddepcontrol.launch_dependents"


def _jobs():
    from glmtg.formats import REGISTRY
    from glmtg.kernels.gguf import activation, gemv, mmvq, mmvq_lanes, mmvq_lanes32, mmvq_moe, mmvq_moe_lanes
    from glmtg.kernels.qk_rope import _qk_rope_kernel
    from glmtg.kernels.rms_norm import _rms_norm_kernel
    from glmtg.kernels.router import _logits_kernel, _select_kernel

    def blocks(name: str) -> dict:
        f = REGISTRY[name]
        return dict(FMT=f.gguf_type, BS=f.block_size, TS=f.type_size)

    pdl = dict(PDL=True)
    for name, (block_n, values, warps) in (("q4_0", (4, 4096, 4)), ("q4_k", (1, 1024, 1))):
        yield (f"mmvq {name}", mmvq._mmvq_kernel,
               dict(XW="*i32", DX="*fp32", XS="*i32", W="*u8", Y="*bf16", Bias="*bf16", Res="*bf16"),
               dict(blocks(name), BLOCK_T=1, BLOCK_N=block_n, G=gemv.steps_for(REGISTRY[name].block_size, values),
                    HAS_BIAS=False, HAS_RES=True, **pdl), warps)
    for name in mmvq_lanes.LANES_FORMATS:  # the lanes variants (one token)
        f = REGISTRY[name]
        for split in (1, 2):
            yield (f"mmvq lanes E={split} {name}", mmvq_lanes._lanes_kernel,
                   dict(XW="*i32", DX="*fp32", XS="*i32", W="*u8", Y="*bf16", Bias="*bf16", Res="*bf16"),
                   dict(FMT=f.gguf_type, TS=f.type_size, BLOCK_N=1, G=4, HAS_BIAS=False, HAS_RES=True, E=split,
                        **pdl), 1)
    yield ("mmvq_moe gate_up q4_0", mmvq_moe._gate_up_kernel,
           dict(XW="*i32", DX="*fp32", XS="*i32", Gate="*u8", Up="*u8", Ids="*i64", Weights="*fp32", Act="*fp32",
                AQ="*i8", ADX="*fp32", AS="*i32"),
           dict(blocks("q4_0"), BLOCK_R=1, G=gemv.steps_for(32, 1024), FUSED=False, **pdl), 1)
    yield ("mmvq_moe down q5_0", mmvq_moe._down_kernel,
           dict(AW="*i32", ADX="*fp32", AS="*i32", Down="*u8", Ids="*i64", Y="*bf16"),
           dict(blocks("q5_0"), BLOCK_R=1, G=gemv.steps_for(32, 1024), **pdl), 1)
    # the shared expert as one more slot (mmvq_moe's ``shared``)
    yield ("mmvq_moe gate_up q4_0 + shared", mmvq_moe._gate_up_kernel,
           dict(XW="*i32", DX="*fp32", XS="*i32", Gate="*u8", Up="*u8", Ids="*i64", Weights="*fp32", Act="*fp32",
                AQ="*i8", ADX="*fp32", AS="*i32", SGate="*u8", SUp="*u8"),
           dict(blocks("q4_0"), BLOCK_R=1, G=gemv.steps_for(32, 1024), FUSED=False, SHARED=1, **pdl), 1)
    yield ("mmvq_moe down q5_0 + shared", mmvq_moe._down_kernel,
           dict(AW="*i32", ADX="*fp32", AS="*i32", Down="*u8", Ids="*i64", Y="*bf16", SDown="*u8"),
           dict(blocks("q5_0"), BLOCK_R=1, G=gemv.steps_for(32, 1024), SHARED=1, **pdl), 1)
    # the 32-value lanes GEMV (mmvq_lanes32.py) and the routed experts' lanes kernels (mmvq_moe_lanes.py)
    for name, split in (("q4_0", 2), ("q8_0", 1), ("q5_0", 4)):
        f = REGISTRY[name]
        yield (f"mmvq lanes32 L={split} {name}", mmvq_lanes32._lanes32_kernel,
               dict(XW="*i32", DX="*fp32", XS="*i32", W="*u8", Y="*bf16", Bias="*bf16", Res="*bf16"),
               dict(FMT=f.gguf_type, TS=f.type_size, BLOCK_N=2, G=128, HAS_BIAS=False, HAS_RES=True, L=split, **pdl), 4)
    for gu, dn in (("q4_0", "q4_0"), ("q4_k", "q5_0")):
        fg, fd = REGISTRY[gu], REGISTRY[dn]
        yield (f"mmvq_moe lanes gate_up {gu} + shared", mmvq_moe_lanes._gate_up_lanes_kernel,
               dict(XW="*i32", DX="*fp32", XS="*i32", Gate="*u8", Up="*u8", Ids="*i64", Weights="*fp32",
                    Act="*fp32", SGate="*u8", SUp="*u8"),
               dict(FMT=fg.gguf_type, TS=fg.type_size, GPB=fg.block_size // 32, BLOCK_R=1, G=16, L=2 if gu == "q4_0"
                    else 1, SHARED=1, **pdl), 1)
        yield (f"mmvq_moe lanes down {dn} + shared", mmvq_moe_lanes._down_lanes_kernel,
               dict(AW="*i32", ADX="*fp32", AS="*i32", Down="*u8", Ids="*i64", Y="*bf16", SHARED_OFF="i64"),
               dict(NB=44, FMT=fd.gguf_type, TS=fd.type_size, GPB=1, BLOCK_R=4, G=4, L=2, SHARED=1, **pdl), 1)
    yield ("quantize", activation._quantize_kernel, dict(X="*bf16", Q="*i8", DX="*fp32", S="*i32"),
           dict(GB=32, **pdl), 4)
    yield ("rms_norm", _rms_norm_kernel,
           dict(X="*bf16", R="*bf16", W="*bf16", Y="*bf16", S="*bf16", Q="*i8", DX="*fp32", QS="*i32", INV_H="fp32",
                EPS="fp32"), dict(BLOCK=4096, RESIDUAL=True, QUANTIZE=True, **pdl), 8)
    yield ("router logits", _logits_kernel, dict(X="*bf16", W="*fp32", Part="*fp32"),
           dict(BLOCK_T=1, BLOCK_E=4, BLOCK_H=1024, **pdl), 4)
    yield ("router select", _select_kernel,
           dict(Part="*fp32", Bias="*fp32", Ids="*i64", Weights="*fp32", scaling="fp32"),
           dict(SPLIT=4, BLOCK_E=128, BLOCK_K=8, NORM=True, **pdl), 4)
    yield ("qk_rope", _qk_rope_kernel,
           dict(Y="*bf16", Cos="*fp32", Sin="*fp32", QW="*bf16", KW="*bf16", Q="*bf16", K="*bf16", KC="*fp16",
                VC="*fp16", Start="*i32", eps="fp32", inv_d="fp32"),
           dict(HQ=96, HKV=8, D=128, R=64, BLOCK_D=128, NORM=True, STORE_KV=True, **pdl), 1)
    yield ("qk_rope q in f16", _qk_rope_kernel,  # q in the decode kernel's dtype (an f16 cache), k in y's
           dict(Y="*bf16", Cos="*fp32", Sin="*fp32", QW="*bf16", KW="*bf16", Q="*fp16", K="*bf16", KC="*fp16",
                VC="*fp16", Start="*i32", eps="fp32", inv_d="fp32"),
           dict(HQ=96, HKV=8, D=128, R=64, BLOCK_D=128, NORM=True, STORE_KV=True, **pdl), 1)


def _first(ptx: str, needle: str) -> int:
    """Line number of the first instruction containing ``needle``, or -1."""
    for i, line in enumerate(ptx.splitlines()):
        if needle in line and not line.lstrip().startswith("//"):
            return i
    return -1


def main() -> int:
    from tests.references.ptxas import compile_sm90_ptx

    failed = 0
    print("| kernel | waits | releases | global loads before wait | stores before wait |")
    print("|---|---|---|---|---|")
    for name, kernel, types, const, warps in _jobs():
        try:
            ptx = compile_sm90_ptx(kernel, types, const, num_warps=warps)
        except Exception as exc:  # report and go on: one failure should not hide the others
            failed += 1
            cause = exc.__cause__ or exc
            print(f"| {name} | compile failed: {type(cause).__name__}: {' '.join(str(cause).split())[:200]} |")
            continue
        wait = _first(ptx, WAIT)
        pre = ptx.splitlines()[:max(wait, 0)]
        loads = sum("ld.global" in line for line in pre)
        stores = sum("st.global" in line for line in pre)
        print(f"| {name} | {ptx.count(WAIT)} | {ptx.count(RELEASE)} | {loads} | {stores} |")
    return 1 if failed else 0


def test_decode_kernels_wait_then_release_on_sm90(compile_report):
    stdout, table = compile_report(__file__, timeout=600)
    rows = {c[0]: [int(v) for v in c[1:]] for c in table if len(c) == 5 and c[1].isdigit()}
    assert len(rows) == 23, stdout  # every kernel of _jobs
    for name, (waits, releases, loads, stores) in rows.items():
        assert waits == 1 and releases == 1, f"{name}: {waits} waits, {releases} releases\n{stdout}"
        assert loads == 0 and stores == 0, f"{name}: {loads} loads, {stores} stores before its wait\n{stdout}"


if __name__ == "__main__":
    sys.exit(main())
