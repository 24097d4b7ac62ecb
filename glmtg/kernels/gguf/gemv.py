"""y = x @ W.T for a few tokens (decode), W a GGUF weight tensor read in its block format in place.

Decode with a batch of one to a few tokens is bound by the weight bytes, so the kernel streams each weight
block once from memory and decodes it in registers (``decode.decode_blocks``); the dequantized matrix is
never written anywhere.

One program covers BLOCK_N weight rows and every token. It walks the row's blocks G at a time (a step of
G x BS values, ~512 for one token), decodes the [BLOCK_N, G, BS] tile to fp32 and multiplies it by the
matching x values:

- one token: the products are accumulated elementwise into a [BLOCK_N, G, BS] fp32 tile and reduced once
  at the end (no cross-thread reduction inside the loop, as glmtg/kernels/moe_decode.py);
- more tokens: an elementwise accumulator per token would not fit in registers, so each step's products
  [BLOCK_T, BLOCK_N, G, BS] are summed at once into a [BLOCK_T, BLOCK_N] accumulator. The weight tile is
  decoded once and used for all tokens, so the bytes read do not grow with T.

There is no tl.dot: the compiler does not software-pipeline these loads, so the bytes in flight come from
many resident programs. The defaults (``default_config``) pick BLOCK_N so that a launch has ~1000 programs
where the rows allow it; they are reasoned, not measured: bench/gguf_gemv.py --sweep times the choices.

Instructions per weight value bound these kernels as much as bytes do (a 4-bit value is half a byte, and
an SM issues 128 lanes of instructions a clock): bench/gguf_gemv.py --sass counts them on a CPU. Hence the
full steps load without masks (predicated loads and their fill values cost instructions), and an fp32 x
saves a conversion per weight value against fp16/bf16.

Works for every type in ``decode.DECODED`` unchanged: the format is a constexpr (FMT, BS, TS) and the
type's lookup table (``tables.lookup_table``) is passed as ``aux``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmtg.formats import GGUF_FORMATS, BlockFormat, get
from glmtg.kernels._checks import check, check_power_of_two, describe
from glmtg.kernels.gguf.decode import DECODED, decode_blocks
from glmtg.kernels.gguf.tables import lookup_table

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest token count the GEMV is meant for; above it a dequantize + matmul (tensor cores) wins, and the
# per-step [BLOCK_T, BLOCK_N, G, BS] product would no longer fit in registers.
GEMV_MAX_TOKENS: int = 16


@triton.jit
def _gemv_step(acc, blk, mask, x_ptrs, x_mask, Aux, FMT: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr):
    """acc + this step's products: decode the [BLOCK_N, G] blocks at ``blk`` and multiply by x."""
    w = decode_blocks(blk, mask, Aux, FMT, BS)  # fp32 [BLOCK_N, G, BS]
    xv = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
    if BLOCK_T == 1:
        acc += w * xv  # xv [BLOCK_N, G, BS] (the row term of its offsets is 0)
    else:
        acc += tl.sum(tl.sum(w[None, :, :, :] * xv[:, None, :, :], axis=3), axis=2)  # xv [BLOCK_T, G, BS]
    return acc


@triton.jit
def _gemv_kernel(X, W, Y, Aux, T, N, NB, ROW_BYTES, STRIDE_XT, STRIDE_YT,
                 FMT: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    gg = tl.arange(0, G)
    jj = tl.arange(0, BS)
    tt = tl.arange(0, BLOCK_T)
    # Rows past N read row N - 1 (their results are not stored), so that the loads of the full steps need
    # no mask: predicated loads and their fill values cost instructions per value.
    rows_in = tl.minimum(rows, N - 1)
    # Block pointers of the first step, advanced by G blocks a step (one add per pointer). int64 row
    # offsets: an lm_head in f32 is past 2^31 bytes.
    blk = W + rows_in.to(tl.int64)[:, None] * ROW_BYTES + (gg * TS)[None, :]
    # One token: x offsets in the weight tile's [BLOCK_N, G, BS] shape (the row term is 0), so x loads in
    # the tile's layout (repeats of an address hit L1) instead of being moved there through shared memory.
    # More tokens: x [BLOCK_T, G, BS] is loaded once and broadcast over the rows (per row it would cost more
    # registers than the move).
    if BLOCK_T == 1:
        acc = tl.zeros((BLOCK_N, G, BS), dtype=tl.float32)
        x_ptrs = X + (rows * 0)[:, None, None] + (gg * BS)[None, :, None] + jj[None, None, :]
        t_ok = (rows * 0 == 0)[:, None, None]
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        x_ptrs = X + tt[:, None, None] * STRIDE_XT + (gg * BS)[None, :, None] + jj[None, None, :]
        t_ok = (tt < T)[:, None, None]
    all_blocks = tl.full((BLOCK_N, G), True, tl.int1)
    full = NB // G
    for _ in range(full):
        acc = _gemv_step(acc, blk, all_blocks, x_ptrs, t_ok, Aux, FMT, BS, BLOCK_T)
        blk += G * TS
        x_ptrs += G * BS
    if full * G < NB:  # the last, partial step
        g_ok = (full * G + gg) < NB
        acc = _gemv_step(acc, blk, all_blocks & g_ok[None, :], x_ptrs, t_ok & g_ok[None, :, None], Aux, FMT, BS,
                         BLOCK_T)
    if BLOCK_T == 1:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)
    else:
        y_ptrs = Y + tt[:, None] * STRIDE_YT + rows[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(tt < T)[:, None] & row_ok[None, :])


