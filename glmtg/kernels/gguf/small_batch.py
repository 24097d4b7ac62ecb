"""Which kernels run GGUF products of a small decode batch (a server's 2..64 sequences), and their launches.

Why a path of its own: the int8-dot GEMV (mmvq.py) keeps a [BLOCK_T, BLOCK_N·G] accumulator and spends
~T/4 dp4a a 4-bit value a token, so at T = 8 it is bound by instructions and registers (6.8 ms an 8-layer
Air step against a ~1.1 ms weight-read bound); above GEMV_MAX_TOKENS = 16 dense products dequantized the
whole weight to bf16 every step and the routed experts read each expert once per (token, expert) pair.
Here (mode "new"):

- dense products: ``mmq_small`` (mmq_small.py), weight tiles decoded once in registers and multiplied on
  the tensor cores with one m-tile holding every token (16..64, padded), so each weight byte is read and
  decoded once whatever T; small N split over K so that the whole GPU is busy (``dense_config``).
- routed experts, only with ``GLMTG_SMALL_BATCH_EXPERTS=new``: ``mmq_moe.moe_prefill`` (pairs sorted by
  expert on the device, each present expert's bytes read once a step for all its tokens, fixed grids:
  capturable) with m-tiles of 16 pairs (``moe_configs``); the shared expert then runs as a dense MLP. Off by
  default: on the H200 it lost to the per-pair decode kernel at 8 and 32 tokens (bench/DECISIONS.md J2).

Switches (read once at import; module constants, so a test or bench may set them):
- ``GLMTG_SMALL_BATCH`` = "new" (default) or "old" (the paths before: mmvq up to 16 tokens, dequantize +
  cuBLAS and the per-pair expert kernel above): ``MODE``.
- ``GLMTG_SMALL_BATCH_MIN`` / ``GLMTG_SMALL_BATCH_MAX``: the token counts the new path takes (default 2..16;
  T = 1 keeps the GEMV lanes kernels): ``MIN_TOKENS`` / ``MAX_TOKENS``. 16 from bench/small_batch.py on the
  H200: at 8 tokens mmq_small took 0.34-0.72x the old time of every dense product, at 32 the dequantize +
  cuBLAS path was as fast or faster (bench/DECISIONS.md J2).
- ``GLMTG_SMALL_BATCH_EXPERTS`` = "old" (default) or "new": whether routed experts take the grouped path
  (``EXPERTS``).
- ``GLMTG_SMALL_BATCH_DOT`` = "float" (default: mmq_small, weights decoded to x's dtype) or "int8" (mmq_i8:
  q4_0 / q8_0 weights as int8 codes, x rounded to int8 per 32 values, int8 tensor-core dots; other formats
  stay on mmq_small; routed experts in q4_0 / q8_0 take moe_i8.moe_i8 the same way): ``DOT``.
"""

from __future__ import annotations

import os

import torch
import triton

from glmtg.kernels.attention.plan import target_of
from glmtg.kernels.gguf.mmq import MmqConfig

MODES = ("old", "new")
DOTS = ("float", "int8")
# The formats of the Air / GLM Q4_0 and Q4_K_M mixes' dense and expert tensors (and their near relatives);
# other formats keep the paths they had.
FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")


def _env_mode() -> str:
    mode = os.environ.get("GLMTG_SMALL_BATCH", "new")
    if mode not in MODES:
        raise ValueError(f"GLMTG_SMALL_BATCH must be one of {MODES}, got {mode!r}")
    return mode


def _env_dot() -> str:
    dot = os.environ.get("GLMTG_SMALL_BATCH_DOT", "float")
    if dot not in DOTS:
        raise ValueError(f"GLMTG_SMALL_BATCH_DOT must be one of {DOTS}, got {dot!r}")
    return dot


def _env_tokens(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


MODE: str = _env_mode()
EXPERTS: str = os.environ.get("GLMTG_SMALL_BATCH_EXPERTS", "old")
if EXPERTS not in MODES:
    raise ValueError(f"GLMTG_SMALL_BATCH_EXPERTS must be one of {MODES}, got {EXPERTS!r}")
DOT: str = _env_dot()
MIN_TOKENS: int = _env_tokens("GLMTG_SMALL_BATCH_MIN", 2)
MAX_TOKENS: int = _env_tokens("GLMTG_SMALL_BATCH_MAX", 16)
# The m-tile is the whole batch up to this many tokens (register budget of the fp32 accumulator).
_MAX_BLOCK_M = 64


def takes_experts(tokens: int, *formats: str) -> bool:
    """``takes`` for routed experts: also needs ``EXPERTS`` to be "new"."""
    return EXPERTS == "new" and takes(tokens, *formats)


def takes(tokens: int, *formats: str) -> bool:
    """Whether a product of ``tokens`` rows whose weights are in ``formats`` takes the small-batch kernels:
    mode "new", MIN_TOKENS <= tokens <= MAX_TOKENS, every format in FORMATS."""
    return (MODE == "new" and MIN_TOKENS <= tokens <= MAX_TOKENS
            and all(f in FORMATS for f in formats))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached: asked once per device); 4 off CUDA (the
    interpreter, where the count only shapes the split)."""
    return target_of(device).sms if device.type == "cuda" else 4


def dense_config(block_size: int, t: int, on_gpu: bool) -> MmqConfig:
    """The tile launch of ``mmq_small`` for ``t`` tokens and blocks of ``block_size`` values.

    BLOCK_M: every token in one m-tile (16..64), so each weight tile is decoded once. BLOCK_K: four 32-value
    blocks or one 256-value super-block a step (a wide load of the weight bytes). BLOCK_N: 64, 32 at 256-value
    blocks with 64 tokens (the decoded tile and the accumulator share the registers). Reasoned, not
    measured: bench/small_batch.py times it."""
    bs = max(block_size, 1)
    block_m = min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(t)))
    if not on_gpu:  # the interpreter: small tiles run fastest
        return MmqConfig(block_m, 32, max(32, bs), 4, 1, 1)
    block_n = 32 if bs >= 256 and block_m >= 64 else 64
    return MmqConfig(block_m, block_n, max(128, bs), 8 if bs >= 256 else 4, num_stages=3, group_m=1)


def split_for(config: MmqConfig, t: int, n: int, k: int, sms: int) -> int:
    """How many pieces K is cut into: 1 when the output tiles already give two programs per SM, else enough
    pieces for that, each at least 4 K steps (fp32 partials, summed in order by the epilogue kernel)."""
    tiles = triton.cdiv(t, config.block_m) * triton.cdiv(n, config.block_n)
    if tiles >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(k, config.block_k) // 4))


def moe_configs(gate_up_block: int, down_block: int, on_gpu: bool) -> tuple[MmqConfig, MmqConfig]:
    """(gate+up, down) launches of ``moe_prefill`` for a decode batch: m-tiles of 16 pairs (a batch of up
    to 64 tokens puts a handful of pairs on most experts), a K step of four 32-value blocks or one
    super-block, n-tiles of 32 (gate+up: two accumulators) / 64 values. Reasoned, not measured."""
    def one(bs: int, block_n: int) -> MmqConfig:
        bs = max(bs, 1)
        if not on_gpu:
            return MmqConfig(16, 32, max(32, bs), 4, 1, 1)
        return MmqConfig(16, block_n, max(128, bs), 8 if bs >= 256 else 4, 3, 1)

    return one(gate_up_block, 32), one(down_block, 64)
