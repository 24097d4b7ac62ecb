"""The checked launcher of causal prefill attention (prefill.py's kernel) and its plan from shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from glmtg.formats import KernelCode
from glmtg.kernels._checks import check, check_power_of_two
from glmtg.kernels.attention.launch import LOG2E, _scale_strides, checked_problem
from glmtg.kernels.attention.prefill import _prefill_attention_kernel

PREFILL_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class PrefillLaunch:
    """Tile shape of one prefill launch (from shapes only; the grid is (row tiles, B * Hkv))."""

    block_m: int  # query rows ((token, head-in-group) pairs of one KV head) per program
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    # Quantized K and V: dots in fp16 (their in-register dequantization yields fp16; queries are rounded to
    # fp16, which assumes |q| < 65504, as the decode plan does). Plain K or V: dots in q's dtype.
    fp16_dot: bool = True
    asm_dequant: bool = True  # q8_0/q4_0 -> fp16 by inline PTX (CUDA, fp16 dots); see kernel._q8_0_to_f16
    # prefill._prefill_tile (scale in the exp2 FMA, P @ V accumulated in place) rather than the decode kernel's
    # step; both exact to the same roundings, kept for A/B timing (bench/prefill_attention.py --variants)
    fa2_step: bool = True


def plan_prefill(head_dim: int, device: torch.device, *, block_m: int | None = None, block_n: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, fp16_dot: bool = True,
                 asm_dequant: bool = True, fa2_step: bool = True) -> PrefillLaunch:
    """The launch for ``head_dim`` on ``device``; any keyword overrides the planned value.

    GPU: 128 query rows x 64 keys per tile, 8 warps (4 at head_dim 64), 3 stages: FlashAttention-2's
    forward tile for Hopper/Ampere, with room in the registers for a dequantized K or V tile; 64 keys
    (not 128) keep the q4_0/q8_0 unpacking within the register budget. CPU (the interpreter): 16 x 16,
    so that tiny test shapes still cross several row and key tiles.
    """
    check(head_dim in PREFILL_HEAD_DIMS, f"head_dim {head_dim} is not one of {PREFILL_HEAD_DIMS}")
    gpu = device.type == "cuda"
    launch = PrefillLaunch(
        block_m=block_m if block_m is not None else (128 if gpu else 16),
        block_n=block_n if block_n is not None else (64 if gpu else 16),
        num_warps=num_warps if num_warps is not None else ((8 if head_dim == 128 else 4) if gpu else 4),
        num_stages=num_stages if num_stages is not None else (3 if gpu else 1),
        fp16_dot=fp16_dot, asm_dequant=asm_dequant, fa2_step=fa2_step)
    for name in ("block_m", "block_n", "num_warps"):
        check_power_of_two(name, getattr(launch, name))
    check(launch.block_m >= 16 and launch.block_n >= 16, "block_m and block_n must be >= 16 (tl.dot's minimum)")
    check(isinstance(launch.num_stages, int) and launch.num_stages >= 1,
          f"num_stages must be a positive int, got {launch.num_stages!r}")
    return launch


def prefill_attention(
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
    out: torch.Tensor | None = None,
    validate: bool = True,
    launch: PrefillLaunch | None = None,
) -> torch.Tensor:
    """Causal attention of S new tokens per sequence over their KV cache, for chunks of any size.

    Same arguments and cache layouts as ``decode_attention``: q [B, S, Hq, D]; contiguous cache
    [B, Hkv, Nmax, D(-ish)] or paged [pages, Hkv, page_size, ..] with ``page_table`` int32 [B, max_pages];
    ``lengths`` int32 [B] on q's device counts each sequence's cached tokens *including* the S new ones
    (sequence b's new tokens sit at positions lengths[b] - S .. lengths[b] - 1; starts may differ).
    Formats: plain f16/bf16/f32 (format None or "f16"/"bf16", q's dtype), or "q8_0", "q4_0", "fp8" with
    fp16/bf16 queries, dequantized in registers. Returns out [B, S, Hq, D] in q's dtype.

    Rounding: quantized K/V values are exact in fp16 (codes times the fp16 block scale, rounded once);
    with ``launch.fp16_dot`` q is rounded to fp16 (else K/V to q's dtype); scores and P @ V accumulate in
    fp32 on the tensor cores; P is rounded to the dot dtype before P @ V (fp8: after its V row scale);
    the output is rounded once to q's dtype.

    ``validate`` reads ``lengths`` and the page table on the host (one sync) to reject lengths outside
    [S, capacity] and live pages outside the pool (``launch.checked_problem``); it is skipped while a CUDA
    graph is captured, and the kernel clamps lengths to the cache regardless.
    """
    p = checked_problem(q, k_cache, v_cache, lengths, page_table=page_table, k_scale=k_scale, v_scale=v_scale,
                        k_format=k_format, v_format=v_format, head_dims=PREFILL_HEAD_DIMS, validate=validate)
    batch, sq, _, head_dim = q.shape
    k_code, v_code = p.k_code, p.v_code
    if launch is None:
        launch = plan_prefill(head_dim, q.device)
    quantized = k_code != KernelCode.FLOAT and v_code != KernelCode.FLOAT
    fp16_dot = launch.fp16_dot and quantized
    # Measured with the decode kernel on the H100: compiled q4_0 tiles of 16 tokens come out wrong (launch.py).
    check(not (KernelCode.Q4_0 in (k_code, v_code) and q.device.type == "cuda" and launch.block_n < 32),
          f"a q4_0 cache needs block_n >= 32 on the GPU, got {launch.block_n}")
    if out is None:
        out = torch.empty_like(q)
    else:
        check(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device and out.stride(3) == 1,
              "out must match q in shape, dtype and device, with a contiguous last dimension")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    m_tiles = triton.cdiv(p.group * sq, launch.block_m)
    _prefill_attention_kernel[(m_tiles, batch * p.num_kv_heads)](
        q, p.k_arg, p.v_arg, p.k_scale_arg, p.v_scale_arg, out, lengths, p.page_table_arg,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *_scale_strides(p.k_scale_arg, k_code), *_scale_strides(p.v_scale_arg, v_code),
        p.stride_pt,
        float(scale) * LOG2E,
        p.capacity,
        sq,
        GROUP=p.group, NUM_KV_HEADS=p.num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        PAGE_SIZE=p.page_size, PAGED=page_table is not None, K_FORMAT=int(k_code), V_FORMAT=int(v_code),
        IEEE_DOT=q.dtype == torch.float32, FP16_DOT=fp16_dot,
        # the interpreter has no PTX
        ASM_DEQUANT=int(fp16_dot and launch.asm_dequant and q.device.type == "cuda"), NATIVE_FP8=p.native_fp8,
        FA2_STEP=launch.fa2_step, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
