"""Perplexity of a token stream with llama-perplexity's method, optionally recording or comparing a KLD base.

Tokens are cut into chunks of n_ctx (see ``glmtg.eval.chunking``); PPL = exp(mean NLL) and its error is
llama.cpp's delta-method one: PPL * sqrt(var(NLL) / (N - 1)). No BOS token is inserted (GLM's tokenizer
adds none).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from glmtg.engine import Engine
from glmtg.eval.chunking import first_scored, scored_per_chunk
from glmtg.eval.kld import KldBase, kld_and_top1


def perplexity_estimate(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its standard error) from per-token NLLs, as llama-perplexity's final estimate."""
    nll = np.asarray(nll, dtype=np.float64)
    n = nll.size
    if n == 0:
        raise ValueError("no scored tokens")
    mean = nll.mean()
    ppl = math.exp(mean)
    var = (nll * nll).mean() - mean * mean
    err = ppl * math.sqrt(var / (n - 1)) if n > 1 and var > 0 else float("nan")
    return ppl, err


@dataclass
class PerplexityResult:
    """What ``evaluate`` measured: per-token NLLs, running PPL, and the KLD record or comparison."""

    nll: np.ndarray  # float64 [N], per scored token
    running_ppl: list[float]  # after each chunk
    base: KldBase | None = None  # the base this run recorded (save mode)
    kld: np.ndarray | None = None  # compare mode
    same_top: np.ndarray | None = None
    base_nll: np.ndarray | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def non_finite(self) -> int:
        """Scored tokens whose NLL is NaN or infinite (NaN/inf logits: broken weights or overflow)."""
        return int((~np.isfinite(self.nll)).sum())


def evaluate(
    engine: Engine,
    tokens: list[int] | np.ndarray,
    n_ctx: int,
    *,
    n_chunks: int | None = None,
    save_top_k: int | None = None,
    base: KldBase | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
    model_name: str = "",
) -> PerplexityResult:
    """Perplexity of ``tokens`` in chunks of ``n_ctx``; optionally record (``save_top_k``) or compare
    with (``base``) a KL-divergence base. ``on_chunk(i, running_ppl)`` after each chunk.

    Every argument is checked before the first chunk runs (ValueError naming the argument).
    """
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be >= 4 for perplexity, got {n_ctx}")
    if engine.settings.ctx_size < n_ctx:
        raise ValueError(f"the engine's ctx_size ({engine.settings.ctx_size}) is shorter than n_ctx {n_ctx}")
    if engine.settings.batch != 1:
        raise ValueError(f"perplexity runs one sequence; the engine has batch {engine.settings.batch}")
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with n_ctx {n_ctx} "
                         f"(the text has {tokens.size})")
    available = tokens.size // n_ctx
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    n_chunks = available if n_chunks is None else min(n_chunks, available)
    vocab = engine.config.vocab_size
    if tokens.max() >= vocab or tokens.min() < 0:
        raise ValueError(f"token ids must be in [0, {vocab})")
    if save_top_k is not None and not 1 <= save_top_k <= vocab:
        raise ValueError(f"save_top_k must be in [1, {vocab}] (the vocabulary size), got {save_top_k}")
    first = first_scored(n_ctx)
    per_chunk = scored_per_chunk(n_ctx)
    if base is not None:
        if base.vocab_size != vocab:
            raise ValueError(f"the base file was made with vocabulary {base.vocab_size}, this model has {vocab}")
        if base.n_ctx != n_ctx:
            raise ValueError(f"the base file was made with n_ctx {base.n_ctx}, this run uses n_ctx {n_ctx}")
        if base.top_ids.shape[0] < n_chunks * per_chunk:
            raise ValueError(f"the base file holds {base.top_ids.shape[0] // per_chunk} chunks, fewer than {n_chunks}")

    nll: list[np.ndarray] = []
    klds: list[np.ndarray] = []
    same: list[np.ndarray] = []
    tops: list[tuple[np.ndarray, np.ndarray]] = []
    running: list[float] = []
    total = 0.0
    count = 0
    t0 = time.perf_counter()
    for c in range(n_chunks):
        chunk = torch.from_numpy(tokens[c * n_ctx:(c + 1) * n_ctx]).to(engine.device)
        row0 = c * per_chunk  # this chunk's first row in the base arrays

        def score(start: int, logits: torch.Tensor, chunk: torch.Tensor = chunk, row0: int = row0) -> None:
            lo, hi = max(start, first), min(start + logits.shape[1], n_ctx - 1)
            if lo >= hi:
                return
            logp = torch.log_softmax(logits[0, lo - start:hi - start].float(), dim=-1)  # [n, V]
            target = logp.gather(1, chunk[lo + 1:hi + 1, None]).squeeze(1)
            nll.append((-target).double().cpu().numpy())
            if save_top_k:
                values, ids = logp.topk(save_top_k, dim=-1)
                tops.append((ids.int().cpu().numpy(), values.cpu().numpy()))
            if base is not None:
                r0, r1 = row0 + lo - first, row0 + hi - first
                ids = torch.from_numpy(base.top_ids[r0:r1]).to(engine.device)
                values = torch.from_numpy(base.top_logp[r0:r1]).to(engine.device)
                k, s = kld_and_top1(ids, values, logp)
                klds.append(k.cpu().numpy())
                same.append(s.cpu().numpy())

        parts_before = len(nll)
        engine.reset()
        engine.prefill(chunk, on_logits=score)
        chunk_nll = np.concatenate(nll[parts_before:])
        total += float(chunk_nll.sum())
        count += chunk_nll.size
        running.append(math.exp(total / count))
        if on_chunk is not None:
            on_chunk(c + 1, running[-1])
    engine.reset()

    all_nll = np.concatenate(nll)
    result = PerplexityResult(nll=all_nll, running_ppl=running, seconds=time.perf_counter() - t0)
    if save_top_k:
        result.base = KldBase(tokens=tokens[:n_chunks * n_ctx].astype(np.int32), n_ctx=n_ctx, vocab_size=vocab,
                              top_ids=np.concatenate([t[0] for t in tops]),
                              top_logp=np.concatenate([t[1] for t in tops]),
                              target_logp=(-all_nll).astype(np.float32), model=model_name)
    if base is not None:
        result.kld = np.concatenate(klds)
        result.same_top = np.concatenate(same)
        result.base_nll = -base.target_logp[:n_chunks * per_chunk].astype(np.float64)
    return result
