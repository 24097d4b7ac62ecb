"""Append (and quantize) new K or V rows into a KV cache, in place.

One program owns one new token of one sequence and a block of "groups": a group is the set of values
that share one scale (32 values for q8_0/q4_0, one whole head row for fp8, a whole head row with no
scale for f16/bf16). Groups of all KV heads of the token are flattened into the tile's rows, so a
decode step with 8 KV heads of 128 values is one program per token and per tensor.

Formats (storage is planar, one tensor of codes and one of scales; see glmtg/kv_cache.py):
- f16 / bf16: a plain round-to-nearest-even cast.
- q8_0: llama.cpp's block, bit for bit as the ``gguf`` package computes it: in float32,
  d = amax / 127, id = 1/d (0 when d == 0), q = round-half-away(x * id); d is rounded to fp16 only
  for storage (the codes are computed with the float32 d, as gguf and ggml do).
- q4_0: m = the first value of largest |x| (signed), d = m / -8, q = min(15, trunc(x * id + 8.5));
  codes packed qs[j] = q[j] | q[j + 16] << 4; d stored as fp16.
- fp8: e4m3 with one float32 scale per (token, head) = amax / 448 (see KVCache for why per row).

The start positions are read from an int32 device tensor, so no host sync is needed and the append
can be captured in a CUDA graph. A token whose position is outside the cache (or whose page-table
entry is outside the page pool) is not written at all: a bad position can never corrupt memory.

NaN/Inf policy: a scale group (32-value block, or fp8 row) holding any NaN or +-Inf is stored with
scale = NaN and codes = 0 (q4_0: code 8, i.e. zero), so the whole group dequantizes to NaN and
nothing leaks into neighbouring groups, heads or tokens. (gguf produces the same NaN dequantization
for such blocks, but its codes there are undefined.) f16/bf16 store NaN/Inf element-wise as is.

Bit-exactness needs care on the GPU: ``/`` on float32 lowers to an approximate division, so the
divisions use ``div_rn``; and the launch turns off fp fusion so ``x * id + 8.5`` is not contracted
into an FMA (gguf rounds the product first). The Triton interpreter (CPU tests) truncates
float32 -> bf16 casts and does not round fp8 casts to nearest-even, so both roundings are done
explicitly in the kernel (bf16 on the bits, fp8 onto the e4m3 grid) and the casts that follow are
exact: CPU and GPU run the same code and give the same bytes, with no torch fallback. Blocks so
tiny that 1/d overflows float32 (amax below ~4e-37 for q8_0, ~2e-38 for q4_0; gguf's codes are
undefined there) get clamped codes and an fp16 d of 0; every other finite block matches gguf.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

KV_FORMATS = ("f16", "bf16", "q8_0", "q4_0", "fp8")
# Constexpr codes of the formats in the kernel.
_FLOAT, _Q8_0, _Q4_0, _FP8 = 0, 1, 2, 3
_FORMAT_CODE = {"f16": _FLOAT, "bf16": _FLOAT, "q8_0": _Q8_0, "q4_0": _Q4_0, "fp8": _FP8}
QK = 32  # values per q8_0 / q4_0 block
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def storage_shape(fmt: str, pages: int, num_kv_heads: int, tokens: int, head_dim: int
                  ) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...] | None, torch.dtype | None]:
    """(data shape, data dtype, scale shape or None, scale dtype or None) of one K or V store."""
    lead = (pages, num_kv_heads, tokens)
    if fmt == "f16":
        return (*lead, head_dim), torch.float16, None, None
    if fmt == "bf16":
        return (*lead, head_dim), torch.bfloat16, None, None
    if fmt == "q8_0":
        return (*lead, head_dim), torch.int8, (*lead, head_dim // QK), torch.float16
    if fmt == "q4_0":
        return (*lead, head_dim // 2), torch.uint8, (*lead, head_dim // QK), torch.float16
    if fmt == "fp8":
        return (*lead, head_dim), torch.float8_e4m3fn, lead, torch.float32
    raise ValueError(f"format must be one of {KV_FORMATS}, got {fmt!r}")


@triton.jit
def _bf16_bits(x):
    """float32 -> the bits of the nearest bfloat16 (ties to even; NaN stays a quiet NaN), as uint16.

    Stored as raw bits because the Triton interpreter truncates float32 -> bfloat16 casts (and
    flushes subnormals) instead of rounding them; on the GPU this is a handful of integer ops.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(x == x, rounded, quiet_nan).to(tl.uint16)


