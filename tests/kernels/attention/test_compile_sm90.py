"""The decode-attention launches the planner makes for the H100 compile for sm_90, on any machine.

The Triton interpreter runs the CPU tests but accepts code the GPU compiler rejects (it ran an early
`return` inside a constexpr branch that the compiler refuses). Compiling to PTX needs no GPU; it runs in
a subprocess (this file as a script) because the interpreter replaces the kernels in the test process.
Compiled: the plan of every cache format at 96/8 and 48/2 (64k context, contiguous), a paged
multi-token launch, a one-slice launch writing its output directly, and the merge kernel's two paths.
Checked besides compiling: every variant's dots use the tensor cores, and the bf16 loop prefetches K
and V with async copies (the properties the kernel's speed rests on; bench/inspect_kernel.py reports
more). ``python tests/kernels/attention/test_compile_sm90.py`` prints the report.
"""

from __future__ import annotations

import os
import sys

HEADS = ((96, 8), (48, 2))
FORMAT_PAIRS = ((None, None), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("fp8", "fp8"), ("q8_0", "fp8"))


def _variants() -> list[dict]:
    from glmtg.formats import FORMATS, KernelCode
    from glmtg.kernels.attention import Target, plan_format
    from glmtg.kernels.attention.plan import plan_for

    h100 = Target(132, (9, 0))
    out = []
    for (hq, hkv), (kf, vf) in [(h, p) for h in HEADS for p in FORMAT_PAIRS]:
        launch = plan_for(h100, 1, hkv, hq // hkv, 128, 65536, cache_format=plan_format(kf, vf))
        codes = [FORMATS[f].code if f else KernelCode.FLOAT for f in (kf, vf)]
        out.append(dict(name=f"{hq}/{hkv} {kf or 'bf16'}/{vf or 'bf16'}", k=codes[0], v=codes[1], group=hq // hkv,
                        launch=launch))
    paged = plan_for(h100, 1, 8, 36, 128, 65536)
    out.append(dict(name="96/8 bf16 paged sq=3", k=KernelCode.FLOAT, v=KernelCode.FLOAT, group=12, sq=3, paged=True,
                    launch=paged))
    direct = plan_for(h100, 1, 8, 12, 128, 65536, num_splits=1)
    out.append(dict(name="96/8 bf16 one slice", k=KernelCode.FLOAT, v=KernelCode.FLOAT, group=12, launch=direct))
    return out


def _signature(kernel, pointers: dict[str, str], constants: dict) -> tuple[dict, dict]:
    """Triton signature and the 16-divisibility hints its launcher gives real launches (pointers, and
    strides that are multiples of 16; block-scale strides are not)."""
    import inspect

    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constants:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name == "scale_log2":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        scale_stride = name.startswith(("stride_ks", "stride_vs"))
        if sig[name].startswith("*") or (sig[name] == "i32" and name != "NUM_SPLITS" and not scale_stride):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _compile_attention(v: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glmtg.formats import KernelCode
    from glmtg.kernels.attention.kernel import _decode_attention_kernel

    codes = {KernelCode.FLOAT: "*bf16", KernelCode.Q8_0: "*i8", KernelCode.Q4_0: "*u8", KernelCode.FP8: "*fp8e4nv"}
    scales = {KernelCode.FLOAT: "*bf16", KernelCode.Q8_0: "*i32", KernelCode.Q4_0: "*i32", KernelCode.FP8: "*fp32"}
    launch, sq = v["launch"], v.get("sq", 1)
    quantized = KernelCode.FLOAT not in (v["k"], v["v"])
    const = dict(SQ=sq, GROUP=v["group"], NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_M=launch.block_m,
                 BLOCK_N=launch.block_n, M_PAD=launch.block_m * launch.m_tiles,
                 PAGE_SIZE=64 if v.get("paged") else 65536, PAGED=bool(v.get("paged")), K_FORMAT=int(v["k"]),
                 V_FORMAT=int(v["v"]), DIRECT_OUT=launch.num_splits == 1, WRITE_LSE=False, IEEE_DOT=False,
                 USE_PDL=launch.pdl and launch.num_splits > 1, FP16_DOT=launch.fp16_dot and quantized,
                 ASM_DEQUANT=int(launch.fp16_dot and launch.asm_dequant and quantized), NATIVE_FP8=True,
                 WAIT_PDL=launch.pdl)
    pointers = dict(Q="*bf16", Out="*bf16", K=codes[v["k"]], V=codes[v["v"]], KScale=scales[v["k"]],
                    VScale=scales[v["v"]], Lse="*fp32", PartialO="*fp32", PartialLse="*fp32", Lengths="*i32",
                    PageTable="*i32")
    sig, attrs = _signature(_decode_attention_kernel, pointers, const)
    return triton.compile(ASTSource(_decode_attention_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))


def _compile_merge(one_pass: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glmtg.kernels.attention.merge import MERGE_SPLIT_BLOCK, _merge_splits_kernel

    const = dict(SQ=1, GROUP=12, NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_N=64, M_PAD=16, SPLIT_BLOCK=MERGE_SPLIT_BLOCK,
                 BLOCK_D=32, ONE_PASS=one_pass, WRITE_LSE=True, USE_PDL=True)
    pointers = dict(Out="*bf16", Lse="*fp32", PartialO="*fp32", PartialLse="*fp32", Lengths="*i32")
    sig, attrs = _signature(_merge_splits_kernel, pointers, const)
    return triton.compile(ASTSource(_merge_splits_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4))


def main() -> int:
    failed = 0
    print("| variant | async copies (TTGIR) | mma.sync | wgmma |")
    print("|---|---|---|---|")
    jobs = [(v["name"], lambda v=v: _compile_attention(v)) for v in _variants()]
    jobs += [(f"merge one_pass={p}", lambda p=p: _compile_merge(p)) for p in (True, False)]
    for name, job in jobs:
        try:
            kernel = job()
        except Exception as exc:  # report and go on: one failure should not hide the others
            failed += 1
            cause = exc.__cause__ or exc
            print(f"| {name} | compile failed: {type(cause).__name__}: {str(cause)[:200]} |")
            continue
        ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
        print(f"| {name} | {ttgir.count('async_copy_global_to_local')} | {ptx.count('mma.sync')} | "
              f"{ptx.count('wgmma.mma_async')} |")
    return 1 if failed else 0


def test_planned_launches_compile_for_sm90(compile_report):
    stdout, table = compile_report(__file__, timeout=900)
    rows = {cells[0]: [int(c) for c in cells[1:]] for cells in table if len(cells) == 4 and cells[1].isdigit()}
    assert len(rows) == len(HEADS) * len(FORMAT_PAIRS) + 4, stdout
    for name, (async_copies, mma, wgmma) in rows.items():
        if not name.startswith("merge"):
            assert mma + wgmma > 0, f"{name}: the dots must lower to tensor-core instructions"
    assert rows["96/8 bf16/bf16"][0] >= 4, "the bf16 loop must prefetch K and V tiles (async copies)"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    sys.exit(main())
