"""The checked launcher of decode attention: validates, plans (plan.py) and runs the Triton kernel
(kernel.py) or, for deep quantized caches on Hopper, the CUDA loop (cuda_loop.py), then the merge."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from glmtg.formats import FORMATS, KV_FORMATS, KernelCode
from glmtg.kernels._checks import capturing, check, shape
from glmtg.kernels.attention import cuda_loop as loop
from glmtg.kernels.attention.kernel import _decode_attention_kernel
from glmtg.kernels.attention.merge import MERGE_SPLIT_BLOCK, _merge_splits_kernel
from glmtg.kernels import pdl
from glmtg.kernels.attention.plan import DecodeLaunch, plan_format, plan_launch, target_of

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GROUP = 128
LOG2E = 1.4426950408889634


def _check_store(name: str, data: torch.Tensor, scale: torch.Tensor | None, fmt: str | None,
                 q: torch.Tensor) -> KernelCode:
    """Validate one cache tensor (and its scales); return the kernel's format code."""
    check(isinstance(data, torch.Tensor) and data.dim() == 4,
          f"{name} must be a 4-D tensor [B or pages, Hkv, tokens, D], got {shape(data)}")
    check(data.device == q.device, f"{name} is on {data.device} but q is on {q.device}")
    head_dim = q.shape[3]
    if fmt is None or (fmt in FORMATS and FORMATS[fmt].code == KernelCode.FLOAT):
        check(fmt is None or data.dtype == FORMATS[fmt].data_dtype,
              f"{name} dtype {data.dtype} does not hold format {fmt!r}")
        check(data.dtype == q.dtype, f"{name} dtype {data.dtype} must equal q dtype {q.dtype} "
              "(or name a quantized format)")
        check(scale is None, f"{name} is a plain float cache and takes no scale tensor")
        check(data.shape[3] == head_dim, f"{name} head_dim {data.shape[3]} != q head_dim {head_dim}")
        check(data.stride(3) == 1, f"{name} must have a contiguous last dimension, strides {data.stride()}")
        return KernelCode.FLOAT
    check(fmt in KV_FORMATS, f"{name} format must be one of {KV_FORMATS}, got {fmt!r}")
    form = FORMATS[fmt]
    code, dtype, row_len, scale_dtype = form.code, form.data_dtype, form.data_len(head_dim), form.scale_dtype
    check(q.dtype in (torch.float16, torch.bfloat16), f"a {fmt} cache needs fp16 or bf16 queries, got {q.dtype}")
    check(data.dtype == dtype, f"{name} ({fmt}) must be {dtype}, got {data.dtype}")
    check(data.shape[3] == row_len,
          f"{name} ({fmt}) rows must hold {row_len} values for head_dim {head_dim}, got {data.shape[3]}")
    check(data.stride(3) == 1, f"{name} must have a contiguous last dimension, strides {data.stride()}")
    want = (*data.shape[:3], *form.scale_tail(head_dim))
    check(isinstance(scale, torch.Tensor) and scale.dtype == scale_dtype and tuple(scale.shape) == want,
          f"{name} ({fmt}) needs a {scale_dtype} scale tensor of shape {want}, got "
          f"{scale.dtype if isinstance(scale, torch.Tensor) else None} {shape(scale)}")
    check(scale.device == q.device, f"{name} scale is on {scale.device} but q is on {q.device}")
    check(form.row_scaled or scale.stride(3) == 1, f"{name} scale must have a contiguous last dimension")
    return code


@dataclass(frozen=True)
class Problem:
    """An attention call's checked shapes and the kernel arguments derived from them (``checked_problem``)."""

    num_kv_heads: int
    group: int  # query heads per KV head
    k_code: KernelCode
    v_code: KernelCode
    page_size: int  # tokens per page; the capacity for a contiguous cache
    capacity: int  # tokens a sequence can hold
    page_table_arg: torch.Tensor  # the page table, or any int32 tensor when PAGED is off (never read)
    stride_pt: int
    native_fp8: bool  # the GPU converts e4m3 itself (else fp8 codes go in as bytes)
    k_arg: torch.Tensor
    v_arg: torch.Tensor
    k_scale_arg: torch.Tensor  # q8_0/q4_0 scales as int32 words, fp8 as is; the data itself when plain
    v_scale_arg: torch.Tensor


