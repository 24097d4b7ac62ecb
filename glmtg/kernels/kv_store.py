"""Append (and quantize) new K or V rows into a KV cache, in place.

One program owns one new token of one sequence and a block of "groups": a group is the set of values
that share one scale (32 values for q8_0/q4_0, one whole head row for fp8, a whole head row with no
scale for f16/bf16). Groups of all KV heads of the token are flattened into the tile's rows, so a
decode step with 8 KV heads of 128 values is one program per token and per tensor.

Formats and their arithmetic are glmtg.formats' (storage is planar, one tensor of codes and one of
scales, see glmtg/kv_cache.py); the kernel computes the same bytes as ``BlockFormat.quantize``, NaN/Inf
policy included (glmtg/formats/quant.py): a scale group holding any NaN or +-Inf is stored with scale NaN
and zero codes; f16/bf16 store NaN/Inf element-wise as is.

The start positions are read from an int32 device tensor, so no host sync is needed and the append
can be captured in a CUDA graph. A token whose position is outside the cache (or whose page-table
entry is outside the page pool) is not written at all: a bad position can never corrupt memory.

Bit-exactness needs care on the GPU: ``/`` on float32 lowers to an approximate division, so the
divisions use ``div_rn``; and the launch turns off fp fusion so ``x * id + 8.5`` is not contracted
into an FMA (gguf rounds the product first). The Triton interpreter (CPU tests) truncates
float32 -> bf16 casts and does not round fp8 casts to nearest-even, so both roundings are done
explicitly in the kernel (bf16 on the bits, fp8 onto the e4m3 grid) and the casts that follow are
exact: the kernel gives the same bytes on the GPU and in the interpreter.

On a CPU, ``kv_store`` runs the formats' torch quantization instead (the interpreter is 20-400x slower
than a cast); ``backend="triton"`` runs the kernel there too, so the interpreter can check it against the
torch path. Both give the same bytes, except the payload of NaNs in f16 stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glmtg.formats import FORMATS, KV_FORMATS, QK, BlockFormat, KernelCode
from glmtg.kernels._checks import capturing, check, describe
from glmtg.kernels.pdl import enabled, launch_kwargs, wait_and_release

__all__ = ["STORE_BACKENDS", "kv_store"]

STORE_BACKENDS = ("auto", "triton")

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernel's format codes, as constexprs its body can read.
_FLOAT = tl.constexpr(int(KernelCode.FLOAT))
_Q8_0 = tl.constexpr(int(KernelCode.Q8_0))
_Q4_0 = tl.constexpr(int(KernelCode.Q4_0))


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
def _e4m3_bits(y):
    """float32 values on the e4m3 grid (_round_to_e4m3, |y| <= 448) -> their float8_e4m3fn bytes.

    GPUs before sm_89 have no fp8 conversion (Triton refuses fp8e4nv there), so the byte is built from
    the float32 bits: normals re-bias the exponent (127 -> 7) and keep the top 3 mantissa bits;
    subnormals (|y| < 2^-6) are m * 2^-9 with m = |y| * 512 exact. Both are exact on the grid.
    """
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    exponent = ((bits >> 23) & 0xFF).to(tl.int32)
    normal = ((exponent - 120) << 3) | ((bits >> 20) & 0x7).to(tl.int32)
    sub = (tl.abs(y) * 512.0).to(tl.int32)
    return (sign.to(tl.int32) | tl.where(exponent >= 121, normal, sub)).to(tl.uint8)


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
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, FORMAT: tl.constexpr, NATIVE_FP8: tl.constexpr = True,
    PDL: tl.constexpr = False,
):
    token = tl.program_id(0)
    wait_and_release(PDL)
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

    if FORMAT == _FLOAT:  # f16 / bf16: round-to-nearest-even cast
        mask = row_ok[:, None] & (cols[None, :] < GROUP_SIZE)
        x = tl.load(X + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if Data.dtype.element_ty == tl.bfloat16:
            tl.store(Data.to(tl.pointer_type(tl.uint16)) + out_row[:, None] + cols[None, :], _bf16_bits(x),
                     mask=mask)
        else:
            tl.store(Data + out_row[:, None] + cols[None, :], x.to(Data.dtype.element_ty), mask=mask)
    elif FORMAT == _Q8_0:
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
    elif FORMAT == _Q4_0:  # the block's halves are loaded apart, as they share bytes
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
        scale = tl.math.div_rn(tl.max(tl.abs(x), 1), 448.0)  # 448 = formats.FP8_MAX, e4m3fn's largest
        safe = tl.where(scale == 0.0, 1.0, scale)
        # x / scale can land a rounding step above 448, which e4m3fn would turn into NaN: clamp.
        y = tl.where(scale[:, None] == 0.0, 0.0, tl.math.div_rn(x, safe[:, None]))
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        y = tl.where(bad[:, None], 0.0, _round_to_e4m3(y))
        scale = tl.where(bad, float("nan"), scale)
        if NATIVE_FP8:
            tl.store(Data + out_row[:, None] + cols[None, :], y.to(Data.dtype.element_ty), mask=mask)
        else:  # Data is the store's uint8 view (sm_80/sm_86)
            tl.store(Data + out_row[:, None] + cols[None, :], _e4m3_bits(y), mask=mask)
        tl.store(Scale + scale_off, scale, mask=row_ok)


@dataclass(frozen=True)
class _Store:
    """Checked arguments of one store, as both paths take them."""

    x: torch.Tensor  # [B, S, Hkv, D], float32 or narrower, contiguous last dimension
    data: torch.Tensor
    scale: torch.Tensor | None
    start: torch.Tensor
    fmt: BlockFormat
    page_table: torch.Tensor | None
    page_size: int
    capacity: int


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
    backend: str = "auto",
) -> None:
    """Quantize ``x`` [B, S, Hkv, D] into a cache store in place.

    Token s of sequence b goes to position ``start[b] + s``. ``data``/``scale`` are one layer's K or
    V store as laid out by ``BlockFormat.storage_shape``: [B, Hkv, T, ...] (contiguous, T = capacity) or
    [num_pages, Hkv, page_size, ...] with ``page_table`` int32 [B, max_pages]. ``capacity`` (default:
    T, or max_pages * page_size) bounds the positions. ``validate`` reads ``start`` (and the page
    table) on the host to reject positions outside the cache; it is skipped while a CUDA graph is
    being captured (out-of-range tokens are then silently skipped instead). ``name`` names ``x`` in
    error messages. ``backend`` "auto" runs the Triton kernel on a GPU and the same bytes from torch on
    a CPU (module docstring); "triton" runs the kernel anywhere (on a CPU, in the Triton interpreter).
    """
    if backend not in STORE_BACKENDS:
        raise ValueError(f"backend must be one of {STORE_BACKENDS}, got {backend!r}")
    store = _checked(x, data, scale, start, fmt, page_table, capacity, validate, name)
    if backend == "auto" and store.x.device.type == "cpu":
        _store_torch(store)
    else:
        _launch(store)


def _checked(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None, start: torch.Tensor, fmt: str,
             page_table: torch.Tensor | None, capacity: int | None, validate: bool, name: str) -> _Store:
    check(isinstance(fmt, str) and fmt in KV_FORMATS, lambda: f"fmt must be one of {KV_FORMATS}, got {fmt!r}")
    form = FORMATS[fmt]
    check(isinstance(x, torch.Tensor) and x.dim() == 4,
          lambda: f"{name} must be a 4-D tensor [B, S, Hkv, D], got {describe(x)}")
    check(x.dtype in _INPUT_DTYPES, lambda: f"{name} dtype {x.dtype} is not a float dtype in {_INPUT_DTYPES}")
    batch, seq, heads, head_dim = x.shape
    check(min(x.shape) >= 1, lambda: f"{name} has an empty dimension: {tuple(x.shape)}")
    check(isinstance(data, torch.Tensor) and data.dim() == 4,
          lambda: f"data must be a 4-D cache store, got {describe(data)}")
    pages, _, tokens, _ = data.shape
    row_error = form.row_error(head_dim)
    check(row_error is None, lambda: f"{row_error} ({name})")
    want_data, data_dtype, want_scale, scale_dtype = form.storage_shape(pages, heads, tokens, head_dim)
    check(tuple(data.shape) == want_data and data.dtype == data_dtype,
          lambda: f"data must be {data_dtype} {want_data} for {fmt} and {name} {tuple(x.shape)}, "
                  f"got {describe(data)}")
    check(data.stride(3) == 1, lambda: f"data must have a contiguous last dimension, strides {data.stride()}")
    if want_scale is None:
        check(scale is None, lambda: f"scale must be None for {fmt}")
    else:
        check(isinstance(scale, torch.Tensor) and tuple(scale.shape) == want_scale and scale.dtype == scale_dtype,
              lambda: f"scale must be {scale_dtype} {want_scale} for {fmt}, got {describe(scale)}")
        check(scale.device == x.device, lambda: f"scale is on {scale.device} but {name} is on {x.device}")
        check(form.row_scaled or scale.stride(3) == 1, lambda: "scale must have a contiguous last dimension")
    check(data.device == x.device, lambda: f"data is on {data.device} but {name} is on {x.device}")
    check(isinstance(start, torch.Tensor) and start.dtype == torch.int32 and tuple(start.shape) == (batch,),
          lambda: f"start must be int32 of shape ({batch},), got {describe(start)}")
    check(start.device == x.device, lambda: f"start is on {start.device} but {name} is on {x.device}")

    if page_table is None:
        check(pages == batch, lambda: f"contiguous data batch {pages} != {name} batch {batch}")
        page_size, limit = 1, tokens
    else:
        check(isinstance(page_table, torch.Tensor) and page_table.dtype == torch.int32 and page_table.dim() == 2
              and page_table.shape[0] == batch,
              lambda: f"page_table must be int32 [B={batch}, max_pages], got {describe(page_table)}")
        check(page_table.device == x.device,
              lambda: f"page_table is on {page_table.device} but {name} is on {x.device}")
        check(page_table.stride(1) == 1, lambda: "page_table must have a contiguous last dimension")
        page_size, limit = tokens, page_table.shape[1] * tokens
    if capacity is None:
        capacity = limit
    check(isinstance(capacity, int) and 1 <= capacity <= limit,
          lambda: f"capacity must be an int in [1, {limit}], got {capacity!r}")

    if validate and not capturing(x.device):
        st = start.cpu()
        check(bool((st >= 0).all()), lambda: f"start positions must be >= 0, got min {int(st.min())}")
        check(bool((st + seq <= capacity).all()),
              lambda: f"start + S exceeds the cache capacity {capacity}: max start {int(st.max())} with S={seq}")
        if page_table is not None:
            first_page = st // page_size
            last_page = (st + seq - 1) // page_size
            j = torch.arange(page_table.shape[1])[None, :]
            used = (j >= first_page[:, None]) & (j <= last_page[:, None])
            pt = page_table.cpu()
            check(not bool((used & ((pt < 0) | (pt >= pages))).any()),
                  lambda: f"page_table holds page indices outside [0, {pages}) for the positions written")

    if x.dtype == torch.float64:
        x = x.float()  # quantization is defined on float32 values, as in gguf
    if x.stride(3) != 1:
        x = x.contiguous()
    return _Store(x, data, scale, start, form, page_table, page_size, capacity)


def _store_torch(store: _Store) -> None:
    """Quantize with the format's torch arithmetic and scatter the rows; tokens whose position or page
    is out of range are skipped, as the kernel skips them."""
    x, data, scale, page_table = store.x, store.data, store.scale, store.page_table
    batch, seq = x.shape[:2]
    device = x.device
    pos = store.start.long()[:, None] + torch.arange(seq, device=device)[None, :]  # [B, S]
    ok = (pos >= 0) & (pos < store.capacity)
    if page_table is None:
        rows, slots = torch.arange(batch, device=device)[:, None].expand(batch, seq), pos
    else:
        page_idx = (pos // store.page_size).clamp(0, page_table.shape[1] - 1)
        rows = page_table.long().gather(1, page_idx)
        ok &= (rows >= 0) & (rows < data.shape[0])
        slots = pos % store.page_size
    rows, slots = rows[ok], slots[ok]
    codes, scales = store.fmt.quantize(x[ok])  # [tokens, Hkv, ...]
    data[rows, :, slots] = codes
    if scale is not None:
        scale[rows, :, slots] = scales


def _native_fp8(device: torch.device) -> bool:
    """Whether ``device`` converts to float8_e4m3fn itself: sm_89 and later, and the interpreter. Before
    sm_89 there is no fp8 conversion (nor fp8e4nv in Triton): fp8 codes are written as bytes."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _launch(store: _Store) -> None:
    x, data, scale, page_table = store.x, store.data, store.scale, store.page_table
    batch, seq, heads, head_dim = x.shape
    code = store.fmt.code
    if scale is None:
        scale_arg, scale_strides = data, (0, 0, 0)  # never read
    else:
        scale_arg, scale_strides = scale, (scale.stride(0), scale.stride(1), scale.stride(2))
    if page_table is None:
        page_table_arg, stride_pt = store.start, 0  # never read when PAGED is off
    else:
        page_table_arg, stride_pt = page_table, page_table.stride(0)
    if code in (KernelCode.Q8_0, KernelCode.Q4_0):
        groups, group_size = head_dim // QK, QK
        block_c = QK if code == KernelCode.Q8_0 else QK // 2
    else:
        groups, group_size = 1, head_dim
        block_c = triton.next_power_of_2(head_dim)
    num_rows = heads * groups
    tile_cols = QK if code == KernelCode.Q4_0 else block_c
    block_r = max(1, min(triton.next_power_of_2(num_rows), 4096 // tile_cols))
    grid = (batch * seq, triton.cdiv(num_rows, block_r))
    native_fp8 = code != KernelCode.FP8 or _native_fp8(x.device)
    _kv_store_kernel[grid](
        x, data if native_fp8 else data.view(torch.uint8), scale_arg, store.start, page_table_arg,
        x.stride(0), x.stride(1), x.stride(2),
        data.stride(0), data.stride(1), data.stride(2),
        *scale_strides,
        stride_pt,
        seq, store.capacity, data.shape[0], num_rows,
        GROUPS_PER_HEAD=groups, GROUP_SIZE=group_size,
        BLOCK_R=block_r, BLOCK_C=block_c,
        PAGE_SIZE=store.page_size, PAGED=page_table is not None, FORMAT=int(code), NATIVE_FP8=native_fp8,
        PDL=enabled(x.device), num_warps=4, **launch_kwargs(x.device),
        # gguf rounds x * id before adding 8.5 (q4_0); an FMA would round once and differ.
        enable_fp_fusion=False,
    )
