"""Launch planning for decode attention: tile shapes and split counts from shapes alone.

Every choice depends on shapes and on the context length the caller *declares* (``max_context``),
never on the values in ``lengths``, so a planned step can be captured in a CUDA graph and replayed as
lengths grow. The measured numbers behind the choices live in one table per GPU architecture
(``ARCH_PLANS``, keyed by compute capability); bench/DECISIONS.md says where each came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import triton

from glmtg.formats import FORMATS, KV_FORMATS
from glmtg.kernels._checks import check, device_index
from glmtg.kernels.attention import cuda_loop as loop

INTERPRETER_SMS = 8  # "SMs" planned for on a CPU: keeps the split machinery exercised with a few slices


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile shape and split count of one launch (all derived from shapes, never from lengths)."""

    block_m: int
    m_tiles: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int
    pdl: bool = False  # programmatic dependent launch of the merge kernel (Hopper+, CUDA only)
    # Quantized K and V: dot products in fp16 rather than q's dtype (fp8 -> fp16 converts cheaply,
    # fp8 -> bf16 does not). Queries are rounded to fp16, which assumes |q| < 65504 (true of normed,
    # rotated GLM queries); codes * scales gain mantissa bits.
    fp16_dot: bool = True
    # q8_0/q4_0 codes -> fp16 by bit tricks in inline PTX (CUDA only, with fp16 dots); see kernel._q8_0_to_f16.
    asm_dequant: bool = True
    # The CUDA loop for quantized K and V (cuda_loop.py): one warp per slice, 16-token steps.
    cuda_loop: bool = False


@dataclass(frozen=True)
class OneWarpPlan:
    """One-warp programs for a block format: no cross-warp reductions or barriers in the loop, and
    independent warps hide each other's dequantization latency."""

    block_n: int  # tokens per tile
    per_sm: int  # programs per SM (their ~230-245 registers a thread allow no more than eight)
    min_programs_per_sm: int  # taken only where the context gives at least this many programs per SM


@dataclass(frozen=True)
class ArchPlan:
    """The measured thresholds and tiles of one GPU architecture (see plan_launch for their use), and
    the architecture's per-SM resources (NVIDIA's CUDA C++ Programming Guide, compute capability table).
    The SM count is not here: it differs between GPUs of one architecture (A100 108, A30 56; RTX 4090
    128, L40S 142) and is read from the device at run time (Target.sms)."""

    # Per-SM resources: 32-bit registers, shared memory (KiB) per SM and the most one block may take
    # (opt-in), resident warps. The tiles below must fit them (tests/kernels/test_compile_archs.py).
    registers_per_sm: int = 65536
    shared_kib_per_sm: int = 228
    shared_kib_per_block: int = 227
    max_warps_per_sm: int = 64

    # Plain (f16/bf16) plan: programs per SM, two where there are at least ``wide_work`` (sequence,
    # KV head, row tile) triples to share out, one otherwise (fewer slices, fewer partials to merge).
    ctas_per_sm: int = 2
    ctas_per_sm_narrow: int = 1
    wide_work: int = 8
    # Shortest slice of the declared context: each slice costs a partial write and a merge read.
    min_split_tokens_one_wave: int = 128  # while the whole launch fits one program per SM
    min_split_tokens: int = 256
    long_slice_tokens: int = 3072  # slices at least this long take longer tiles and fewer stages
    block_n: dict[int, tuple[int, int]] = field(  # head_dim -> tokens per tile (short, long slices)
        default_factory=lambda: {64: (128, 128), 128: (64, 128), 256: (32, 32)})
    num_stages: tuple[int, int] = (3, 2)  # (short slices, long slices or head_dim > 128)
    wide_block_m: int = 64  # tiles of more query rows than this take 8 warps, others 4
    # Head dim the quantized plans were measured at (GLM's); others keep the plain plan.
    quant_head_dim: int = 128
    # Quantized caches with long slices (>= deep_min_slice tokens in the plain plan): 128-token tiles,
    # more programs per SM (fp8 two where the work is wide), 3 stages.
    deep_min_slice: int = 256
    deep_block_n: int = 128
    deep_ctas_per_sm: int = 4
    deep_fp8_ctas_per_sm_wide: int = 2
    deep_num_stages: int = 3
    # One-warp programs of the block formats, where the context gives enough of them.
    one_warp: dict[str, OneWarpPlan] = field(default_factory=lambda: {
        "q8_0": OneWarpPlan(block_n=16, per_sm=8, min_programs_per_sm=1),
        "q4_0": OneWarpPlan(block_n=32, per_sm=8, min_programs_per_sm=4)})
    one_warp_min_slice: int = 256
    one_warp_num_stages: int = 3
    # q8_0 groups of 17-32 query rows (48/2: 24) in two 16-row tiles, so that one-warp programs run them,
    # from this many (sequence, KV head, token) triples of declared context.
    split_rows_formats: tuple[str, ...] = ("q8_0",)
    split_rows_block_m: int = 16
    split_rows_max: int = 32
    split_rows_min_tokens: int = 65536
    # The CUDA loop (where usable): for these formats, up to this many 16-row tiles, from this declared
    # context and this many tokens over all (sequence, KV head, row tile) triples.
    cuda_loop_formats: tuple[str, ...] = ("q4_0",)
    cuda_loop_max_row_tiles: int = 2
    cuda_loop_min_context: int = 8192
    cuda_loop_min_tokens: int = 131072
    cuda_warps_per_sm: int = 8  # one-warp slices per SM (its ~230 registers a thread allow eight)
    cuda_min_tokens_per_split: int = 64