def checked_problem(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                    page_table: torch.Tensor | None, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                    k_format: str | None, v_format: str | None, head_dims: tuple[int, ...],
                    validate: bool) -> Problem:
    """The argument checks every attention launcher shares (decode and prefill; ValueError naming the
    argument): q [B, S, Hq, D] with D in ``head_dims``, the K/V stores and their scales (``_check_store``),
    lengths int32 [B] on q's device, a contiguous cache's batch or a page table's shape; with ``validate``
    (skipped while a CUDA graph is captured) lengths in [S, capacity] and the live pages inside the pool,
    read on the host. Returns the shapes and the kernel's arguments."""
    check(isinstance(q, torch.Tensor) and q.dim() == 4, f"q must be a 4-D tensor [B, Sq, Hq, D], got {shape(q)}")
    check(q.dtype in SUPPORTED_DTYPES, f"q dtype {q.dtype} is not one of {SUPPORTED_DTYPES}")
    batch, sq, num_q_heads, head_dim = q.shape
    check(head_dim in head_dims, f"head_dim {head_dim} is not one of {head_dims}")
    check(batch >= 1 and sq >= 1, f"q must have B >= 1 and Sq >= 1, got {tuple(q.shape)}")
    check(q.stride(3) == 1, f"q must have a contiguous last dimension, strides {q.stride()}")
    k_code = _check_store("k_cache", k_cache, k_scale, k_format, q)
    v_code = _check_store("v_cache", v_cache, v_scale, v_format, q)
    check(v_cache.shape[:3] == k_cache.shape[:3],
          f"v_cache shape {tuple(v_cache.shape)} must match k_cache shape {tuple(k_cache.shape)} in the first 3 dims")
    check(isinstance(lengths, torch.Tensor) and lengths.device == q.device,
          f"lengths is on {getattr(lengths, 'device', None)} but q is on {q.device}")
    num_kv_heads = k_cache.shape[1]
    check(num_kv_heads >= 1 and num_q_heads % num_kv_heads == 0,
          f"q heads ({num_q_heads}) must be a multiple of cache KV heads ({num_kv_heads})")
    check(lengths.dtype == torch.int32 and lengths.shape == (batch,),
          f"lengths must be int32 of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}")
    if page_table is None:
        check(k_cache.shape[0] == batch, f"contiguous k_cache batch {k_cache.shape[0]} != q batch {batch}")
        page_size = capacity = k_cache.shape[2]
        page_table_arg, stride_pt = lengths, 0  # never read when PAGED is off
    else:
        check(page_table.device == q.device, f"page_table is on {page_table.device} but q is on {q.device}")
        check(page_table.dtype == torch.int32 and page_table.dim() == 2 and page_table.shape[0] == batch,
              f"page_table must be int32 [B={batch}, max_pages], got {page_table.dtype} {tuple(page_table.shape)}")
        check(page_table.stride(1) == 1, "page_table must have a contiguous last dimension")
        page_size = k_cache.shape[2]
        check(page_size >= 1, "page size (k_cache.shape[2]) must be >= 1")
        capacity = page_table.shape[1] * page_size
        page_table_arg, stride_pt = page_table, page_table.stride(0)
    if validate and not capturing(q.device):
        lens = lengths.cpu()
        check(bool((lens >= sq).all()) and bool((lens <= capacity).all()),
              f"lengths must lie in [S={sq}, capacity={capacity}]: every length >= Sq (the new tokens are in "
              f"the cache) and <= the capacity, got {lens.tolist()}")
        if page_table is not None:
            pages_needed = (lens + page_size - 1) // page_size
            pt = page_table.cpu()
            used = torch.arange(pt.shape[1])[None, :] < pages_needed[:, None]
            bad = used & ((pt < 0) | (pt >= k_cache.shape[0]))
            check(not bool(bad.any()), f"page_table holds page indices outside [0, {k_cache.shape[0]}) for live tokens")
    # Before sm_89 the GPU has no e4m3 conversion and Triton no fp8e4nv type: fp8 codes go in as bytes.
    native_fp8 = target_of(q.device).native_fp8
    return Problem(
        num_kv_heads, num_q_heads // num_kv_heads, k_code, v_code, page_size, capacity, page_table_arg, stride_pt,
        native_fp8,
        k_cache if native_fp8 or k_code != KernelCode.FP8 else k_cache.view(torch.uint8),
        v_cache if native_fp8 or v_code != KernelCode.FP8 else v_cache.view(torch.uint8),
        _scale_words("k_scale", k_scale, k_code) if k_code != KernelCode.FLOAT else k_cache,
        _scale_words("v_scale", v_scale, v_code) if v_code != KernelCode.FLOAT else v_cache)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    page_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_format: str | None = None,
    v_format: str | None = None,
    scale: float | None = None,
    max_context: int | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    validate: bool = True,
    launch: DecodeLaunch | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of Sq new tokens per sequence over their KV cache.

    q: [B, Sq, Hq, D]. Contiguous cache: k_cache/v_cache [B, Hkv, Nmax, D]. Paged cache:
    [num_pages, Hkv, page_size, D] with ``page_table`` int32 [B, max_pages]. ``lengths`` int32 [B]
    on q's device counts the cached tokens of each sequence *including* the Sq new ones, which are
    causal among themselves. Returns out [B, Sq, Hq, D] in q's dtype (or ``out``'s, which may differ: the
    fp32 result is rounded once into it, e.g. bf16 for a bf16 model reading an f16 cache), and with
    ``return_lse`` the natural-log log-sum-exp of the scaled scores, fp32 [B, Sq, Hq].

    Quantized caches (glmtg.kv_cache's planar layout) are read directly and dequantized in
    registers: ``k_format``/``v_format`` "q8_0" (int8 codes [.., D], fp16 ``*_scale`` [.., D/32]),
    "q4_0" (uint8 [.., D/2] packed as llama.cpp's blocks, fp16 scale [.., D/32]) or "fp8"
    (float8_e4m3fn [.., D], fp32 scale per row [..]). K and V formats may differ.

    ``max_context`` (default: the cache capacity) sets the split count; it should be the longest
    context the caller will run with these shapes. ``validate`` reads ``lengths`` and the page table
    on the host to reject bad values; it is skipped during CUDA-graph capture (the kernel still
    clamps lengths to the cache, so a bad value can never read outside it).
    """
    p = checked_problem(q, k_cache, v_cache, lengths, page_table=page_table, k_scale=k_scale, v_scale=v_scale,
                        k_format=k_format, v_format=v_format, head_dims=SUPPORTED_HEAD_DIMS, validate=validate)
    batch, sq, num_q_heads, head_dim = q.shape
    num_kv_heads, group, k_code, v_code = p.num_kv_heads, p.group, p.k_code, p.v_code
    page_size, capacity = p.page_size, p.capacity
    check(group <= MAX_GROUP, f"GQA group {group} exceeds the supported maximum {MAX_GROUP}")
    if max_context is None:
        max_context = capacity
    check(isinstance(max_context, int) and max_context >= 1, f"max_context must be a positive int, got {max_context!r}")

    rows = group * sq
    # Only asked where it can matter: the planner's choice, or a launch that names the CUDA loop.
    cuda_loop = (launch is None or launch.cuda_loop) and loop.usable(
        q, k_cache, v_cache, k_scale, v_scale, k_format, v_format, page_size if page_table is not None else None)
    if launch is None:
        launch = plan_launch(batch, num_kv_heads, rows, head_dim, max_context, q.device,
                             cache_format=plan_format(k_format, v_format), cuda_loop=cuda_loop)
    check(not launch.cuda_loop or cuda_loop,
          f"launch.cuda_loop needs K and V in q8_0/q4_0/fp8, head_dim 128, <= {loop.MAX_ROWS} "
          "rows per KV head, fp16/bf16 queries, 16-byte aligned rows and power-of-two pages on a Hopper GPU")
    check(launch.m_tiles * launch.block_m >= rows and (not launch.cuda_loop or launch.block_m == loop.ROWS),
          f"launch covers {launch.m_tiles} x {launch.block_m} query rows per KV head, but there are {rows} "
          f"(GQA group {group} x Sq {sq})" + (f"; the CUDA loop takes {loop.ROWS}-row tiles"
                                             if launch.cuda_loop else ""))
    if out is None:
        out = torch.empty_like(q)
    else:
        check(out.shape == q.shape and out.dtype in SUPPORTED_DTYPES and out.device == q.device
              and out.stride(3) == 1,
              f"out must match q in shape and device, be one of {SUPPORTED_DTYPES}, with a contiguous last dimension")
    # Measured on the H100: q4_0 tiles of 16 tokens come out wrong from the compiled kernel (the
    # interpreter is right); 32 and more are exact (tests/kernels/test_decode_attention_quant.py).
    # Likely the tl.join + tl.reshape of the nibbles: the same pattern broke 16-token q8_0 tiles when
    # it split their block scales (see _block_scales).
    check(not (KernelCode.Q4_0 in (k_code, v_code) and q.device.type == "cuda" and launch.block_n < 32
              and not launch.cuda_loop),
          f"a q4_0 cache needs block_n >= 32 on the GPU, got {launch.block_n}")
    lse = torch.empty((batch, sq, num_q_heads), dtype=torch.float32, device=q.device) if return_lse else out
    m_pad = launch.m_tiles * launch.block_m
    direct = launch.num_splits == 1 and not launch.cuda_loop
    if direct:
        partial_o = partial_lse = out  # unused
    else:
        partial_o = torch.empty((batch * num_kv_heads, launch.num_splits, m_pad, head_dim),
                                dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch * num_kv_heads, launch.num_splits, m_pad),
                                  dtype=torch.float32, device=q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    fp16_dot = launch.fp16_dot and k_code != KernelCode.FLOAT and v_code != KernelCode.FLOAT
    native_fp8, k_arg, v_arg, k_scale_arg, v_scale_arg = p.native_fp8, p.k_arg, p.v_arg, p.k_scale_arg, p.v_scale_arg
    wait = launch.pdl and pdl.enabled(q.device)  # launched early after the kernel before (pdl.py)
    if launch.cuda_loop:
        loop.launch(q, k_cache, v_cache, k_scale, v_scale, k_format, v_format, lengths,
                    page_table, partial_o, partial_lse, scale_log2=float(scale) * LOG2E,
                    capacity=capacity, num_splits=launch.num_splits)
    else:
        _decode_attention_kernel[(launch.num_splits, batch * num_kv_heads, launch.m_tiles)](
            q, k_arg, v_arg, k_scale_arg, v_scale_arg, out, lse, partial_o, partial_lse, lengths, p.page_table_arg,
            q.stride(0), q.stride(1), q.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *_scale_strides(k_scale_arg, k_code), *_scale_strides(v_scale_arg, v_code),
            p.stride_pt,
            float(scale) * LOG2E,
            capacity,
            launch.num_splits,
            SQ=sq, GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, M_PAD=m_pad,
            PAGE_SIZE=page_size, PAGED=page_table is not None, K_FORMAT=int(k_code), V_FORMAT=int(v_code),
            DIRECT_OUT=direct, WRITE_LSE=return_lse, IEEE_DOT=q.dtype == torch.float32,
            USE_PDL=launch.pdl and not direct, WAIT_PDL=wait, FP16_DOT=fp16_dot,
            # the interpreter has no PTX
            ASM_DEQUANT=int(fp16_dot and launch.asm_dequant and q.device.type == "cuda"), NATIVE_FP8=native_fp8,
            num_warps=launch.num_warps, num_stages=launch.num_stages, **({"launch_pdl": True} if wait else {}),
        )
    if not direct:
        block_d = 32
        split_block = min(MERGE_SPLIT_BLOCK, triton.next_power_of_2(launch.num_splits))
        extra = {"launch_pdl": True} if launch.pdl else {}
        _merge_splits_kernel[(batch * num_kv_heads, rows, head_dim // block_d)](
            out, lse, partial_o, partial_lse, lengths,
            out.stride(0), out.stride(1), out.stride(2),
            capacity,
            launch.num_splits,
            SQ=sq, GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_N=launch.block_n, M_PAD=m_pad,
            SPLIT_BLOCK=split_block, BLOCK_D=block_d, ONE_PASS=launch.num_splits <= split_block,
            WRITE_LSE=return_lse, USE_PDL=launch.pdl,
            num_warps=4, **extra,
        )
    return (out, lse) if return_lse else out


def _scale_words(name: str, scale: torch.Tensor, code: KernelCode) -> torch.Tensor:
    """q8_0/q4_0 block scales as int32 words (two fp16 scales each; see kernel._block_scales), fp8 as is."""
    if code not in (KernelCode.Q8_0, KernelCode.Q4_0):
        return scale
    try:
        return scale.view(torch.int32)
    except RuntimeError:
        raise ValueError(f"{name} must be 4-byte aligned per row (even strides and storage offset), "
                         f"got strides {scale.stride()} and offset {scale.storage_offset()}") from None


def _scale_strides(scale: torch.Tensor, code: KernelCode) -> tuple[int, int, int]:
    return (scale.stride(0), scale.stride(1), scale.stride(2)) if code != KernelCode.FLOAT else (0, 0, 0)

