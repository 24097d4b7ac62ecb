"""The router kernels compile for the H100/H200 (sm_90) on any machine, without spills, W read in 16-B loads.

The interpreter (test_router.py) accepts code the GPU compiler may reject (3-D broadcasts, argmax with a
tie rule, a one-token block). Compiling to PTX and through ptxas needs no GPU; it runs as a subprocess
(this file as a script, see tests/kernels/conftest.py) because the interpreter replaces the kernels in
the test process. Arguments as the launcher passes them at its defaults: logits for 1, 4 and 16 tokens
per program (Air: H = 4096, slices of 1024, both multiples of 16 as Triton specializes them at launch),
select for E = 128, 160 and 256 with k = 8. ``python tests/kernels/test_router_compile_sm90.py`` prints it.
"""

from __future__ import annotations

import inspect
import os
import sys

if __name__ == "__main__":  # run as the compile script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

LOGITS_TOKENS = (1, 4, 16)
X_DTYPES = ("bf16", "fp16", "fp32")
SELECT_EXPERTS = (128, 160, 256)


def _compile(kernel, pointers: dict[str, str], const: dict, divisible: tuple[str, ...] = ()) -> dict[str, int]:
    from glmtg.kernels import router
    from tests.references.ptxas import compile_sm90_report

    defaults = {n: p.default for n, p in inspect.signature(router.route).parameters.items()}
    return compile_sm90_report(kernel, {"scaling": "fp32", **pointers}, const, divisible=divisible,
                               num_warps=defaults["num_warps"], tag="router")


def _jobs():
    import triton

    from glmtg.kernels import router

    defaults = {n: p.default for n, p in inspect.signature(router.route).parameters.items()}
    for tokens in LOGITS_TOKENS:
        for dtype in X_DTYPES:
            # the chunk route computes
            block_h = max(defaults["block_h"] // tokens, 128 * defaults["num_warps"] // defaults["block_e"], 16)
            const = dict(BLOCK_T=tokens, BLOCK_E=defaults["block_e"], BLOCK_H=block_h)
            yield (f"logits T={tokens}", dtype, router._logits_kernel,
                   dict(X="*" + dtype, W="*fp32", Part="*fp32"), const, ("HIDDEN", "SPAN"))
    for experts in SELECT_EXPERTS:
        const = dict(SPLIT=defaults["split"], BLOCK_E=triton.next_power_of_2(experts), BLOCK_K=8, NORM=True)
        yield (f"select E={experts}", "fp32", router._select_kernel,
               dict(Part="*fp32", Bias="*fp32", Ids="*i64", Weights="*fp32"), const, ())


def main() -> int:
    failed = 0
    print("| kernel | x dtype | registers | spill bytes | 16-B loads | all global loads |")
    print("|---|---|---|---|---|---|")
    for name, dtype, kernel, pointers, const, divisible in _jobs():
        try:
            r = _compile(kernel, pointers, const, divisible)
        except Exception as exc:  # report and go on: one failure should not hide the others
            failed += 1
            cause = exc.__cause__ or exc
            print(f"| {name} | {dtype} | compile failed: {type(cause).__name__}: {str(cause)[:200]} |")
            continue
        print(f"| {name} | {dtype} | {r['regs']} | {r['spills']} | {r['v4']} | {r['loads']} |")
    return 1 if failed else 0


def test_router_kernels_compile_for_sm90(compile_report):
    stdout, table = compile_report(__file__, timeout=600)
    rows = {(c[0], c[1]): [int(v) for v in c[2:]] for c in table if len(c) == 6 and c[0][:6] in ("logits", "select")}
    assert len(rows) == len(LOGITS_TOKENS) * len(X_DTYPES) + len(SELECT_EXPERTS), stdout
    for key, (_, spills, v4, loads) in rows.items():
        assert spills == 0, f"{key} spills {spills} bytes"
        if key[0].startswith("logits"):
            # every load of the W and x tiles is 16 bytes wide (scalar loads would cap the read well below
            # memory speed)
            assert v4 == loads > 0, f"{key}: {v4} of {loads} global loads are 16-byte\n{stdout}"


if __name__ == "__main__":
    sys.exit(main())