SM90 = ArchPlan()  # measured on the H100 (132 SMs)
# Ampere and Ada, not measured: the H100's thresholds, with each architecture's resources, and no CUDA
# loop (its fatbin is sm_90 machine code). Their tiles fit: the largest program the plan makes (bf16,
# 128-token tiles in 2 stages) takes 40 KiB of shared memory, two per SM within sm_86/sm_89's 100 KiB
# (tests/kernels/test_compile_archs.py compiles the plans and checks the per-block limit).
SM80 = replace(SM90, shared_kib_per_sm=164, shared_kib_per_block=163, cuda_loop_formats=())  # A100: 108 SMs
SM86 = replace(SM90, shared_kib_per_sm=100, shared_kib_per_block=99, max_warps_per_sm=48,  # RTX 3090: 82
               cuda_loop_formats=())
SM89 = replace(SM86)  # RTX 4090: 128 SMs, L40S: 142 (Target.sms); same per-SM resources as sm_86
# Other GPUs have not been measured: they run the H100's plan (the CUDA loop only on 9.x, see plan_for).
DEFAULT_PLAN = SM90
ARCH_PLANS: dict[tuple[int, int], ArchPlan] = {(8, 0): SM80, (8, 6): SM86, (8, 9): SM89, (9, 0): SM90}


@dataclass(frozen=True)
class Target:
    """What the planner needs to know of a device: SM count and compute capability (None: a CPU)."""

    sms: int
    capability: tuple[int, int] | None = None

    @property
    def plan(self) -> ArchPlan:
        return ARCH_PLANS.get(self.capability, DEFAULT_PLAN)

    @property
    def pdl(self) -> bool:
        """Programmatic dependent launch: Hopper and later."""
        return self.capability is not None and self.capability[0] >= 9

    @property
    def native_fp8(self) -> bool:
        """Whether the GPU converts float8_e4m3fn itself (sm_89 and later; the interpreter does too)."""
        return self.capability is None or self.capability >= (8, 9)

    @property
    def cuda_loop(self) -> bool:
        """Whether the CUDA loop's machine code (sm_90) can run here (None: planning for the CPU)."""
        return self.capability is None or self.capability[0] == 9


_TARGETS: dict[int, Target] = {}


