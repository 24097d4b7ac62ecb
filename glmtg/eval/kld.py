"""KL divergence against a base run, top-K compressed, and the base file that stores it.

A base file holds, for every scored token, the base run's top-K log-probabilities and their token ids
plus the log-prob of the true next token, and the tokens themselves, in a safetensors file. A later run
is compared over the base's K tokens plus one bucket holding all the other tokens (mass 1 - sum of the
K), i.e. KL(P_base || Q) with the tail merged. Merging can only lower KL (it is a coarser partition),
so this is a lower bound of the full-vocabulary KLD; with K = 32 the tail rarely holds much mass. A run
compared with its own base file gives 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glmtg.eval.chunking import scored_per_chunk
from glmtg.files import existing_file

BASE_FORMAT = "glmtg-kld-base/1"
DEFAULT_TOP_K = 32


def tail_log_mass(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(top_logp)) per row in float64; -inf when the top-K hold all the mass."""
    mass = torch.exp(top_logp.double()).sum(-1)
    return torch.log(torch.clamp(1.0 - mass, min=0.0))


def kld_and_top1(base_ids: torch.Tensor, base_logp: torch.Tensor, logp: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(P_base || Q) over the base's top-K tokens + the merged tail, and top-1 agreement.

    base_ids int [N, K] (descending base probability), base_logp float [N, K]; logp: this run's
    log-probabilities [N, V]. Returns float64 [N] and bool [N].
    """
    p_top = base_logp.double()
    q_top = logp.gather(1, base_ids.long()).double()
    p_tail, q_tail = tail_log_mass(p_top), tail_log_mass(q_top)
    kld = (p_top.exp() * (p_top - q_top)).sum(-1)
    # The tail term: p log p/q with 0 log 0 = 0; a tail that Q leaves empty while P does not would be
    # infinite, so Q's tail is floored at the smallest mass fp64 can hold (fp rounding makes such ties).
    q_tail = torch.clamp(q_tail, min=math.log(1e-300))
    kld = kld + torch.where(torch.isfinite(p_tail), p_tail.exp() * (p_tail - q_tail), torch.zeros_like(kld))
    # "same top token": the base's top token is also a most likely token here (exact ties count as
    # agreement; bf16 logits tie often enough that argmax's tie-break would add noise)
    same_top = logp.gather(1, base_ids[:, :1].long()).squeeze(1) == logp.max(-1).values
    return kld, same_top


def kld_summary(kld: np.ndarray, same_top: np.ndarray) -> dict[str, float]:
    kld = np.asarray(kld, dtype=np.float64)
    n = kld.size
    p = float(np.mean(same_top))
    out = {
        "mean": float(kld.mean()),
        "mean_err": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "max": float(kld.max()),
        "min": float(kld.min()),
        "same_top_pct": 100.0 * p,
        "same_top_err_pct": 100.0 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan"),
    }
    for q in (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0):
        out[f"p{q:g}"] = float(np.percentile(kld, q))
    return out


@dataclass
class KldBase:
    """A base run's logits, top-K compressed (see the module doc); ``load`` checks a file fully."""

    tokens: np.ndarray  # int32 [n_chunks * n_ctx]
    n_ctx: int
    vocab_size: int
    top_ids: np.ndarray  # int32 [N, K]
    top_logp: np.ndarray  # float32 [N, K]
    target_logp: np.ndarray  # float32 [N], log-prob of the true next token
    model: str = ""

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        save_file({"tokens": self.tokens.astype(np.int32), "top_ids": self.top_ids.astype(np.int32),
                   "top_logp": self.top_logp.astype(np.float32), "target_logp": self.target_logp.astype(np.float32)},
                  str(path), metadata={"format": BASE_FORMAT, "n_ctx": str(self.n_ctx),
                                       "vocab_size": str(self.vocab_size), "model": self.model})

    @classmethod
    def load(cls, path: str | Path) -> KldBase:
        from safetensors import safe_open

        path = existing_file(path, "KL-divergence base file")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type on a bad header
            raise ValueError(f"cannot read KL-divergence base file {path}: {e}") from None
        if meta.get("format") != BASE_FORMAT or set(tensors) != {"tokens", "top_ids", "top_logp", "target_logp"}:
            raise ValueError(f"{path} is not a glmtg KL-divergence base file ({BASE_FORMAT})")
        try:
            n_ctx, vocab = int(meta["n_ctx"]), int(meta["vocab_size"])
        except (KeyError, ValueError):
            raise ValueError(f"{path}: bad n_ctx / vocab_size metadata") from None
        base = cls(tensors["tokens"], n_ctx, vocab, tensors["top_ids"], tensors["top_logp"], tensors["target_logp"],
                   meta.get("model", ""))
        n_chunks = base.tokens.size // max(n_ctx, 1)
        rows = n_chunks * scored_per_chunk(n_ctx)
        if (n_ctx < 4 or base.tokens.size % n_ctx or base.top_ids.shape != base.top_logp.shape
                or base.top_ids.ndim != 2 or base.top_ids.shape[0] != rows or base.target_logp.shape != (rows,)):
            raise ValueError(f"{path}: inconsistent shapes (tokens {base.tokens.shape}, top_ids {base.top_ids.shape}, "
                             f"n_ctx {n_ctx})")
        # the values must be usable as they are: ids index the vocabulary, log-probs are finite and <= 0
        if vocab < 1 or not all(np.issubdtype(t.dtype, np.integer) for t in (base.tokens, base.top_ids)):
            raise ValueError(f"{path}: tokens and top_ids must be integers and vocab_size positive")
        if not all(np.issubdtype(t.dtype, np.floating) for t in (base.top_logp, base.target_logp)):
            raise ValueError(f"{path}: top_logp and target_logp must be floating point")
        for name in ("tokens", "top_ids"):
            values = getattr(base, name)
            if values.size and (values.min() < 0 or values.max() >= vocab):
                raise ValueError(f"{path}: {name} holds ids outside the vocabulary [0, {vocab})")
        if base.top_ids.shape[1] < 1 or base.top_ids.shape[1] > vocab:
            raise ValueError(f"{path}: top_ids holds {base.top_ids.shape[1]} ids per token for vocabulary {vocab}")
        if not (np.isfinite(base.top_logp).all() and (base.top_logp <= 0).all()):
            raise ValueError(f"{path}: top_logp holds values that are not log-probabilities")
        return base
