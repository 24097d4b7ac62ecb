"""Compile the decode-attention kernel for sm_90 on any machine (no GPU needed) and report what the
compiler made of each variant: shared memory, software-pipelined async copies, 16-byte loads, MMAs.

    python bench/inspect_kernel.py                 # the variants below
    python bench/inspect_kernel.py --dump DIR      # also write each variant's TTGIR and PTX
    python bench/inspect_kernel.py --cuda [FATBIN] # the CUDA loop's kernels (glmtg.kernels.attention.cuda_loop)

The last columns count the SASS instructions of the streaming loop (the longest loop; whole tiles run
unpredicated there) per iteration, one warp's view, by Triton's bundled nvdisasm.

Arguments get the 16-byte divisibility hints Triton's launcher gives real launches (pointers, strides
that are multiples of 16), so the report matches what runs on the H100. A failed compile is reported
per variant (the interpreter accepts some code the GPU compiler rejects).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from glmtg.formats import FORMATS, KernelCode
from glmtg.kernels.attention import kernel as da
from glmtg.kernels.attention.cuda_loop import FATBIN
from glmtg.kernels.sass import longest_loop as sass_longest_loop  # noqa: E402

FLOAT, Q8_0, Q4_0, FP8 = KernelCode.FLOAT, KernelCode.Q8_0, KernelCode.Q4_0, KernelCode.FP8
CODE_PTR = {FLOAT: "*bf16", Q8_0: "*i8", Q4_0: "*u8", FP8: "*fp8e4nv"}
SCALE_PTR = {FLOAT: "*bf16", Q8_0: "*i32", Q4_0: "*i32", FP8: "*fp32"}  # block scales are read as int32 words
# The name of each code (the float code is compiled for bf16 here).
FORMAT_NAMES = {FLOAT: "bf16", **{f.code: name for name, f in FORMATS.items() if f.code != FLOAT}}

VARIANTS = [
    dict(), dict(block_n=128, num_stages=2), dict(direct=True), dict(paged=True, sq=3),
    dict(k_format=Q8_0, v_format=Q8_0), dict(k_format=Q4_0, v_format=Q4_0),
    dict(k_format=Q8_0, v_format=Q8_0, asm_dequant=False), dict(k_format=Q4_0, v_format=Q4_0, asm_dequant=False),
    dict(k_format=Q8_0, v_format=Q8_0, num_warps=1, block_n=16, num_stages=3),
    dict(k_format=Q4_0, v_format=Q4_0, num_warps=1, block_n=32, num_stages=3),
    dict(k_format=FP8, v_format=FP8, block_n=128),
    dict(k_format=FP8, v_format=FP8),
    dict(k_format=FP8, v_format=FP8, fp16_dot=False), dict(k_format=Q8_0, v_format=FP8),
]


def compile_variant(*, k_format: KernelCode = FLOAT, v_format: KernelCode = FLOAT, fp16_dot: bool = True,
                    asm_dequant: bool = True, direct: bool = False,
                    paged: bool = False, sq: int = 1, group: int = 12, head_dim: int = 128, block_n: int = 64,
                    num_warps: int = 4, num_stages: int = 3):
    names = list(inspect.signature(da._decode_attention_kernel.fn).parameters)
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in ("Q", "Out"):
            sig[name] = "*bf16"
        elif name in ("K", "V"):
            sig[name] = CODE_PTR[k_format if name == "K" else v_format]
        elif name in ("KScale", "VScale"):
            sig[name] = SCALE_PTR[k_format if name == "KScale" else v_format]
        elif name in ("Lse", "PartialO", "PartialLse"):
            sig[name] = "*fp32"
        elif name in ("Lengths", "PageTable"):
            sig[name] = "*i32"
        elif name == "scale_log2":
            sig[name] = "fp32"
        elif name.startswith("stride") or name in ("capacity", "NUM_SPLITS"):
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
        fmt = k_format if name.startswith("stride_ks") else v_format
        # block-scale rows hold D/32 values (not a multiple of 16); fp8 row scales are [.., T]
        odd_stride = name.startswith(("stride_ks", "stride_vs")) and fmt != FLOAT
        if sig[name].startswith("*") or (sig[name] == "i32" and name != "NUM_SPLITS" and not odd_stride):
            attrs[(i,)] = [["tt.divisibility", 16]]
    block_m = max(16, triton.next_power_of_2(group * sq))
    const = dict(SQ=sq, GROUP=group, NUM_KV_HEADS=8, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                 M_PAD=block_m, PAGE_SIZE=64 if paged else 65536, PAGED=paged, K_FORMAT=int(k_format),
                 V_FORMAT=int(v_format), DIRECT_OUT=direct, WRITE_LSE=False, IEEE_DOT=False, USE_PDL=True,
                 FP16_DOT=fp16_dot and FLOAT not in (k_format, v_format),
                 ASM_DEQUANT=int(asm_dequant and fp16_dot and FLOAT not in (k_format, v_format)), NATIVE_FP8=True)
    return triton.compile(ASTSource(da._decode_attention_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _bundled(tool: str) -> str | None:
    import triton as _triton

    path = os.path.join(os.path.dirname(_triton.__file__), "backends", "nvidia", "bin", tool)
    return path if os.path.exists(path) else None


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin by Triton's bundled nvdisasm ('' where this Triton build ships none)."""
    nvdisasm = _bundled("nvdisasm")
    if nvdisasm is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def longest_loop(sass: str) -> collections.Counter:
    """SASS opcodes of the longest loop (a backward branch's span) in one function's disassembly."""
    return collections.Counter(sass_longest_loop(sass))


