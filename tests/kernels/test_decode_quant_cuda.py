"""The CUDA loop for quantized caches (glmtg/kernels/cuda/decode_quant.cu via decode_quant_cuda).

GPU tests compare with float64 attention over the dequantized cache, like
test_decode_attention_quant.py (bf16 queries and fp16 dots: 1.5e-2 relative, the same bound and
reasons), with every slot past each sequence's length poisoned with NaN scales and the output
poisoned with NaN before the call. They check that the CUDA loop was the launch planned, so a silent
fall-back to the Triton kernel cannot pass for it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from glmtg.kernels import decode_attention as decode_attention_module
from glmtg.kernels import decode_quant_cuda
from glmtg.kernels.decode_attention import cuda_loop_launch, decode_attention, plan_launch
from tests.kernels.test_decode_attention_quant import check, check_graph_replay, filled_cache

QUANT = ("q8_0", "q4_0", "fp8")


def test_fatbin_matches_source():
    """The committed fatbin was built from the committed source (rebuild: python -m glmtg.kernels.cuda.build)."""
    assert decode_quant_cuda.FATBIN.stat().st_size > 0
    assert decode_quant_cuda.STAMP.read_text().strip() == decode_quant_cuda.source_digest()


def test_plan_takes_cuda_loop_only_where_it_was_measured_faster(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(decode_attention_module, "_sm_count", lambda device: 132)  # the H100 the plan was timed on

    def loop(batch, hkv, rows, head_dim, ctx, fmt, cuda_loop=True):
        return plan_launch(batch, hkv, rows, head_dim, ctx, cpu, cache_format=fmt, cuda_loop=cuda_loop).cuda_loop

    launch = plan_launch(1, 8, 12, 128, 65536, cpu, cache_format="q4_0", cuda_loop=True)
    assert launch.cuda_loop and launch.block_n == 16 and launch.num_warps == 1 and launch.num_splits == 132
    # q4_0: from 8k tokens and 128k tokens over all (sequence, KV head) pairs.
    assert loop(1, 8, 12, 128, 16384, "q4_0") and loop(1, 4, 12, 128, 32768, "q4_0")
    assert loop(1, 2, 12, 128, 65536, "q4_0") and loop(1, 1, 12, 128, 131072, "q4_0") and loop(16, 1, 12, 128, 8192, "q4_0")
    assert not loop(1, 4, 12, 128, 16384, "q4_0") and not loop(1, 1, 12, 128, 65536, "q4_0")
    assert not loop(1, 8, 12, 128, 4096, "q4_0") and not loop(64, 8, 12, 128, 4096, "q4_0")  # short
    # 17-32 rows (48/2) in two 16-row tiles, counted as such: 48/2 from 32k; never more than 32 rows.
    assert loop(1, 2, 24, 128, 32768, "q4_0") and not loop(1, 2, 24, 128, 16384, "q4_0")
    assert plan_launch(1, 2, 24, 128, 65536, cpu, cache_format="q4_0", cuda_loop=True).m_tiles == 2
    assert not loop(1, 8, 36, 128, 65536, "q4_0")
    assert not loop(1, 8, 12, 64, 65536, "q4_0")  # head_dim
    assert not loop(1, 8, 12, 128, 65536, "q4_0", cuda_loop=False)  # not loadable or out of scope
    # q8_0 and fp8 keep the Triton plans; q8_0's one-warp programs from one per SM.
    for hkv, ctx in ((8, 16384), (8, 65536), (4, 32768), (1, 65536)):
        assert not loop(1, hkv, 12, 128, ctx, "q8_0") and not loop(1, hkv, 12, 128, ctx, "fp8")
    for hkv, ctx in ((8, 16384), (2, 65536), (1, 65536), (8, 8192)):
        launch = plan_launch(1, hkv, 12, 128, ctx, cpu, cache_format="q8_0", cuda_loop=True)
        assert launch.num_warps == 1 and launch.block_n == 16, (hkv, ctx)
    assert plan_launch(1, 1, 12, 128, 16384, cpu, cache_format="q8_0").num_warps == 4  # 64 programs
    # q8_0 groups of 17-32 rows: two 16-row tiles of one-warp programs from 64k tokens over the KV heads.
    launch = plan_launch(1, 2, 24, 128, 32768, cpu, cache_format="q8_0")
    assert (launch.block_m, launch.m_tiles, launch.num_warps) == (16, 2, 1)
    assert plan_launch(1, 2, 24, 128, 16384, cpu, cache_format="q8_0").block_m == 32
    assert plan_launch(1, 2, 24, 128, 65536, cpu, cache_format="fp8").block_m == 32
    with pytest.raises(ValueError, match="num_kv_heads=0"):
        cuda_loop_launch(1, 0, 65536, cpu)


def _cuda_launch(batch, hkv, capacity, device, num_splits=None, rows=12):
    """A launch of the CUDA loop whatever the plan would pick (tests cover every format)."""
    return replace(cuda_loop_launch(batch, hkv, capacity, device, rows=rows),
                   num_splits=num_splits or max(1, min(132, -(-capacity // 64))))


def test_cuda_loop_launch_row_tiles_and_coverage_check():
    cpu = torch.device("cpu")
    assert cuda_loop_launch(1, 2, 65536, cpu, rows=16).m_tiles == 1
    assert cuda_loop_launch(1, 2, 65536, cpu, rows=24).m_tiles == 2
    assert cuda_loop_launch(1, 2, 65536, cpu, rows=36).m_tiles == 3
    # A launch that covers fewer rows than the group has would leave outputs unwritten: refused.
    cache = filled_cache(1, 2, 128, [40], 64, "q8_0", "q8_0", "cpu")
    kv, vv = cache.k(0), cache.v(0)
    q = torch.randn(1, 1, 48, 128).half()
    with pytest.raises(ValueError, match="covers 1 x 16 query rows per KV head, but there are 24"):
        decode_attention(q, kv.data, vv.data, cache.lengths, k_scale=kv.scale, v_scale=vv.scale,
                         k_format="q8_0", v_format="q8_0",
                         launch=replace(plan_launch(1, 2, 24, 128, 64, cpu, cache_format="q8_0"), block_m=16))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        plan_launch(1, 2, 24, 128, 64, cpu, block_m=24)


def test_cuda_loop_refused_where_unsupported():
    cache = filled_cache(1, 1, 64, [10], 16, "q8_0", "q8_0", "cpu")
    kv, vv = cache.k(0), cache.v(0)
    q = torch.randn(1, 1, 12, 64).half()
    launch = _cuda_launch(1, 1, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda_loop needs"):
        decode_attention(q, kv.data, vv.data, cache.lengths, k_scale=kv.scale, v_scale=vv.scale,
                         k_format="q8_0", v_format="q8_0", launch=launch)


def test_cuda_loop_scope_needs_packed_rows():
    """The kernel steps through rows at the row length: strided views of codes or scales are not its."""
    cache = filled_cache(1, 2, 128, [40], 64, "q8_0", "q4_0", "cpu")
    kv, vv = cache.k(0), cache.v(0)
    q = torch.randn(1, 1, 24, 128).half()
    assert decode_quant_cuda.supports(q, kv.data, vv.data, kv.scale, vv.scale, "q8_0", "q4_0", None)
    every_other = kv.data[:, :, ::2]  # rows 256 bytes apart
    assert not decode_quant_cuda.supports(q, every_other, vv.data[:, :, ::2], kv.scale[:, :, ::2], vv.scale[:, :, ::2],
                                          "q8_0", "q4_0", None)
    padded_scales = torch.zeros(*vv.scale.shape[:3], 8, dtype=vv.scale.dtype)[..., :4]  # scale rows 16 bytes apart
    assert not decode_quant_cuda.supports(q, kv.data, vv.data, kv.scale, padded_scales, "q8_0", "q4_0", None)
    # Byte offsets within a (sequence, KV head) are 32-bit: a cache of 2^31 bytes per head is not its.
    huge = torch.empty(1, 2, 2**24, 128, dtype=torch.int8, device="meta")  # packed, nothing allocated
    huge_scale = torch.empty(1, 2, 2**24, 4, dtype=torch.float16, device="meta")
    assert not decode_quant_cuda.supports(q, huge, huge, huge_scale, huge_scale, "q8_0", "q8_0", None)
    fits = torch.empty(1, 2, 2**23, 128, dtype=torch.int8, device="meta")
    fits_scale = torch.empty(1, 2, 2**23, 4, dtype=torch.float16, device="meta")
    assert decode_quant_cuda.supports(q, fits, fits, fits_scale, fits_scale, "q8_0", "q8_0", None)


def _planned(cache, q):
    """Whether decode_attention() may take the CUDA loop for this cache and these queries."""
    kv, vv = cache.k(0), cache.v(0)
    page_size = cache.page_size if cache.page_table is not None else None
    return decode_quant_cuda.usable(q, kv.data, vv.data, kv.scale, vv.scale, kv.format, vv.format, page_size)


@pytest.mark.gpu
@pytest.mark.parametrize("k_format", QUANT)
@pytest.mark.parametrize("v_format", QUANT)
@pytest.mark.parametrize("page_size", [None, 64])
def test_gpu_cuda_loop_formats(k_format, v_format, page_size):
    lengths = [16383, 1, 5000, 777]
    cache = filled_cache(4, 8, 128, lengths, 16400 if page_size is None else 16448, k_format, v_format, "cuda",
                         page_size=page_size, seed=1)
    q = torch.randn(4, 1, 96, 128, device="cuda").bfloat16()
    assert _planned(cache, q)
    check(cache, q, torch.bfloat16, 1.5e-2, launch=_cuda_launch(4, 8, cache.capacity, q.device))


@pytest.mark.gpu
@pytest.mark.parametrize("group, sq, page_size", [(1, 1, None), (16, 1, None), (5, 3, 16), (8, 2, 256), (7, 2, None),
                                                   (24, 1, None), (12, 3, 64), (17, 1, 16)])
@pytest.mark.parametrize("fmt", QUANT)
def test_gpu_cuda_loop_groups_and_multi_token(group, sq, page_size, fmt):
    """Every row count, including more than one 16-row tile (24 = 48/2's group; 36 and 17 rows)."""
    lengths = [3, 4099, 1000]
    capacity = 4352
    cache = filled_cache(3, 2, 128, lengths, capacity, fmt, fmt, "cuda", page_size=page_size, seed=group + sq)
    q = torch.randn(3, sq, 2 * group, 128, device="cuda").half()
    assert _planned(cache, q)
    for splits in (1, 7, 64):  # one slice, uneven slices, many empty slices
        check(cache, q, torch.float16, 1.5e-2, launch=_cuda_launch(3, 2, capacity, q.device, splits, group * sq))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", QUANT)
def test_gpu_cuda_loop_graph_replay(fmt):
    check_graph_replay(fmt, lambda capacity, device: _cuda_launch(2, 1, capacity, device))


@pytest.mark.gpu
@pytest.mark.parametrize("k_format, v_format", [("q4_0", "q4_0"), ("q8_0", "q4_0")])
@pytest.mark.parametrize("hkv, group", [(8, 12), (2, 24)])
def test_gpu_default_plan_takes_cuda_loop_for_q4_0(k_format, v_format, hkv, group):
    """Deep q4_0 caches run the CUDA loop by default (plan_launch), and correctly; 24 rows in two tiles."""
    lengths = [16383, 9000]
    cache = filled_cache(2, hkv, 128, lengths, 16400, k_format, v_format, "cuda", seed=5)
    q = torch.randn(2, 1, hkv * group, 128, device="cuda").bfloat16()
    assert _planned(cache, q)
    assert plan_launch(2, hkv, group, 128, 16400, q.device, cache_format="q4_0", cuda_loop=True).cuda_loop
    check(cache, q, torch.bfloat16, 1.5e-2)


def test_params_struct_matches_source():
    """The ctypes mirror of struct Params lists the CUDA source's fields in the same order and types."""
    import ctypes
    import re

    source = decode_quant_cuda.SOURCE.read_text()
    body = re.search(r"struct Params \{(.*?)\};", source, re.DOTALL).group(1)
    fields = []
    for line in body.split(";"):
        line = re.sub(r"//.*", "", line).strip()
        if not line:
            continue
        kind, names = re.match(r"((?:const )?(?:long long|\w+)\*?)\s+(.*)", line).groups()
        fields += [(name.strip(), kind) for name in names.split(",")]
    ctype_of = {"float": ctypes.c_float, "int": ctypes.c_int, "long long": ctypes.c_longlong}
    mirror = decode_quant_cuda._Params._fields_
    assert [name for name, _ in mirror] == [name for name, _ in fields]
    for (name, ctype), (_, kind) in zip(mirror, fields, strict=True):
        want = ctypes.c_void_p if kind.endswith("*") else ctype_of[kind]
        assert ctype is want, f"{name}: {kind} mirrored as {ctype}"


def test_fatbin_holds_every_kernel(capsys):
    """The shipped fatbin has a contiguous-cache kernel for each of the 9 K/V format pairs, each with 32 mma
    per 16-token step (two steps per loop body): read by bench/inspect_kernel.py --cuda, no GPU needed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "inspect_kernel.py"
    spec = importlib.util.spec_from_file_location("inspect_kernel", path)
    inspect_kernel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inspect_kernel)
    if inspect_kernel._bundled("cuobjdump") is None or inspect_kernel._bundled("nvdisasm") is None:
        pytest.skip("this Triton build ships no cuobjdump/nvdisasm")
    assert inspect_kernel.cuda_loop_report(decode_quant_cuda.FATBIN) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    formats = {(k, v) for k in decode_quant_cuda.FORMAT_CODES for v in decode_quant_cuda.FORMAT_CODES}
    assert {tuple(r[0].strip().split("/")) for r in rows} == formats
    assert all(int(r[2]) == 64 for r in rows), rows


def test_variant_build_arguments(capsys, tmp_path):
    """Variant builds (-D) must name their own output, so the shipped fatbin and its stamp stay what
    they were measured as; a bad request fails with one line before nvcc is looked for."""
    from glmtg.kernels.cuda import build

    assert build.main(["-D", "GLMTG_PREFETCH_TILES=2"]) == 2
    assert "give --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build.main(["--bogus"])


def test_cuda_variants_parse():
    """bench/cuda_variants.py: NAME[=FATBIN][@CARVEOUT]."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("cuda_variants", bench / "cuda_variants.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    assert module.parse_variant("shipped") == ("shipped", decode_quant_cuda.FATBIN, None)
    assert module.parse_variant("pf=build/x.fatbin@-1") == ("pf", Path("build/x.fatbin"), -1)
    assert module.parse_variant("l1@0") == ("l1", decode_quant_cuda.FATBIN, 0)
    for bad in ("x=a.fatbin@half", "=a.fatbin", "@0"):
        with pytest.raises(ValueError, match="NAME\\[=FATBIN\\]\\[@CARVEOUT\\]"):
            module.parse_variant(bad)


def test_carveout_override_must_be_an_integer(monkeypatch):
    monkeypatch.setenv("GLMTG_DECODE_QUANT_CARVEOUT", "-1")
    assert decode_quant_cuda._env_int("GLMTG_DECODE_QUANT_CARVEOUT", 100) == -1
    monkeypatch.setenv("GLMTG_DECODE_QUANT_CARVEOUT", "half")
    with pytest.raises(ValueError, match="GLMTG_DECODE_QUANT_CARVEOUT must be an integer"):
        decode_quant_cuda._env_int("GLMTG_DECODE_QUANT_CARVEOUT", 100)
    monkeypatch.delenv("GLMTG_DECODE_QUANT_CARVEOUT")
    assert decode_quant_cuda._env_int("GLMTG_DECODE_QUANT_CARVEOUT", 100) == 100