@triton.jit
def _round_to_e4m3(y):
    """float32 in [-448, 448] -> the nearest float8_e4m3fn value (ties to even), still as float32.

    Adding then subtracting c = 1.5 * 2^(k + 23) rounds y to a multiple of 2^k, the e4m3 step at
    y's exponent (3 mantissa bits; below 2^-6 the fixed subnormal step 2^-9). The cast that follows
    is then exact, on the GPU and in the Triton interpreter, whose own fp8 cast does not round to
    nearest-even.
    """
    bits = y.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    k = tl.maximum(exponent, -6) - 3
    c = (((k + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (tl.abs(y) + c) - c
    # Rounding the magnitude and putting the sign back keeps -0.0 (and tiny negatives) negative.
    return (r.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _kv_store_kernel(
    X, Data, Scale, Start, PageTable,
    stride_xb, stride_xs, stride_xh,
    stride_dp, stride_dh, stride_dt,
    stride_sp, stride_sh, stride_st,
    stride_pt_b,
    seq_len, capacity, num_pages, num_rows,
    GROUPS_PER_HEAD: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, FORMAT: tl.constexpr,
):
    token = tl.program_id(0)
    b = token // seq_len
    s = token % seq_len
    pos = tl.load(Start + b) + s
    ok = (pos >= 0) & (pos < capacity)
    if PAGED:
        page = tl.load(PageTable + b.to(tl.int64) * stride_pt_b + pos // PAGE_SIZE, mask=ok, other=-1)
        ok = ok & (page >= 0) & (page < num_pages)
        slot = pos % PAGE_SIZE
    else:
        page = b
        slot = pos

    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < num_rows) & ok
    head = rows // GROUPS_PER_HEAD
    group = rows % GROUPS_PER_HEAD
    cols = tl.arange(0, BLOCK_C)
    x_row = (b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs + head.to(tl.int64) * stride_xh
             + group * GROUP_SIZE)
    out_row = page.to(tl.int64) * stride_dp + head.to(tl.int64) * stride_dh + slot.to(tl.int64) * stride_dt
    scale_off = page.to(tl.int64) * stride_sp + head.to(tl.int64) * stride_sh + slot.to(tl.int64) * stride_st

    if FORMAT == 0:  # f16 / bf16: round-to-nearest-even cast
        mask = row_ok[:, None] & (cols[None, :] < GROUP_SIZE)
        x = tl.load(X + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if Data.dtype.element_ty == tl.bfloat16:
            tl.store(Data.to(tl.pointer_type(tl.uint16)) + out_row[:, None] + cols[None, :], _bf16_bits(x),
                     mask=mask)
        else:
            tl.store(Data + out_row[:, None] + cols[None, :], x.to(Data.dtype.element_ty), mask=mask)
    elif FORMAT == 1:  # q8_0
        x = tl.load(X + x_row[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        finite = tl.abs(x) < float("inf")  # False for NaN too
        bad = tl.max(tl.where(finite, 0, 1), 1) > 0
        x = tl.where(finite, x, 0.0)
        d = tl.math.div_rn(tl.max(tl.abs(x), 1), 127.0)
        inv = tl.where(d == 0.0, 0.0, tl.math.div_rn(1.0, tl.where(d == 0.0, 1.0, d)))
        p = x * inv[:, None]
        # Round half away from zero exactly like gguf's np_roundf: floor(x + 0.5) would round
        # 0.49999997 up, because the addition itself rounds.
        a = tl.abs(p)
        r = tl.floor(a)
        r = r + tl.where(a - r >= 0.5, 1.0, 0.0)
        # Only blocks with amax below ~4e-37 (where 1/d overflows, and gguf's result is undefined)
        # reach past +-127 or NaN: keep those codes defined.
        r = tl.where(r == r, tl.minimum(r, 127.0), 0.0)
        q = tl.where(p < 0.0, -r, r)
        q = tl.where(bad[:, None], 0.0, q)
        d = tl.where(bad, float("nan"), d)
        tl.store(Data + out_row[:, None] + group[:, None] * GROUP_SIZE + cols[None, :], q.to(tl.int8),
                 mask=row_ok[:, None])
        tl.store(Scale + scale_off + group, d.to(tl.float16), mask=row_ok)
    elif FORMAT == 2:  # q4_0: the block's halves are loaded apart, as they share bytes
        lo = tl.load(X + x_row[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        hi = tl.load(X + x_row[:, None] + 16 + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        fin_lo = tl.abs(lo) < float("inf")
        fin_hi = tl.abs(hi) < float("inf")
        bad = (tl.max(tl.where(fin_lo, 0, 1), 1) + tl.max(tl.where(fin_hi, 0, 1), 1)) > 0
        lo = tl.where(fin_lo, lo, 0.0)
        hi = tl.where(fin_hi, hi, 0.0)
        amax = tl.maximum(tl.max(tl.abs(lo), 1), tl.max(tl.abs(hi), 1))
        # gguf takes the *first* value of largest |x| (argmax); its sign matters, down to -0.0, so
        # it is picked by its bits, not by a float sum that would turn -0.0 into +0.0.
        first = tl.minimum(tl.min(tl.where(tl.abs(lo) == amax[:, None], cols[None, :], 32), 1),
                           tl.min(tl.where(tl.abs(hi) == amax[:, None], cols[None, :] + 16, 32), 1))
        m_bits = (tl.sum(tl.where(cols[None, :] == first[:, None], lo.to(tl.int32, bitcast=True), 0), 1)
                  + tl.sum(tl.where(cols[None, :] + 16 == first[:, None], hi.to(tl.int32, bitcast=True), 0), 1))
        d = m_bits.to(tl.float32, bitcast=True) * -0.125  # == m / -8 exactly (power of two)
        inv = tl.where(d == 0.0, 0.0, tl.math.div_rn(1.0, tl.where(d == 0.0, 1.0, d)))
        t_lo = lo * inv[:, None] + 8.5  # two roundings: the launch disables FMA contraction
        t_hi = hi * inv[:, None] + 8.5
        # t >= 0 for every finite block, so floor == trunc; NaN (1/d overflowed) -> 8, i.e. zero.
        q_lo = tl.where(t_lo == t_lo, tl.minimum(tl.maximum(tl.floor(t_lo), 0.0), 15.0), 8.0)
        q_hi = tl.where(t_hi == t_hi, tl.minimum(tl.maximum(tl.floor(t_hi), 0.0), 15.0), 8.0)
        q_lo = tl.where(bad[:, None], 8.0, q_lo).to(tl.uint8)
        q_hi = tl.where(bad[:, None], 8.0, q_hi).to(tl.uint8)
        d = tl.where(bad, float("nan"), d)
        packed = q_lo | (q_hi << 4)
        tl.store(Data + out_row[:, None] + group[:, None] * 16 + cols[None, :], packed, mask=row_ok[:, None])
        tl.store(Scale + scale_off + group, d.to(tl.float16), mask=row_ok)
    else:  # fp8 e4m3, one float32 scale per (token, head)
        mask = row_ok[:, None] & (cols[None, :] < GROUP_SIZE)
        x = tl.load(X + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        finite = tl.abs(x) < float("inf")
        bad = tl.max(tl.where(finite, 0, 1), 1) > 0  # masked columns load 0, which is finite
        x = tl.where(finite, x, 0.0)
        scale = tl.math.div_rn(tl.max(tl.abs(x), 1), 448.0)  # 448 = FP8_MAX, e4m3fn's largest
        safe = tl.where(scale == 0.0, 1.0, scale)
        # x / scale can land a rounding step above 448, which e4m3fn would turn into NaN: clamp.
        y = tl.where(scale[:, None] == 0.0, 0.0, tl.math.div_rn(x, safe[:, None]))
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        y = tl.where(bad[:, None], 0.0, _round_to_e4m3(y))
        scale = tl.where(bad, float("nan"), scale)
        tl.store(Data + out_row[:, None] + cols[None, :], y.to(Data.dtype.element_ty), mask=mask)
        tl.store(Scale + scale_off, scale, mask=row_ok)


def _store_float_rows_cpu(x: torch.Tensor, data: torch.Tensor, start: torch.Tensor,
                          page_table: torch.Tensor | None, page_size: int, capacity: int) -> None:
    """f16/bf16 rows on the CPU: a plain cast-and-scatter (the kernel's float branch does the same
    round-to-nearest-even cast; running it in the Triton interpreter costs ~50 ms a call). Tokens whose
    position or page is out of range are skipped, as the kernel skips them."""
    batch, seq = x.shape[:2]
    pos = start.long()[:, None] + torch.arange(seq)[None, :]  # [B, S]
    ok = (pos >= 0) & (pos < capacity)
    b_idx = torch.arange(batch)[:, None].expand(batch, seq)
    if page_table is None:
        rows, slots = b_idx, pos
    else:
        page_idx = (pos // page_size).clamp(0, page_table.shape[1] - 1)
        rows = page_table.long().gather(1, page_idx)
        ok &= (rows >= 0) & (rows < data.shape[0])
        slots = pos % page_size
    data[rows[ok], :, slots[ok]] = x[ok].to(data.dtype)  # [tokens, Hkv, D]


def _check(cond: bool, message: Callable[[], str]) -> None:
    # The message is built only on failure: formatting shapes on every call would cost
    # microseconds per launch in eager mode.
    if not cond:
        raise ValueError(message())


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def kv_store(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor | None,
    start: torch.Tensor,
    fmt: str,
    *,
    page_table: torch.Tensor | None = None,
    capacity: int | None = None,
    validate: bool = True,
    name: str = "x",
) -> None:
    """Quantize ``x`` [B, S, Hkv, D] into a cache store in place.

    Token s of sequence b goes to position ``start[b] + s``. ``data``/``scale`` are one layer's K or
    V store as laid out by :func:`storage_shape`: [B, Hkv, T, ...] (contiguous, T = capacity) or
    [num_pages, Hkv, page_size, ...] with ``page_table`` int32 [B, max_pages]. ``capacity`` (default:
    T, or max_pages * page_size) bounds the positions. ``validate`` reads ``start`` (and the page
    table) on the host to reject positions outside the cache; it is skipped while a CUDA graph is
    being captured (the kernel then silently skips out-of-range tokens instead). ``name`` names
    ``x`` in error messages.
    """
    _check(fmt in KV_FORMATS, lambda: f"fmt must be one of {KV_FORMATS}, got {fmt!r}")
    _check(isinstance(x, torch.Tensor) and x.dim() == 4,
           lambda: f"{name} must be a 4-D tensor [B, S, Hkv, D], got {_describe(x)}")
    _check(x.dtype in _INPUT_DTYPES, lambda: f"{name} dtype {x.dtype} is not a float dtype in {_INPUT_DTYPES}")
    batch, seq, heads, head_dim = x.shape
    _check(min(x.shape) >= 1, lambda: f"{name} has an empty dimension: {tuple(x.shape)}")
    _check(isinstance(data, torch.Tensor) and data.dim() == 4,
           lambda: f"data must be a 4-D cache store, got {_describe(data)}")
    pages, _, tokens, _ = data.shape
    want_data, data_dtype, want_scale, scale_dtype = storage_shape(fmt, pages, heads, tokens, head_dim)
    if fmt in ("q8_0", "q4_0"):
        _check(head_dim % QK == 0, lambda: f"head_dim {head_dim} of {name} must be a multiple of {QK} for {fmt}")
    _check(tuple(data.shape) == want_data and data.dtype == data_dtype,
           lambda: f"data must be {data_dtype} {want_data} for {fmt} and {name} {tuple(x.shape)}, "
                   f"got {_describe(data)}")
    _check(data.stride(3) == 1, lambda: f"data must have a contiguous last dimension, strides {data.stride()}")
    if want_scale is None:
        _check(scale is None, lambda: f"scale must be None for {fmt}")
        scale_arg, scale_strides = data, (0, 0, 0)  # never read
    else:
        _check(isinstance(scale, torch.Tensor) and tuple(scale.shape) == want_scale and scale.dtype == scale_dtype,
               lambda: f"scale must be {scale_dtype} {want_scale} for {fmt}, got {_describe(scale)}")
        _check(scale.device == x.device, lambda: f"scale is on {scale.device} but {name} is on {x.device}")
        _check(fmt == "fp8" or scale.stride(3) == 1, lambda: "scale must have a contiguous last dimension")
        scale_arg, scale_strides = scale, (scale.stride(0), scale.stride(1), scale.stride(2))
    _check(data.device == x.device, lambda: f"data is on {data.device} but {name} is on {x.device}")
    _check(isinstance(start, torch.Tensor) and start.dtype == torch.int32 and tuple(start.shape) == (batch,),
           lambda: f"start must be int32 of shape ({batch},), got {_describe(start)}")
    _check(start.device == x.device, lambda: f"start is on {start.device} but {name} is on {x.device}")

    if page_table is None:
        _check(pages == batch, lambda: f"contiguous data batch {pages} != {name} batch {batch}")
        page_size, limit = 1, tokens
        page_table_arg, stride_pt = start, 0  # never read when PAGED is off
    else:
        _check(isinstance(page_table, torch.Tensor) and page_table.dtype == torch.int32 and page_table.dim() == 2
               and page_table.shape[0] == batch,
               lambda: f"page_table must be int32 [B={batch}, max_pages], got {_describe(page_table)}")
        _check(page_table.device == x.device,
               lambda: f"page_table is on {page_table.device} but {name} is on {x.device}")
        _check(page_table.stride(1) == 1, lambda: "page_table must have a contiguous last dimension")
        page_size, limit = tokens, page_table.shape[1] * tokens
        page_table_arg, stride_pt = page_table, page_table.stride(0)
    if capacity is None:
        capacity = limit
    _check(isinstance(capacity, int) and 1 <= capacity <= limit,
           lambda: f"capacity must be an int in [1, {limit}], got {capacity!r}")

    if validate and not _capturing(x.device):
        st = start.cpu()
        _check(bool((st >= 0).all()), lambda: f"start positions must be >= 0, got min {int(st.min())}")
        _check(bool((st + seq <= capacity).all()),
               lambda: f"start + S exceeds the cache capacity {capacity}: max start {int(st.max())} with S={seq}")
        if page_table is not None:
            first_page = st // page_size
            last_page = (st + seq - 1) // page_size
            j = torch.arange(page_table.shape[1])[None, :]
            used = (j >= first_page[:, None]) & (j <= last_page[:, None])
            pt = page_table.cpu()
            _check(not bool((used & ((pt < 0) | (pt >= pages))).any()),
                   lambda: f"page_table holds page indices outside [0, {pages}) for the positions written")

    if x.dtype == torch.float64:
        x = x.float()  # quantization is defined on float32 values, as in gguf
    if x.stride(3) != 1:
        x = x.contiguous()

    code = _FORMAT_CODE[fmt]
    if code == _FLOAT and x.device.type == "cpu":
        _store_float_rows_cpu(x, data, start, page_table, page_size, capacity)
        return
    if code in (_Q8_0, _Q4_0):
        groups, group_size = head_dim // QK, QK
        block_c = QK if code == _Q8_0 else QK // 2
    else:
        groups, group_size = 1, head_dim
        block_c = triton.next_power_of_2(head_dim)
    num_rows = heads * groups
    tile_cols = QK if code == _Q4_0 else block_c
    block_r = max(1, min(triton.next_power_of_2(num_rows), 4096 // tile_cols))
    grid = (batch * seq, triton.cdiv(num_rows, block_r))
    _kv_store_kernel[grid](
        x, data, scale_arg, start, page_table_arg,
        x.stride(0), x.stride(1), x.stride(2),
        data.stride(0), data.stride(1), data.stride(2),
        *scale_strides,
        stride_pt,
        seq, capacity, pages, num_rows,
        GROUPS_PER_HEAD=groups, GROUP_SIZE=group_size,
        BLOCK_R=block_r, BLOCK_C=block_c,
        PAGE_SIZE=page_size, PAGED=page_table is not None, FORMAT=code,
        num_warps=4,
        # gguf rounds x * id before adding 8.5 (q4_0); an FMA would round once and differ.
        enable_fp_fusion=False,
    )
