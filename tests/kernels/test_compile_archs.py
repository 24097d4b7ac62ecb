"""Every Triton kernel of glmtg compiles for Ampere and Ada (sm_80, sm_86, sm_89), on any machine, and the
launch plan has a valid entry for each of them.

The sm_90 compile checks (test_compile_sm90.py, test_moe_compile_sm90.py, the gguf decoder files) cover
the H100; this file compiles what those GPUs run, with the arguments their launchers pass there: fp8 caches
as bytes before sm_89 (no e4m3 conversion instruction, and Triton has no fp8e4nv type there). Compiling
goes to machine code through ptxas for the target, so an instruction the architecture lacks fails here.
It runs as a subprocess (this file as a script, see tests/kernels/conftest.py) because the interpreter
replaces the kernels in the test process. Kernels: decode attention as planned for each architecture
(bf16 and every quantized cache at 96/8, 64k) and its merge; prefill attention at its GPU plan per cache format; kv_store per cache format; moe_decode; the
GGUF dequant, gemv, moe, mmvq (with its activation quantizer; its lanes variant) and mmvq_moe kernels for a few
block types, among them the ones with inline PTX (dp4a, prmt); the decoder glue (rms_norm, router, qk_rope). Checked besides compiling: the shared memory a
program takes fits the architecture's per-block limit (ArchPlan.shared_kib_per_block).
``python tests/kernels/test_compile_archs.py`` prints the report.

CPU tests besides (interpreter): the two byte-level fp8 conversions those GPUs use, over every code, and
decode_attention and kv_store taking them (the architecture faked) against the native fp8 path and the
torch quantization; the plans for each architecture; the CUDA loop is never chosen off sm_90, with a faked
device.
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys

if __name__ == "__main__":  # run as the compile script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from glmtg.kernels.attention.kernel import _fp8_bits_to_f16  # noqa: E402
from glmtg.kernels.kv_store import _e4m3_bits  # noqa: E402

ARCHS = (80, 86, 89)
TARGET_SMS = {80: 108, 86: 82, 89: 128}  # A100, RTX 3090, RTX 4090


def _sig(kernel, pointers: dict[str, str], const: dict) -> tuple[dict, dict]:
    """Triton signature (unnamed scalars int32) and the launchers' 16-divisibility hints on pointers; constexprs
    with a default not given in ``const`` are added to it at that default."""
    sig, attrs = {}, {}
    for i, (name, param) in enumerate(inspect.signature(kernel.fn).parameters.items()):
        if name not in const and param.default is not inspect.Parameter.empty:
            const[name] = param.default  # a constexpr left at its default (PDL off: no sm_90 instruction)
        if name in const:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            if pointers[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    return sig, attrs


def _attention_jobs(cc: int) -> list[tuple[str, object, dict, dict, dict]]:
    from glmtg.formats import FORMATS, KernelCode
    from glmtg.kernels.attention import Target
    from glmtg.kernels.attention.kernel import _decode_attention_kernel
    from glmtg.kernels.attention.merge import MERGE_SPLIT_BLOCK, _merge_splits_kernel
    from glmtg.kernels.attention.plan import plan_for

    target = Target(TARGET_SMS[cc], (cc // 10, cc % 10))
    native = target.native_fp8
    codes = {KernelCode.FLOAT: "*bf16", KernelCode.Q8_0: "*i8", KernelCode.Q4_0: "*u8",
             KernelCode.FP8: "*fp8e4nv" if native else "*u8"}
    scales = {KernelCode.FLOAT: "*bf16", KernelCode.Q8_0: "*i32", KernelCode.Q4_0: "*i32", KernelCode.FP8: "*fp32"}
    jobs = []
    for fmt, ctx in ((None, 65536), ("q8_0", 65536), ("q4_0", 65536), ("fp8", 65536)):
        launch = plan_for(target, 1, 8, 12, 128, ctx, cache_format=fmt)
        code = FORMATS[fmt].code if fmt else KernelCode.FLOAT
        quantized = fmt is not None
        const = dict(SQ=1, GROUP=12, NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                     M_PAD=launch.block_m * launch.m_tiles, PAGE_SIZE=65536, PAGED=False, K_FORMAT=int(code),
                     V_FORMAT=int(code), DIRECT_OUT=launch.num_splits == 1, WRITE_LSE=False, IEEE_DOT=False,
                     USE_PDL=launch.pdl and launch.num_splits > 1, FP16_DOT=launch.fp16_dot and quantized,
                     ASM_DEQUANT=int(launch.fp16_dot and launch.asm_dequant and quantized), NATIVE_FP8=native)
        pointers = dict(Q="*bf16", Out="*bf16", K=codes[code], V=codes[code], KScale=scales[code],
                        VScale=scales[code], Lse="*fp32", PartialO="*fp32", PartialLse="*fp32", Lengths="*i32",
                        PageTable="*i32", scale_log2="fp32")
        jobs.append((f"attention {fmt or 'bf16'} {ctx // 1024}k", _decode_attention_kernel, pointers, const,
                     dict(num_warps=launch.num_warps, num_stages=launch.num_stages)))
    # the prefill kernel at its GPU plan (its tiles and stages are Hopper's: they must fit these GPUs too)
    import torch

    from glmtg.kernels.attention.prefill import _prefill_attention_kernel
    from glmtg.kernels.attention.prefill_launch import plan_prefill

    pl = plan_prefill(128, torch.device("cuda"))
    for fmt in (None, "q8_0", "q4_0", "fp8"):
        code = FORMATS[fmt].code if fmt else KernelCode.FLOAT
        quantized = fmt is not None
        const = dict(GROUP=12, NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_M=pl.block_m, BLOCK_N=pl.block_n, PAGE_SIZE=65536,
                     PAGED=False, K_FORMAT=int(code), V_FORMAT=int(code), IEEE_DOT=False, FP16_DOT=quantized,
                     ASM_DEQUANT=int(pl.fp16_dot and pl.asm_dequant and quantized), NATIVE_FP8=native,
                     FA2_STEP=pl.fa2_step)
        pointers = dict(Q="*bf16", Out="*bf16", K=codes[code], V=codes[code], KScale=scales[code],
                        VScale=scales[code], Lengths="*i32", PageTable="*i32", scale_log2="fp32")
        jobs.append((f"prefill {fmt or 'bf16'}", _prefill_attention_kernel, pointers, const,
                     dict(num_warps=pl.num_warps, num_stages=pl.num_stages)))
    const = dict(SQ=1, GROUP=12, NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_N=64, M_PAD=16, SPLIT_BLOCK=MERGE_SPLIT_BLOCK,
                 BLOCK_D=32, ONE_PASS=False, WRITE_LSE=True, USE_PDL=target.pdl)
    pointers = dict(Out="*bf16", Lse="*fp32", PartialO="*fp32", PartialLse="*fp32", Lengths="*i32")
    jobs.append(("merge", _merge_splits_kernel, pointers, const, dict(num_warps=4)))
    return jobs


def _store_jobs(cc: int) -> list[tuple[str, object, dict, dict, dict]]:
    from glmtg.formats import FORMATS
    from glmtg.kernels.kv_store import _kv_store_kernel

    native = cc >= 89
    jobs = []
    # (format, data pointer, scale pointer, groups per head, group size, BLOCK_R, BLOCK_C) as _launch picks
    # them for 8 KV heads of 128 values.
    for fmt, data, scale, groups, size, block_r, block_c in (
            ("bf16", "*bf16", "*bf16", 1, 128, 8, 128), ("q8_0", "*i8", "*fp16", 4, 32, 32, 32),
            ("q4_0", "*u8", "*fp16", 4, 32, 32, 16), ("fp8", "*fp8e4nv" if native else "*u8", "*fp32", 1, 128, 8, 128)):
        const = dict(GROUPS_PER_HEAD=groups, GROUP_SIZE=size, BLOCK_R=block_r, BLOCK_C=block_c, PAGE_SIZE=1,
                     PAGED=False, FORMAT=int(FORMATS[fmt].code), NATIVE_FP8=native)
        pointers = dict(X="*bf16", Data=data, Scale=scale, Start="*i32", PageTable="*i32")
        jobs.append((f"kv_store {fmt}", _kv_store_kernel, pointers, const, dict(num_warps=4, enable_fp_fusion=False)))
    return jobs


def _moe_jobs() -> list[tuple[str, object, dict, dict, dict]]:
    from glmtg.kernels import moe_decode as md

    d = {n: p.default for n, p in inspect.signature(md.moe_decode).parameters.items()}
    return [
        ("moe_decode gate_up", md._gate_up_kernel, dict(X="*bf16", Gate="*bf16", Up="*bf16", Ids="*i64", Act="*fp32"),
         dict(BLOCK_I=d["block_i"], BLOCK_K=d["block_k"]), dict(num_warps=d["num_warps"])),
        ("moe_decode down", md._down_kernel, dict(Act="*fp32", Down="*bf16", Ids="*i64", Weights="*fp32", Y="*bf16"),
         dict(BLOCK_H=d["block_h"], BLOCK_K=d["block_k_down"]), dict(num_warps=d["num_warps"])),
    ]


def _gguf_jobs() -> list[tuple[str, object, dict, dict, dict]]:
    from glmtg.formats import REGISTRY
    from glmtg.kernels.gguf import (activation, dequant, gemv, mmvq, mmvq_lanes, mmvq_lanes32, mmvq_moe,
                                    mmvq_moe_lanes, moe)
    from glmtg.kernels.gguf.tables import lookup_table

    def blocks(name: str) -> dict:
        f = REGISTRY[name]
        return dict(FMT=f.gguf_type, BS=f.block_size, TS=f.type_size)

    def aux(name: str) -> str:
        return "*i64" if lookup_table(name, "cpu").dtype.itemsize == 8 else "*i32"

    # q8_0's float decoder converts bytes by PRMT (decode._byte_f32), q4_0's nibbles by LOP3 + PRMT (the moe below)
    jobs = [(f"gguf dequant {name}", dequant._dequant_rows_kernel, dict(W="*u8", Out="*fp32", Aux=aux(name)),
             dict(blocks(name), BLOCK_R=4, BLOCK_G=4), dict(num_warps=4)) for name in ("q8_0", "q6_k")]
    for name in ("q4_k", "iq4_xs"):
        g = gemv.steps_for(REGISTRY[name].block_size, 512)
        jobs.append((f"gguf gemv {name}", gemv._gemv_kernel, dict(X="*bf16", W="*u8", Y="*bf16", Aux=aux(name)),
                     dict(blocks(name), BLOCK_T=1, BLOCK_N=8, G=g), dict(num_warps=4)))
    name = "q4_0"
    g = gemv.steps_for(REGISTRY[name].block_size, 512)
    jobs.append(("gguf moe gate_up q4_0", moe._gate_up_kernel,
                 dict(X="*bf16", Gate="*u8", Up="*u8", Ids="*i64", Weights="*fp32", Act="*fp32", Aux=aux(name)),
                 dict(blocks(name), BLOCK_R=8, G=g), dict(num_warps=4)))
    jobs.append(("gguf moe down q4_0", moe._down_kernel,
                 dict(Act="*fp32", Down="*u8", Ids="*i64", Y="*bf16", Aux=aux(name)),
                 dict(blocks(name), BLOCK_R=8, G=g), dict(num_warps=4)))
    jobs.append(("gguf mmvq quantize", activation._quantize_kernel, dict(X="*bf16", Q="*i8", DX="*fp32", S="*i32"),
                 dict(GB=32), dict(num_warps=4)))
    jobs.append(("gguf silu_mul_quantize", activation._silu_mul_quantize_kernel,
                 dict(GU="*bf16", Q="*i8", DX="*fp32", S="*i32"), dict(GB=32, PRECISE_EXP=True),
                 dict(num_warps=4, enable_reflect_ftz=False)))
    for name in ("q4_k", "iq4_xs"):  # dp4a; iq4_xs' level lookup by prmt
        block_n, g, warps = mmvq.default_config(4096, 4096 // REGISTRY[name].block_size)
        jobs.append((f"gguf mmvq {name}", mmvq._mmvq_kernel,
                     dict(XW="*i32", DX="*fp32", XS="*i32", W="*u8", Y="*bf16", Bias="*bf16", Res="*bf16"),
                     dict(blocks(name), BLOCK_T=1, BLOCK_N=block_n, G=g, HAS_BIAS=name == "q4_k", HAS_RES=True),
                     dict(num_warps=warps)))
    # mmvq's lanes variant (mmvq_lanes.py; inline PTX: shf.r.clamp, dp4a) at its default launch
    for name, split in (("q6_k", 1), ("q4_k", 2)):
        block_n, values, warps = mmvq_lanes.default_config(name, split)
        jobs.append((f"gguf mmvq lanes E={split} {name}", mmvq_lanes._lanes_kernel,
                     dict(XW="*i32", DX="*fp32", XS="*i32", W="*u8", Y="*bf16", Bias="*bf16", Res="*bf16"),
                     dict(FMT=REGISTRY[name].gguf_type, TS=REGISTRY[name].type_size, BLOCK_N=block_n,
                          G=values // 256, HAS_BIAS=False, HAS_RES=True, E=split), dict(num_warps=warps)))
    # the 32-value lanes GEMV (mmvq_lanes32.py) at its default launch, and mmvq_moe's lanes kernels
    # (mmvq_moe_lanes.py) at theirs for Air's expert formats (inline PTX: shf.r.clamp, dp4a)
    for name, split in (("q4_0", 2), ("q8_0", 1), ("q5_0", 4)):
        block_n, values, warps = mmvq_lanes32.default_config(split)
        jobs.append((f"gguf mmvq lanes32 L={split} {name}", mmvq_lanes32._lanes32_kernel,
                     dict(XW="*i32", DX="*fp32", XS="*i32", W="*u8", Y="*bf16", Bias="*bf16", Res="*bf16"),
                     dict(FMT=REGISTRY[name].gguf_type, TS=REGISTRY[name].type_size, BLOCK_N=block_n,
                          G=values // 32, HAS_BIAS=False, HAS_RES=True, L=split), dict(num_warps=warps)))
    for gu, dn, lanes in (("q4_0", "q4_0", 2), ("q4_k", "q8_0", 1)):
        fg, fd = REGISTRY[gu], REGISTRY[dn]
        rows, g, warps = mmvq_moe_lanes.default_config(gu, lanes, 4096 // fg.block_size, False)
        jobs.append((f"gguf mmvq_moe lanes gate_up {gu}", mmvq_moe_lanes._gate_up_lanes_kernel,
                     dict(XW="*i32", DX="*fp32", XS="*i32", Gate="*u8", Up="*u8", Ids="*i64", Weights="*fp32",
                          Act="*fp32", SGate="*u8", SUp="*u8"),
                     dict(FMT=fg.gguf_type, TS=fg.type_size, GPB=fg.block_size // 32, BLOCK_R=rows, G=g, L=lanes,
                          SHARED=1), dict(num_warps=warps)))
        rows, g, warps = mmvq_moe_lanes.default_config(dn, 2, 44, True)
        jobs.append((f"gguf mmvq_moe lanes down {dn}", mmvq_moe_lanes._down_lanes_kernel,
                     dict(AW="*i32", ADX="*fp32", AS="*i32", Down="*u8", Ids="*i64", Y="*bf16", SHARED_OFF="i64"),
                     dict(NB=44, FMT=fd.gguf_type, TS=fd.type_size, GPB=1, BLOCK_R=rows, G=g, L=2, SHARED=1),
                     dict(num_warps=warps)))
    # mmvq_moe at its CUDA launch (one row a program, 1024 values a step, one warp; the activation unfused).
    gate_up, down = "q4_0", "q6_k"
    jobs.append(("gguf mmvq_moe gate_up q4_0", mmvq_moe._gate_up_kernel,
                 dict(XW="*i32", DX="*fp32", XS="*i32", Gate="*u8", Up="*u8", Ids="*i64", Weights="*fp32",
                      Act="*fp32", AQ="*i8", ADX="*fp32", AS="*i32"),
                 dict(blocks(gate_up), BLOCK_R=1, G=gemv.steps_for(REGISTRY[gate_up].block_size, 1024), FUSED=False),
                 dict(num_warps=1)))
    jobs.append(("gguf mmvq_moe down q6_k", mmvq_moe._down_kernel,
                 dict(AW="*i32", ADX="*fp32", AS="*i32", Down="*u8", Ids="*i64", Y="*bf16"),
                 dict(blocks(down), BLOCK_R=1, G=gemv.steps_for(REGISTRY[down].block_size, 1024)), dict(num_warps=1)))
    return jobs


def _glue_jobs() -> list[tuple[str, object, dict, dict, dict]]:
    """The decoder glue's kernels (glmtg/layers/fused.py) at GLM-4.5-Air's shapes, bf16 activations."""
    from glmtg.kernels.qk_rope import _qk_rope_kernel
    from glmtg.kernels.rms_norm import _rms_norm_kernel
    from glmtg.kernels.router import _logits_kernel, _select_kernel

    return [
        ("rms_norm residual+quantize", _rms_norm_kernel,
         dict(X="*bf16", R="*bf16", W="*bf16", Y="*bf16", S="*bf16", Q="*i8", DX="*fp32", QS="*i32", INV_H="fp32",
              EPS="fp32"), dict(BLOCK=4096, RESIDUAL=True, QUANTIZE=True), dict(num_warps=8)),
        ("router logits", _logits_kernel, dict(X="*bf16", W="*fp32", Part="*fp32"),
         dict(BLOCK_T=1, BLOCK_E=4, BLOCK_H=1024), dict(num_warps=4)),
        ("router select", _select_kernel, dict(Part="*fp32", Bias="*fp32", Ids="*i64", Weights="*fp32",
                                               scaling="fp32"),
         dict(SPLIT=4, BLOCK_E=128, BLOCK_K=8, NORM=True), dict(num_warps=4)),
        ("qk_rope norm+store", _qk_rope_kernel,
         dict(Y="*bf16", Cos="*fp32", Sin="*fp32", QW="*bf16", KW="*bf16", Q="*bf16", K="*bf16", KC="*fp16",
              VC="*fp16", Start="*i32", eps="fp32", inv_d="fp32"),
         dict(HQ=96, HKV=8, D=128, R=64, BLOCK_D=128, NORM=True, STORE_KV=True),
         dict(num_warps=1, enable_fp_fusion=False)),
    ]


def main() -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glmtg.kernels.attention.plan import ARCH_PLANS

    failed = 0
    print("| arch | kernel | shared bytes | shared limit |")
    print("|---|---|---|---|")
    for cc in ARCHS:
        limit = ARCH_PLANS[(cc // 10, cc % 10)].shared_kib_per_block * 1024
        for name, kernel, pointers, const, options in (_attention_jobs(cc) + _store_jobs(cc) + _moe_jobs()
                                                       + _gguf_jobs() + _glue_jobs()):
            try:
                sig, attrs = _sig(kernel, pointers, const)
                compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", cc, 32),
                                          options=options)
                assert compiled.asm.get("cubin"), "no machine code"
            except Exception as exc:  # report and go on: one failure should not hide the others
                failed += 1
                cause = exc.__cause__ or exc
                text = " ".join(str(cause).split())[:300]
                print(f"| sm_{cc} | {name} | compile failed: {type(cause).__name__}: {text} |")
                continue
            print(f"| sm_{cc} | {name} | {compiled.metadata.shared} | {limit} |")
    return 1 if failed else 0


# --- the compile check --------------------------------------------------------------------------------

def test_every_kernel_compiles_for_sm80_sm86_sm89(compile_report):
    stdout, table = compile_report(__file__, timeout=600)
    rows = [cells for cells in table if len(cells) == 4 and cells[2].isdigit()]
    per_arch = {cc: [r for r in rows if r[0] == f"sm_{cc}"] for cc in ARCHS}
    assert all(len(r) == len(per_arch[ARCHS[0]]) >= 20 for r in per_arch.values()), stdout
    for arch, name, shared, limit in rows:
        assert int(shared) <= int(limit), f"{arch} {name}: {shared} bytes of shared memory, at most {limit}"


# --- the byte-level fp8 conversions (interpreter) -------------------------------------------------------

@triton.jit
def _decode_bytes(Codes, Out, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Out + offs, _fp8_bits_to_f16(tl.load(Codes + offs)))


@triton.jit
def _encode_values(Values, Out, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Out + offs, _e4m3_bits(tl.load(Values + offs)))


def test_fp8_bytes_decode_exactly():
    """Every e4m3fn byte but the two NaNs -> the same fp16 as torch's cast (exact: every e4m3 value is
    an fp16 value)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.full((256,), float("nan"), dtype=torch.float16)
    _decode_bytes[(1,)](codes, out, N=256)
    want = codes.view(torch.float8_e4m3fn).to(torch.float16)
    finite = ~want.isnan()
    assert int(finite.sum()) == 254
    assert torch.equal(out[finite].view(torch.int16), want[finite].view(torch.int16))


