"""The CUDA loop for quantized caches (glmtg/kernels/attention/cuda/decode_quant.cu via cuda_loop.py).

GPU tests compare with float64 attention over the dequantized cache, like
test_launch_quant.py (bf16 queries and fp16 dots: 1.5e-2 relative, the same bound and
reasons), with every slot past each sequence's length poisoned with NaN scales and the output
poisoned with NaN before the call. They check that the CUDA loop was the launch planned, so a silent
fall-back to the Triton kernel cannot pass for it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from glmtg.formats import FORMATS, KernelCode
from glmtg.kernels.attention import (
    cuda_loop,
    cuda_loop_launch,
    decode_attention,
    plan_launch,
)
from glmtg.kernels.sass import longest_loop

QUANT = ("q8_0", "q4_0", "fp8")


def test_fatbin_matches_source():
    """The committed fatbin was built from the committed source
    (rebuild: python -m glmtg.kernels.attention.cuda.build)."""
    assert cuda_loop.FATBIN.stat().st_size > 0
    assert cuda_loop.STAMP.read_text().strip() == cuda_loop.source_digest()


def test_format_codes_match_the_cuda_source():
    """The .cu's ``enum Format`` declares the formats' kernel codes (glmtg.formats.KernelCode), and the
    loop's kernels are named by them."""
    import re

    enum = re.search(r"enum Format \{([^}]*)\}", cuda_loop.SOURCE.read_text()).group(1)
    declared = {name.strip(): int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", enum)}
    assert declared == {"kQ8_0": KernelCode.Q8_0, "kQ4_0": KernelCode.Q4_0, "kFp8": KernelCode.FP8}
    assert set(cuda_loop.LOOP_CODES) == set(declared.values())
    want = f"glmtg_decode_quant_k{int(KernelCode.Q4_0)}_v{int(KernelCode.FP8)}_p1"
    assert cuda_loop.kernel_name("q4_0", "fp8", True) == want


def test_cuda_loop_launch_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_kv_heads=0"):
        cuda_loop_launch(1, 0, 65536, torch.device("cpu"))


def _cuda_launch(batch, hkv, capacity, device, num_splits=None, rows=12):
    """A launch of the CUDA loop whatever the plan would pick (tests cover every format)."""
    return replace(cuda_loop_launch(batch, hkv, capacity, device, rows=rows),
                   num_splits=num_splits or max(1, min(132, -(-capacity // 64))))


def test_cuda_loop_launch_row_tiles_and_coverage_check(filled_cache):
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


def test_cuda_loop_refused_where_unsupported(filled_cache):
    cache = filled_cache(1, 1, 64, [10], 16, "q8_0", "q8_0", "cpu")
    kv, vv = cache.k(0), cache.v(0)
    q = torch.randn(1, 1, 12, 64).half()
    launch = _cuda_launch(1, 1, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda_loop needs"):
        decode_attention(q, kv.data, vv.data, cache.lengths, k_scale=kv.scale, v_scale=vv.scale,
                         k_format="q8_0", v_format="q8_0", launch=launch)


def test_cuda_loop_scope_needs_packed_rows(filled_cache):
    """The kernel steps through rows at the row length: strided views of codes or scales are not its."""
    cache = filled_cache(1, 2, 128, [40], 64, "q8_0", "q4_0", "cpu")
    kv, vv = cache.k(0), cache.v(0)
    q = torch.randn(1, 1, 24, 128).half()
    assert cuda_loop.supports(q, kv.data, vv.data, kv.scale, vv.scale, "q8_0", "q4_0", None)
    every_other = kv.data[:, :, ::2]  # rows 256 bytes apart
    assert not cuda_loop.supports(q, every_other, vv.data[:, :, ::2], kv.scale[:, :, ::2], vv.scale[:, :, ::2],
                                          "q8_0", "q4_0", None)
    padded_scales = torch.zeros(*vv.scale.shape[:3], 8, dtype=vv.scale.dtype)[..., :4]  # scale rows 16 bytes apart
    assert not cuda_loop.supports(q, kv.data, vv.data, kv.scale, padded_scales, "q8_0", "q4_0", None)
    # Byte offsets within a (sequence, KV head) are 32-bit: a cache of 2^31 bytes per head is not its.
    huge = torch.empty(1, 2, 2**24, 128, dtype=torch.int8, device="meta")  # packed, nothing allocated
    huge_scale = torch.empty(1, 2, 2**24, 4, dtype=torch.float16, device="meta")
    assert not cuda_loop.supports(q, huge, huge, huge_scale, huge_scale, "q8_0", "q8_0", None)
    fits = torch.empty(1, 2, 2**23, 128, dtype=torch.int8, device="meta")
    fits_scale = torch.empty(1, 2, 2**23, 4, dtype=torch.float16, device="meta")
    assert cuda_loop.supports(q, fits, fits, fits_scale, fits_scale, "q8_0", "q8_0", None)


def _planned(cache, q):
    """Whether decode_attention() may take the CUDA loop for this cache and these queries."""
    kv, vv = cache.k(0), cache.v(0)
    page_size = cache.page_size if cache.page_table is not None else None
    return cuda_loop.usable(q, kv.data, vv.data, kv.scale, vv.scale, kv.format, vv.format, page_size)


@pytest.mark.gpu
@pytest.mark.parametrize("k_format", QUANT)
@pytest.mark.parametrize("v_format", QUANT)
@pytest.mark.parametrize("page_size", [None, 64])
def test_gpu_cuda_loop_formats(k_format, v_format, page_size, filled_cache, check):
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
def test_gpu_cuda_loop_groups_and_multi_token(group, sq, page_size, fmt, filled_cache, check):
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
def test_gpu_cuda_loop_graph_replay(fmt, check_graph_replay):
    check_graph_replay(fmt, lambda capacity, device: _cuda_launch(2, 1, capacity, device))


@pytest.mark.gpu
@pytest.mark.parametrize("k_format, v_format", [("q4_0", "q4_0"), ("q8_0", "q4_0")])
@pytest.mark.parametrize("hkv, group", [(8, 12), (2, 24)])
def test_gpu_default_plan_takes_cuda_loop_for_q4_0(k_format, v_format, hkv, group, filled_cache, check):
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

    source = cuda_loop.SOURCE.read_text()
    body = re.search(r"struct Params \{(.*?)\};", source, re.DOTALL).group(1)
    fields = []
    for line in body.split(";"):
        line = re.sub(r"//.*", "", line).strip()
        if not line:
            continue
        kind, names = re.match(r"((?:const )?(?:long long|\w+)\*?)\s+(.*)", line).groups()
        fields += [(name.strip(), kind) for name in names.split(",")]
    ctype_of = {"float": ctypes.c_float, "int": ctypes.c_int, "long long": ctypes.c_longlong}
    mirror = cuda_loop._Params._fields_
    assert [name for name, _ in mirror] == [name for name, _ in fields]
    for (name, ctype), (_, kind) in zip(mirror, fields, strict=True):
        want = ctypes.c_void_p if kind.endswith("*") else ctype_of[kind]
        assert ctype is want, f"{name}: {kind} mirrored as {ctype}"


def test_fatbin_holds_every_kernel(tmp_path):
    """The shipped fatbin has a contiguous-cache and a paged kernel for each of the 9 K/V format pairs; each
    contiguous kernel's loop holds 64 mma (two 16-token steps of 32). Read with Triton's bundled
    cuobjdump/nvdisasm, no GPU needed."""
    import re
    import subprocess
    from pathlib import Path

    from triton.backends.nvidia import __file__ as nvidia_backend

    tools = Path(nvidia_backend).parent / "bin"
    if not (tools / "cuobjdump").exists() or not (tools / "nvdisasm").exists():
        pytest.skip("this Triton build ships no cuobjdump/nvdisasm")
    subprocess.run([str(tools / "cuobjdump"), "-xelf", "all", str(cuda_loop.FATBIN.resolve())], cwd=tmp_path,
                   capture_output=True, check=True)
    sass = "".join(subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout for cubin in sorted(tmp_path.glob("*.cubin")))
    parts = {re.match(r"\.text\.(\w+):", part).group(1): part
             for part in re.split(r"\n(?=\.text\.glmtg_decode_quant_)", sass)[1:]}
    loop_formats = [name for name, f in FORMATS.items() if f.code in cuda_loop.LOOP_CODES]
    want = {cuda_loop.kernel_name(k, v, paged) for k in loop_formats for v in loop_formats for paged in (False, True)}
    assert set(parts) == want
    for k in loop_formats:
        for v in loop_formats:
            ops = [op.split(".")[0] for op in longest_loop(parts[cuda_loop.kernel_name(k, v, False)])]
            assert ops.count("HMMA") == 64, (k, v, ops.count("HMMA"))


def test_variant_build_arguments(capsys, tmp_path):
    """Variant builds (-D) must name their own output, so the shipped fatbin and its stamp stay what
    they were measured as; a bad request fails with one line before nvcc is looked for."""
    from glmtg.kernels.attention.cuda import build

    assert build.main(["-D", "GLMTG_PREFETCH_TILES=2"]) == 2
    assert "give --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build.main(["--bogus"])