def loop_sass(cubin: bytes) -> collections.Counter:
    """SASS opcodes of the kernel's longest loop (the streaming loop)."""
    return longest_loop(disassemble(cubin))


def cuda_loop_report(fatbin: Path) -> int:
    """Loop SASS of each contiguous-cache kernel of the CUDA loop's fatbin (glmtg.kernels.attention.cuda_loop).

    Its loop body holds two 16-token steps (register double buffering), each with the slice's
    clamped last-tile load path beside the plain one, and the rarely taken rescale (64 FMUL): an
    upper bound per two steps, not the instructions one step issues.
    """
    cuobjdump = _bundled("cuobjdump")
    if cuobjdump is None:
        print("error: this Triton build ships no cuobjdump", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([cuobjdump, "-xelf", "all", str(fatbin.resolve())], cwd=tmp, capture_output=True, check=True)
        cubins = sorted(Path(tmp).glob("*.cubin"))
        sass = "".join(disassemble(c.read_bytes()) for c in cubins)
    print("| kernel (K/V formats) | loop SASS, two steps | HMMA | PRMT | LOP3 | HADD2+HFMA2+HMUL2 | IMAD+IADD3 | LDG |")
    print("|---|---|---|---|---|---|---|---|")
    for part in re.split(r"\n(?=\.text\.glmtg_decode_quant_)", sass)[1:]:
        name = re.match(r"\.text\.(\w+):", part).group(1)
        k, v, paged = re.search(r"_k(\d)_v(\d)_p(\d)", name).groups()
        if paged == "1":
            continue
        ops = collections.Counter()
        for op, count in longest_loop(part).items():
            ops[op.split(".")[0]] += count
        print(f"| {FORMAT_NAMES[KernelCode(int(k))]}/{FORMAT_NAMES[KernelCode(int(v))]} | {sum(ops.values())} | {ops['HMMA']} | {ops['PRMT']} | "
              f"{ops['LOP3']} | {ops['HADD2'] + ops['HFMA2'] + ops['HMUL2']} | {ops['IMAD'] + ops['IADD3']} | "
              f"{ops['LDG']} |")
    return 0


def describe(variant: dict) -> str:
    parts = [f"{FORMAT_NAMES[variant.get('k_format', FLOAT)]}/{FORMAT_NAMES[variant.get('v_format', FLOAT)]}"]
    parts += [f"{k}={v}" for k, v in variant.items() if k not in ("k_format", "v_format")]
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", type=Path, default=None, help="write TTGIR and PTX of each variant here")
    parser.add_argument("--cuda", nargs="?", type=Path, const=FATBIN,
                        default=None, help="report the CUDA loop's fatbin instead (default: the shipped one)")
    args = parser.parse_args()
    if args.cuda is not None:
        return cuda_loop_report(args.cuda)
    print("| variant | shared KB | async copies (TTGIR) | cp.async (PTX) | 16-B loads | other global loads | mma.sync "
          "| wgmma | loop SASS instructions | of which LDS.U8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for i, variant in enumerate(VARIANTS):
        try:
            kernel = compile_variant(**variant)
        except Exception as exc:  # report and go on: one broken variant should not hide the others
            failed += 1
            cause = exc.__cause__ or exc
            print(f"| {describe(variant)} | compile failed: {type(cause).__name__}: {str(cause)[:160]} |")
            continue
        ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
        loop = loop_sass(kernel.asm["cubin"])
        v4 = ptx.count("ld.global.v4")
        print(f"| {describe(variant)} | {kernel.metadata.shared / 1024:.1f} | "
              f"{ttgir.count('async_copy_global_to_local')} | {ptx.count('cp.async.cg') + ptx.count('cp.async.ca')} | "
              f"{v4} | {ptx.count('ld.global') - v4} | {ptx.count('mma.sync')} | {ptx.count('wgmma.mma_async')} | "
              f"{sum(loop.values())} | {loop['LDS.U8']} |")
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"variant{i}.ttgir").write_text(ttgir)
            (args.dump / f"variant{i}.ptx").write_text(ptx)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