def test_fp8_values_encode_to_their_bytes():
    """Every finite e4m3fn value (as float32, on the grid as the store kernel rounds it) -> its byte,
    signed zeros and subnormals included, in a shuffled order."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[~codes.view(torch.float8_e4m3fn).float().isnan()]
    codes = codes[torch.randperm(codes.numel(), generator=torch.Generator().manual_seed(0))]
    values = torch.cat([codes.view(torch.float8_e4m3fn).float(), torch.full((2,), 448.0)])  # pad to 256
    out = torch.zeros(256, dtype=torch.uint8)
    _encode_values[(1,)](values, out, N=256)
    assert torch.equal(out[:254], codes)


@pytest.mark.parametrize("k_format, v_format", [("fp8", "fp8"), ("fp8", "q8_0")])
def test_attention_reads_fp8_as_bytes_like_fp8(monkeypatch, k_format, v_format):
    """decode_attention as it runs on sm_80/sm_86 (fp8 caches passed as bytes, NATIVE_FP8 off), in the
    interpreter: the same output, bit for bit, as the native fp8 path (both dot the same fp16 values), and
    2e-3 relative to float64 attention over the dequantized cache (fp16 queries and dots, as test_plan.py)."""
    from glmtg.kernels.attention import Target, decode_attention, launch
    from glmtg.kv_cache import KVCache
    from tests.references.attention import decode_attention_ref

    g = torch.Generator().manual_seed(3)
    batch, hkv, group, d, capacity, lengths = 2, 2, 5, 64, 77, [77, 30]
    cache = KVCache(num_layers=1, batch=batch, capacity=capacity, num_kv_heads=hkv, head_dim=d,
                    k_format=k_format, v_format=v_format)
    cache.append(0, torch.randn(batch, capacity, hkv, d, generator=g), torch.randn(batch, capacity, hkv, d, generator=g),
                 torch.zeros(batch, dtype=torch.int32))
    cache.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
    q = torch.randn(batch, 1, hkv * group, d, generator=g).half()
    kv, vv = cache.k(0), cache.v(0)
    outs = []
    for capability in (None, (8, 6)):  # the interpreter's own target, then one without fp8 conversion
        monkeypatch.setattr(launch, "target_of", lambda device, capability=capability: Target(8, capability))
        out = torch.full_like(q, float("nan"))
        decode_attention(q, kv.data, vv.data, cache.lengths, k_scale=kv.scale, v_scale=vv.scale, k_format=k_format,
                         v_format=v_format, out=out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    ks, vs = zip(*(cache.dequantized(0, b, capacity) for b in range(batch)))
    ref, _ = decode_attention_ref(q, torch.stack(ks), torch.stack(vs), cache.lengths)
    err = ((outs[1].double() - ref).norm() / ref.norm()).item()
    assert err < 2e-3, err


def test_kv_store_writes_fp8_bytes_like_fp8(monkeypatch):
    """The append kernel as it runs on sm_80/sm_86 (fp8 store as bytes), in the interpreter: the same bytes
    as the formats' torch quantization (bit-exact, as test_kv_store.py), over random rows of odd scales,
    sentinel-filled store, one token past the written ones untouched."""
    from glmtg.formats import FORMATS
    from glmtg.kernels import kv_store as store

    monkeypatch.setattr(store, "_native_fp8", lambda device: False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 2, 64, generator=g) * torch.logspace(-3, 3, 64)  # e4m3 subnormals to 448
    data = torch.full((2, 2, 7, 64), 0x5A, dtype=torch.uint8).view(torch.float8_e4m3fn)
    scale = torch.full((2, 2, 7), float("nan"))
    start = torch.tensor([0, 4], dtype=torch.int32)
    store.kv_store(x, data, scale, start, "fp8", backend="triton")
    codes, scales = FORMATS["fp8"].quantize(x)  # [B, S, Hkv, D], [B, S, Hkv]
    for b, s0 in enumerate(start.tolist()):
        assert torch.equal(data[b, :, s0:s0 + 3].view(torch.uint8), codes[b].transpose(0, 1).view(torch.uint8))
        assert torch.equal(scale[b, :, s0:s0 + 3], scales[b].transpose(0, 1))
    assert bool((data[0, :, 3:].view(torch.uint8) == 0x5A).all()) and bool(scale[0, :, 3:].isnan().all())


# --- plans and the CUDA loop's selection ----------------------------------------------------------------

GPUS = {"a100": (108, (8, 0)), "rtx3090": (82, (8, 6)), "rtx4090": (128, (8, 9)), "l40s": (142, (8, 9))}


def test_each_architecture_has_its_entry():
    from glmtg.kernels.attention import ARCH_PLANS
    from glmtg.kernels.attention.plan import SM90

    for cap in ((8, 0), (8, 6), (8, 9), (9, 0)):
        arch = ARCH_PLANS[cap]
        assert arch.registers_per_sm == 65536
        assert arch.cuda_loop_formats == (() if cap < (9, 0) else SM90.cuda_loop_formats)
    # NVIDIA's table: shared memory per SM / per block (KiB) and resident warps per SM.
    assert [(ARCH_PLANS[c].shared_kib_per_sm, ARCH_PLANS[c].shared_kib_per_block, ARCH_PLANS[c].max_warps_per_sm)
            for c in ((8, 0), (8, 6), (8, 9), (9, 0))] == [(164, 163, 64), (100, 99, 48), (100, 99, 48), (228, 227, 64)]


def test_plans_for_ampere_and_ada_are_valid_launches():
    """Over a grid of shapes: rows covered, grid within CUDA's limits, one wave of programs whose warps the
    SM holds, slices of at least 64 tokens, never the CUDA loop (even when the caller says it could run),
    no PDL."""
    from glmtg.kernels.attention import ARCH_PLANS, Target
    from glmtg.kernels.attention.plan import plan_for

    for (sms, cap), (hq, hkv), ctx, batch, fmt, sq, head_dim in itertools.product(
            GPUS.values(), [(96, 8), (48, 2), (12, 1), (40, 8)], [1, 100, 4096, 65536, 131072], (1, 8, 32),
            (None, "q8_0", "q4_0", "fp8"), (1, 3), (64, 128, 256)):
        rows = hq // hkv * sq
        launch = plan_for(Target(sms, cap), batch, hkv, rows, head_dim, ctx, cache_format=fmt, cuda_loop=True)
        what = (sms, cap, hq, hkv, ctx, batch, fmt, sq, head_dim, launch)
        assert launch.m_tiles * launch.block_m >= rows > (launch.m_tiles - 1) * launch.block_m, what
        work = batch * hkv * launch.m_tiles
        assert launch.num_splits >= 1 and (launch.num_splits == 1 or launch.num_splits * work <= 8 * sms), what
        # A split launch's programs are meant to be resident at once: their warps fit the SM (48 on sm_86/89).
        per_sm = -(-launch.num_splits * work // sms)
        assert launch.num_splits == 1 or per_sm * launch.num_warps <= ARCH_PLANS[cap].max_warps_per_sm, what
        assert batch * hkv <= 65535 and launch.m_tiles <= 65535, what
        assert launch.num_splits <= max(1, triton.cdiv(ctx, 64)), what
        assert launch.num_warps in (1, 4, 8) and launch.num_stages >= 1, what
        assert not launch.cuda_loop and not launch.pdl, what
        assert fmt != "q4_0" or launch.block_n >= 32, what


def test_sm89_splits_follow_the_sm_count():
    """One sm_89 entry serves the RTX 4090 and the L40S: the split count comes from the device's SMs."""
    from glmtg.kernels.attention import Target
    from glmtg.kernels.attention.plan import plan_for

    small, large = (plan_for(Target(sms, (8, 9)), 1, 8, 12, 128, 131072).num_splits for sms in (128, 142))
    assert small < large


def test_cuda_loop_never_selected_off_sm90(monkeypatch):
    """With the device faked as each architecture: sm_8x has neither the loop's availability nor its plan;
    sm_90 keeps planning it (its availability needs the real fatbin loaded, so only the plan is checked)."""
    import types

    from glmtg.kernels.attention import cuda_loop, plan
    from glmtg.kernels.attention.plan import plan_launch

    deep = dict(batch=1, num_kv_heads=8, rows=12, head_dim=128, max_context=65536)
    for sms, cap in [*GPUS.values(), (132, (9, 0))]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, cap=cap: cap)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None, sms=sms, cap=cap:
                            types.SimpleNamespace(multi_processor_count=sms, major=cap[0], minor=cap[1]))
        monkeypatch.setattr(plan, "_TARGETS", {})
        monkeypatch.setattr(cuda_loop, "_AVAILABLE", {})
        device = torch.device("cuda", 0)
        launch = plan_launch(**deep, device=device, cache_format="q4_0", cuda_loop=True)
        assert launch.cuda_loop == (cap == (9, 0)), (cap, launch)
        if cap != (9, 0):
            assert not cuda_loop.available(device), cap


if __name__ == "__main__":
    sys.exit(main())