def target_of(device: torch.device) -> Target:
    """The planning target of ``device`` (read once per CUDA device)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return Target(INTERPRETER_SMS)
    index = device_index(device)
    if index not in _TARGETS:
        props = torch.cuda.get_device_properties(index)
        _TARGETS[index] = Target(props.multi_processor_count, (props.major, props.minor))
    return _TARGETS[index]


def plan_format(k_format: str | None, v_format: str | None) -> str | None:
    """The ``cache_format`` to plan a launch for: the costlier to dequantize of K's and V's formats."""
    return next((f for f in ("q4_0", "q8_0", "fp8") if f in (k_format, v_format)), None)


def plan_launch(
    batch: int, num_kv_heads: int, rows: int, head_dim: int, max_context: int, device: torch.device,
    *, num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, ctas_per_sm: int | None = None, min_tokens_per_split: int | None = None,
    pdl: bool | None = None, cache_format: str | None = None, cuda_loop: bool = False,
    block_m: int | None = None,
) -> DecodeLaunch:
    """Choose tile sizes and the split count from shapes and the declared context, for ``device``.

    ``rows`` = GQA group x new tokens per sequence. The keyword overrides fix one choice each (benchmarks
    sweep them); any of the first six turns off the format-specific plans below.

    Plain caches: the programs of one launch fill the GPU in a single wave, ``ctas_per_sm`` per SM,
    rounded *down* so that no second, mostly idle wave starts; slices never get shorter than
    ``min_tokens_per_split`` tokens of the declared context (the table's two minimums).

    ``cache_format`` names the quantized format of the cache (``plan_format``), whose loops are bound by
    dequantization latency rather than by memory: q8_0/q4_0 at the measured head dim run one-warp
    programs where the context gives enough of them; otherwise quantized caches with long slices take
    longer tiles and more programs per SM, and short ones the plain plan.

    ``cuda_loop`` says that the CUDA loop can run these arguments (cuda_loop.usable); it is planned for
    the formats and sizes where it was measured faster than the Triton kernel.
    """
    return plan_for(target_of(device), batch, num_kv_heads, rows, head_dim, max_context,
                    num_splits=num_splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                    ctas_per_sm=ctas_per_sm, min_tokens_per_split=min_tokens_per_split, pdl=pdl,
                    cache_format=cache_format, cuda_loop=cuda_loop, block_m=block_m)


def plan_for(
    target: Target, batch: int, num_kv_heads: int, rows: int, head_dim: int, max_context: int,
    *, num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, ctas_per_sm: int | None = None, min_tokens_per_split: int | None = None,
    pdl: bool | None = None, cache_format: str | None = None, cuda_loop: bool = False,
    block_m: int | None = None,
) -> DecodeLaunch:
    """:func:`plan_launch` for a :class:`Target` rather than a device (no device needed)."""
    check(cache_format is None or cache_format in KV_FORMATS,
          lambda: f"cache_format must be None or one of {KV_FORMATS}, got {cache_format!r}")
    m_cap = 128 if head_dim <= 128 else 64  # the largest tile of query rows the kernel compiles
    check(block_m is None or (block_m >= 16 and block_m & (block_m - 1) == 0 and block_m <= m_cap),
          lambda: f"block_m must be a power of two in [16, {m_cap}], got {block_m!r}")
    arch, sms = target.plan, target.sms
    tuned = (num_splits, block_n, num_warps, num_stages, ctas_per_sm, min_tokens_per_split) != (None,) * 6
    at_quant_dim = head_dim == arch.quant_head_dim
    if (block_m is None and cache_format in arch.split_rows_formats and at_quant_dim
            and arch.split_rows_block_m < rows <= arch.split_rows_max and not tuned
            and batch * num_kv_heads * max_context >= arch.split_rows_min_tokens):
        block_m = arch.split_rows_block_m
    if block_m is None:
        block_m = max(16, triton.next_power_of_2(min(rows, m_cap)))
    m_tiles = triton.cdiv(rows, block_m)
    work = batch * num_kv_heads * m_tiles
    if pdl is None:
        pdl = target.pdl
    loop_work = batch * num_kv_heads * triton.cdiv(rows, loop.ROWS)  # the loop's warps per slice
    if (cuda_loop and target.cuda_loop and cache_format in arch.cuda_loop_formats and head_dim == loop.HEAD_DIM
            and rows <= arch.cuda_loop_max_row_tiles * loop.ROWS and not tuned
            and max_context >= arch.cuda_loop_min_context and loop_work * max_context >= arch.cuda_loop_min_tokens):
        return cuda_loop_launch_for(target, batch, num_kv_heads, max_context, rows=rows, pdl=pdl)
    one_warp = arch.one_warp.get(cache_format) if cache_format is not None else None
    if one_warp is not None and at_quant_dim and block_m <= 16 and not tuned:
        splits = max(1, min(one_warp.per_sm * sms // work, triton.cdiv(max_context, arch.one_warp_min_slice)))
        if splits * work >= one_warp.min_programs_per_sm * sms:
            return DecodeLaunch(block_m, m_tiles, one_warp.block_n, splits, 1, arch.one_warp_num_stages, pdl)
    plain_ctas = arch.ctas_per_sm if work >= arch.wide_work else arch.ctas_per_sm_narrow
    quantized = cache_format is not None and FORMATS[cache_format].scaled
    deep = (quantized and at_quant_dim and num_splits is None and ctas_per_sm is None
            and max_context // _splits(arch, work, plain_ctas, sms, max_context, None) >= arch.deep_min_slice)
    if num_splits is None:
        if ctas_per_sm is None:
            ctas_per_sm = plain_ctas
            if deep:
                wide_fp8 = cache_format == "fp8" and work >= arch.wide_work
                ctas_per_sm = arch.deep_fp8_ctas_per_sm_wide if wide_fp8 else arch.deep_ctas_per_sm
        num_splits = _splits(arch, work, ctas_per_sm, sms, max_context, min_tokens_per_split)
    long_slices = max_context // num_splits >= arch.long_slice_tokens
    if block_n is None:
        block_n = arch.deep_block_n if deep else arch.block_n[head_dim][long_slices]
    if num_warps is None:
        num_warps = 4 if block_m <= arch.wide_block_m else 8
    if num_stages is None:
        if deep:
            num_stages = arch.deep_num_stages
        else:
            num_stages = arch.num_stages[long_slices or head_dim > 128]
    return DecodeLaunch(block_m, m_tiles, block_n, num_splits, num_warps, num_stages, pdl)


def cuda_loop_launch(batch: int, num_kv_heads: int, max_context: int, device: torch.device, *,
                     rows: int = loop.ROWS, warps_per_sm: int | None = None,
                     min_tokens_per_split: int | None = None, pdl: bool | None = None) -> DecodeLaunch:
    """A launch of the CUDA loop (cuda_loop.py), whatever the format: ``warps_per_sm`` one-warp slices
    per SM, each of at least ``min_tokens_per_split`` tokens (defaults: the architecture's table);
    ``rows`` query rows per KV head (GQA group x new tokens) take ceil(rows / 16) warps per slice.
    plan_launch picks it where it was measured faster; benchmarks and tests call it for every format."""
    return cuda_loop_launch_for(target_of(device), batch, num_kv_heads, max_context, rows=rows,
                                warps_per_sm=warps_per_sm, min_tokens_per_split=min_tokens_per_split, pdl=pdl)


def cuda_loop_launch_for(target: Target, batch: int, num_kv_heads: int, max_context: int, *,
                         rows: int = loop.ROWS, warps_per_sm: int | None = None,
                         min_tokens_per_split: int | None = None, pdl: bool | None = None) -> DecodeLaunch:
    """:func:`cuda_loop_launch` for a :class:`Target` rather than a device."""
    if warps_per_sm is None:
        warps_per_sm = target.plan.cuda_warps_per_sm
    if min_tokens_per_split is None:
        min_tokens_per_split = target.plan.cuda_min_tokens_per_split
    check(min(batch, num_kv_heads, max_context, rows, warps_per_sm, min_tokens_per_split) >= 1,
          lambda: f"cuda_loop_launch needs positive sizes, got batch={batch}, num_kv_heads={num_kv_heads}, "
                  f"max_context={max_context}, rows={rows}, warps_per_sm={warps_per_sm}, "
                  f"min_tokens_per_split={min_tokens_per_split}")
    m_tiles = triton.cdiv(rows, loop.ROWS)
    work = batch * num_kv_heads * m_tiles
    splits = max(1, min(warps_per_sm * target.sms // work, triton.cdiv(max_context, min_tokens_per_split)))
    return DecodeLaunch(loop.ROWS, m_tiles, loop.TILE, splits, 1, 1,
                        target.pdl if pdl is None else pdl, cuda_loop=True)


def _splits(arch: ArchPlan, work: int, ctas_per_sm: int, sms: int, max_context: int,
            min_tokens_per_split: int | None) -> int:
    num_splits = max(1, (ctas_per_sm * sms) // work)
    if min_tokens_per_split is None:
        one_wave = num_splits * work <= sms
        min_tokens_per_split = arch.min_split_tokens_one_wave if one_wave else arch.min_split_tokens
    return max(1, min(num_splits, triton.cdiv(max_context, min_tokens_per_split)))