def decoded_format(fmt: str | int, what: str = "fmt") -> BlockFormat:
    """The GGUF block format ``fmt`` (name or gguf type id); ValueError naming ``what`` if it is no GGUF
    type or has no device decoder yet."""
    f = get(fmt, what=what, allowed=GGUF_FORMATS)
    check(f.name in DECODED, lambda: f"{what}: no device decoder for {f.name} yet (decoded: {DECODED})")
    return f


def check_weight(name: str, w: object, f: BlockFormat, dims: int, device: torch.device) -> int:
    """Check that ``w`` is a contiguous, 16-byte aligned uint8 tensor of ``dims`` dimensions on ``device``
    whose rows are whole ``f`` blocks; returns the blocks per row."""
    check(isinstance(w, torch.Tensor) and w.dtype == torch.uint8 and w.dim() == dims,
          lambda: f"{name} must be a {dims}-D uint8 tensor of {f.name} blocks, got {describe(w)}")
    check(w.device == device, lambda: f"{name} is on {w.device} but x is on {device}")
    # A copy of the weights is what these kernels exist to avoid, so no silent .contiguous() here.
    check(w.is_contiguous(), lambda: f"{name} must be contiguous, strides {w.stride()}")
    row_bytes = w.shape[-1]
    check(row_bytes > 0 and row_bytes % f.type_size == 0,
          lambda: f"{name} row of {row_bytes} bytes is not a whole number of {f.name} blocks of "
                  f"{f.type_size} bytes")
    # The decoders load fp16 scales (and wider words) at their natural alignment.
    check(w.data_ptr() % 16 == 0, lambda: f"{name} must start 16-byte aligned (a GGUF tensor always does)")
    return row_bytes // f.type_size


def output_for(out: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """``out`` checked to be a contiguous tensor of ``shape`` in x's dtype on x's device, or a new one."""
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    check(isinstance(out, torch.Tensor) and tuple(out.shape) == shape and out.dtype == x.dtype
          and out.device == x.device and out.is_contiguous(),
          lambda: f"out must be a contiguous {x.dtype} tensor {shape} on {x.device}, got {describe(out)}")
    return out


def steps_for(block_size: int, values: int) -> int:
    """G, the blocks per loop step: ~``values`` values, at least one block (a power of two)."""
    return max(1, triton.next_power_of_2(max(1, values // block_size)))


def default_config(n: int, t: int) -> tuple[int, int]:
    """(block_n, values per step) for ``n`` rows and ``t`` tokens.

    One token: 512 values a step (the moe_decode 8 x 512 optimum) and up to 8 rows, fewer when the rows
    would give under ~1000 programs (a 1024-row k/v projection then still spreads over every SM). More
    tokens: 256 values a step and the rows cut so that the per-step product [T, BLOCK_N, 256] stays ~8K
    values (64 fp32 per thread at 4 warps)."""
    block_t = triton.next_power_of_2(t)
    values = 512 if block_t == 1 else 256
    block_n = min(8, max(1, 8192 // (block_t * values)))
    while block_n > 1 and triton.cdiv(n, block_n) < 1024:
        block_n //= 2
    return block_n, values



def quant_matvec(x: torch.Tensor, weight: torch.Tensor, fmt: str | int, *, out: torch.Tensor | None = None,
                 block_n: int | None = None, values_per_step: int | None = None,
                 num_warps: int = 4) -> torch.Tensor:
    """x [T, K] (fp16, bf16 or fp32) @ dequant(weight).T -> [T, N] in x's dtype, fp32 accumulation.

    ``weight``: uint8 [N, row_bytes], N rows of GGUF blocks of ``fmt`` (a name or gguf type id), contiguous
    and 16-byte aligned; K = row_bytes / type_size * block_size. Meant for T <= GEMV_MAX_TOKENS.
    ``block_n`` (rows per program), ``values_per_step`` (rounded to whole blocks, a power of two of them)
    and ``num_warps`` are the launch knobs; None picks ``default_config``'s.
    """
    f = decoded_format(fmt)
    check(isinstance(x, torch.Tensor) and x.dim() == 2, lambda: f"x must be a 2-D tensor [T, K], got {describe(x)}")
    check(x.dtype in SUPPORTED_DTYPES, lambda: f"x dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    t, k = x.shape
    check(t <= GEMV_MAX_TOKENS, lambda: f"x has {t} tokens; quant_matvec takes at most {GEMV_MAX_TOKENS} "
                                        "(dequantize and matmul above that)")
    nb = check_weight("weight", weight, f, 2, x.device)
    n = weight.shape[0]
    check(nb * f.block_size == k, lambda: f"weight rows hold {nb * f.block_size} {f.name} values but x has "
                                          f"K={k}")
    out = output_for(out, (t, n), x)
    auto_n, auto_values = default_config(n, t)
    block_n = auto_n if block_n is None else block_n
    values_per_step = auto_values if values_per_step is None else values_per_step
    check_power_of_two("block_n", block_n)
    check_power_of_two("values_per_step", values_per_step)
    check_power_of_two("num_warps", num_warps)
    if t == 0 or n == 0:
        return out
    # x is a few KB: a strided one is copied (on the device, nothing read back).
    x = x if x.stride(1) == 1 else x.contiguous()
    aux = lookup_table(f.name, x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, aux, t, n, nb, weight.shape[1], x.stride(0), out.stride(0),
        FMT=f.gguf_type, BS=f.block_size, TS=f.type_size, BLOCK_T=triton.next_power_of_2(t),
        BLOCK_N=block_n, G=steps_for(f.block_size, values_per_step), num_warps=num_warps,
    )
    return out
