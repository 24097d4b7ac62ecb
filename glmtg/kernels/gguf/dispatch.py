"""Which decode kernel reads a GGUF weight: the int8-dot path (mmvq.py, mmvq_moe.py) where it reads the
format, the float-decode path (gemv.py, moe.py) for the other formats.

Why the int8-dot path first: decoding every weight value to fp32 costs 7-13 SM instructions a value, so the
float path is bound by the instruction issue rate well below memory bandwidth for 4- and 5-bit types
(bench/DECISIONS.md, "GGUF decode kernels"); packing codes four to a word and multiplying with dp4a takes
about 2. Its price is x rounded to int8 per 32 values, as llama.cpp's MMVQ does (error bounds in mmvq.py).

``path``: "auto" (int8 where the format has it), "int8" (ValueError if it has not), "float".

``batch_matmul``: the dense product of a decode batch (small_batch.py's token counts): mmq_small, or mmq_i8
where ``small_batch.DOT`` is "int8" and it reads the format.
"""

from __future__ import annotations

import torch

from glmtg.kernels._checks import check
from glmtg.kernels.gguf.gemv import quant_matvec
from glmtg.kernels.gguf.mmvq import MMVQ_FORMATS, mmvq
from glmtg.kernels.gguf.mmvq_moe import mmvq_moe
from glmtg.kernels.gguf.moe import quant_moe_decode

PATHS = ("auto", "int8", "float")


def uses_int8(path: str, *formats: str) -> bool:
    """Whether weights in ``formats`` are read by the int8-dot kernels under ``path`` (ValueError for an
    unknown path, or "int8" with a format it does not read): the one place this is decided."""
    check(path in PATHS, lambda: f"path must be one of {PATHS}, got {path!r}")
    readable = all(f in MMVQ_FORMATS for f in formats)
    check(path != "int8" or readable, lambda: f"path 'int8' does not read {formats} (it reads {MMVQ_FORMATS})")
    return path == "int8" or (path == "auto" and readable)


def matvec(x: torch.Tensor, weight: torch.Tensor, fmt: str, *, path: str = "auto") -> torch.Tensor:
    """x [T, K] @ dequant(weight [N, row_bytes] of ``fmt``)ᵀ -> [T, N], T <= GEMV_MAX_TOKENS."""
    if uses_int8(path, fmt):
        return mmvq(x, weight, fmt)
    return quant_matvec(x, weight, fmt)


def moe_decode(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor, gate_up_fmt: str, down_fmt: str, *, path: str = "auto",
               shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_k weights[t, k] · down_e(silu(gate_e x_t) · up_e x_t) over GGUF expert stacks (see moe.py), plus the
    ``shared`` expert's output where given (int8 path only: mmvq_moe's ``shared``; ValueError elsewhere)."""
    if uses_int8(path, gate_up_fmt, down_fmt):
        return mmvq_moe(x, gate, up, down, ids, weights, gate_up_fmt, down_fmt, shared=shared)
    check(shared is None, "shared: only the int8-dot kernels fold a shared expert in")
    return quant_moe_decode(x, gate, up, down, ids, weights, gate_up_fmt, down_fmt)


def batch_matmul(x: torch.Tensor, weight: torch.Tensor, fmt: str, *, out: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ dequant(weight [N, row_bytes] of ``fmt``)ᵀ (+ bias) (+ residual) -> [T, N] (``out``: a
    column slice of a wider buffer allowed) for a decode batch: ``mmq_i8.mmq_i8`` where small_batch.DOT is
    "int8" and it reads ``fmt``, else ``mmq_small.mmq_small`` (both keep mmq's epilogue roundings)."""
    from glmtg.kernels.gguf import mmq_i8, mmq_small, small_batch

    if small_batch.DOT == "int8" and fmt in mmq_i8.I8_FORMATS:
        return mmq_i8.mmq_i8(x, weight, fmt, out=out, bias=bias, residual=residual)
    return mmq_small.mmq_small(x, weight, fmt, out=out, bias=bias, residual=residual)
