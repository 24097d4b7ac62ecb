"""The prefill-attention launches the planner makes for Hopper compile for sm_90, on any machine.

The interpreter accepts code the GPU compiler rejects, and says nothing of registers; compiling to PTX
and cubin needs no GPU. It runs in a subprocess (this file as a script) because the interpreter replaces
the kernels in the test process. Compiled: the GPU plan of every cache format at 96/8 (contiguous and
paged), a 64-dim head, and the decode kernel's tile step (the A/B variant). Checked: every variant
compiles, its dots use the tensor cores, and the bf16 and q4_0 loops prefetch K/V with async copies and
spill no registers (the properties their speed rests on; the report prints spills for all).
``python tests/kernels/attention/test_prefill_compile_sm90.py`` prints the report.
"""

from __future__ import annotations

import os
import sys

FORMAT_PAIRS = ((None, None), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("fp8", "fp8"), ("q8_0", "fp8"))


def _variants() -> list[dict]:
    out = [dict(name=f"96/8 {kf or 'bf16'}/{vf or 'bf16'}", k=kf, v=vf, group=12, head_dim=128) for kf, vf in FORMAT_PAIRS]
    out.append(dict(name="96/8 q4_0/q4_0 paged", k="q4_0", v="q4_0", group=12, head_dim=128, paged=True))
    out.append(dict(name="96/8 bf16/bf16 paged", k=None, v=None, group=12, head_dim=128, paged=True))
    out.append(dict(name="32/8 bf16/bf16 d64", k=None, v=None, group=4, head_dim=64))
    # the decode kernel's tile step, kept for A/B timing
    out += [dict(name=f"96/8 {f}/{f} decode step", k=f if f != "bf16" else None, v=f if f != "bf16" else None,
                 group=12, head_dim=128, fa2_step=False) for f in ("bf16", "q4_0")]
    return out


def _compile(v: dict):
    import inspect

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glmtg.formats import FORMATS, KernelCode
    from glmtg.kernels.attention.prefill import _prefill_attention_kernel
    from glmtg.kernels.attention.prefill_launch import plan_prefill

    codes = {KernelCode.FLOAT: "*bf16", KernelCode.Q8_0: "*i8", KernelCode.Q4_0: "*u8", KernelCode.FP8: "*fp8e4nv"}
    scales = {KernelCode.FLOAT: "*bf16", KernelCode.Q8_0: "*i32", KernelCode.Q4_0: "*i32", KernelCode.FP8: "*fp32"}
    k, vv = (FORMATS[f].code if f else KernelCode.FLOAT for f in (v["k"], v["v"]))
    launch = plan_prefill(v["head_dim"], torch.device("cuda"))
    quantized = KernelCode.FLOAT not in (k, vv)
    const = dict(GROUP=v["group"], NUM_KV_HEADS=8, HEAD_DIM=v["head_dim"], BLOCK_M=launch.block_m,
                 BLOCK_N=launch.block_n, PAGE_SIZE=64 if v.get("paged") else 65536, PAGED=bool(v.get("paged")), K_FORMAT=int(k),
                 V_FORMAT=int(vv), IEEE_DOT=False, FP16_DOT=launch.fp16_dot and quantized,
                 ASM_DEQUANT=int(launch.fp16_dot and launch.asm_dequant and quantized), NATIVE_FP8=True,
                 FA2_STEP=v.get("fa2_step", launch.fa2_step))
    pointers = dict(Q="*bf16", Out="*bf16", K=codes[k], V=codes[vv], KScale=scales[k], VScale=scales[vv],
                    Lengths="*i32", PageTable="*i32")
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(_prefill_attention_kernel.fn).parameters):
        sig[name] = "constexpr" if name in const else pointers.get(name, "fp32" if name == "scale_log2" else "i32")
        # the 16-divisibility hints a real launch gets (pointers, strides that are multiples of 16; not the
        # block-scale strides)
        if sig[name].startswith("*") or (sig[name] == "i32" and not name.startswith(("stride_ks", "stride_vs"))):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(_prefill_attention_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))


def main() -> int:
    failed = 0
    print("| variant | async copies (TTGIR) | mma.sync | wgmma | registers | spills |")
    print("|---|---|---|---|---|---|")
    for v in _variants():
        try:
            kernel = _compile(v)
        except Exception as exc:  # report and go on: one failure should not hide the others
            failed += 1
            cause = exc.__cause__ or exc
            print(f"| {v['name']} | compile failed: {type(cause).__name__}: {str(cause)[:300]} |")
            continue
        from tests.references.ptxas import ptxas_report

        ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
        regs = ptxas_report(ptx, "prefill")
        print(f"| {v['name']} | {ttgir.count('async_copy_global_to_local')} | {ptx.count('mma.sync')} | "
              f"{ptx.count('wgmma.mma_async')} | {regs['regs']} | {regs['spills']} |")
    return 1 if failed else 0


def test_prefill_launches_compile_for_sm90(compile_report):
    stdout, table = compile_report(__file__, timeout=900)
    rows = {cells[0]: [int(c) for c in cells[1:]] for cells in table if len(cells) == 6 and cells[1].isdigit()}
    assert len(rows) == len(_variants()), stdout
    for name, (_, mma, wgmma, _, _) in rows.items():
        assert mma + wgmma > 0, f"{name}: the dots must lower to tensor-core instructions"
    for name in ("96/8 bf16/bf16", "96/8 q4_0/q4_0"):
        assert rows[name][0] >= 4, f"{name}: the loop must prefetch K and V tiles (async copies):\n{stdout}"
        assert rows[name][4] == 0, f"{name}: the loop must not spill registers:\n{stdout}"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    sys.exit(main())
