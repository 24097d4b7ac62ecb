"""Token sampling on the device, with no host sync.

Filters follow llama.cpp's default chain: top-k, then top-p and min-p on the temperature-1
distribution of the survivors, then temperature. The draw is a Gumbel-max race: the token is
``argmax(logit / T + g)`` with ``g = -log(-log(u))``, which picks each survivor with its softmax
probability. ``u`` comes from a counter-based hash of (seed, step, token id) computed with plain
tensor ops, so it is reproducible for a seed on any device, needs no ``torch.Generator`` state
inside a CUDA graph, and a request draws the same tokens whichever batch row it sits in.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# Multiplier of a well-known 32-bit integer finalizer. It is < 2**27, so (x < 2**32) * _MUL stays
# below 2**59 and never overflows int64: the hash is exact on every backend.
_MUL = 0x45D9F3B
_GOLDEN = 0x9E3779B9


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's sampling knobs (same defaults). ``temperature == 0`` means greedy.

    ``top_k <= 0``, ``top_p >= 1`` and ``min_p <= 0`` switch the filter off. ``seed=None`` draws a
    fresh seed for each request (reported back by ``Sampler.set_params``).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams(temperature=0.0)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Avalanche a non-negative int64 tensor holding 32-bit values."""
    x = ((x >> 16) ^ x) * _MUL & _MASK32
    x = ((x >> 16) ^ x) * _MUL & _MASK32
    return (x >> 16) ^ x


def hash_uniform(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in (0, 1), a pure function of (seed[b], step[b], token_ids[b, c]).

    seed, step: int64 [B]; token_ids: int64 [B, C]. Returns [B, C].
    """
    key = _mix32((seed & _MASK32) ^ _mix32((seed >> 32) & _MASK32))
    key = _mix32(key ^ _mix32(step & _MASK32))
    h = _mix32(_mix32(key[:, None] ^ token_ids) + _GOLDEN & _MASK32)
    # 2k+1 over 2**24 with k < 2**23: exact in float32 and never 0 or 1, so both logs stay finite.
    return ((h >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def filter_logits(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    num_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted candidates with the filtered-out ones set to -inf.

    logits: float [B, V]; top_k int64 [B]; top_p, min_p float32 [B]. ``num_candidates`` (a host int)
    bounds the work: it must be >= every active top_k, or V when some row has top-k off. Returns
    (values [B, C] descending, token ids [B, C]); the first candidate always survives.
    """
    vocab = logits.shape[-1]
    logits = logits.float()
    if num_candidates >= vocab:
        values, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        values, ids = torch.topk(logits, num_candidates, dim=-1)
    c = values.shape[-1]
    rank = torch.arange(c, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=c), torch.full_like(top_k, c))
    keep = rank < k[:, None]
    values = values.masked_fill(~keep, float("-inf"))
    # top-p: the shortest prefix whose mass reaches p (the token that crosses p stays, as in
    # llama.cpp). top_p >= 1 is exactly "off": fp32 cumsums can reach 1.0 before the tail.
    probs = torch.softmax(values, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = keep & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    # min-p: p_i >= min_p * p_max, i.e. logit_i >= logit_max + log(min_p) (log 0 = -inf: off).
    keep = keep & (values >= values[:, :1] + torch.log(min_p)[:, None])
    keep = keep | (rank == 0)
    return values.masked_fill(~keep, float("-inf")), ids


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    num_candidates: int | None,
) -> torch.Tensor:
    """One token per row, int64 [B]; all on the device, no host sync.

    ``num_candidates=None`` means every row is greedy (skips the filters entirely). Rows with
    temperature 0 are greedy in any case: ``argmax`` of the logits, first index on ties.
    """
    greedy = logits.argmax(dim=-1)
    if num_candidates is None:
        return greedy
    values, ids = filter_logits(logits, top_k, top_p, min_p, num_candidates)
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    u = hash_uniform(seed, step, ids)
    scores = values / safe_t[:, None] - torch.log(-torch.log(u))
    drawn = ids.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)
    return torch.where(temperature > 0, drawn, greedy)


class Sampler:
    """Per-row sampling parameters in device buffers, so a captured decode step can keep using them.

    ``set_params`` (host -> device copies, outside any graph) sets the rows; calling the sampler
    draws one token per row and advances each row's step counter on the device. Which code path runs
    (greedy only, top-k candidates, or a full sort) is decided on the host from the parameters it was
    given, so the engine can key its CUDA graphs by ``mode``.
    """

    def __init__(self, batch: int, device: torch.device | str) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.batch = batch
        self.device = torch.device(device)
        self.temperature = torch.zeros(batch, dtype=torch.float32, device=self.device)
        self.top_k = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.top_p = torch.ones(batch, dtype=torch.float32, device=self.device)
        self.min_p = torch.zeros(batch, dtype=torch.float32, device=self.device)
        self.seed = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.step = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.params: list[SamplingParams] = [GREEDY] * batch

    def set_params(self, params: SamplingParams | Sequence[SamplingParams]) -> list[int]:
        """Set every row (one params object for all, or one per row) and restart the step counters.

        Returns the seed of each row (drawn at random where ``seed`` is None).
        """
        rows = [params] * self.batch if isinstance(params, SamplingParams) else list(params)
        if len(rows) != self.batch:
            raise ValueError(f"expected {self.batch} SamplingParams, got {len(rows)}")
        seeds = [p.seed if p.seed is not None else secrets.randbits(63) for p in rows]
        self.temperature.copy_(torch.tensor([p.temperature for p in rows], dtype=torch.float32))
        self.top_k.copy_(torch.tensor([p.top_k for p in rows], dtype=torch.int64))
        self.top_p.copy_(torch.tensor([p.top_p for p in rows], dtype=torch.float32))
        self.min_p.copy_(torch.tensor([p.min_p for p in rows], dtype=torch.float32))
        self.seed.copy_(torch.tensor(seeds, dtype=torch.int64))
        self.step.zero_()
        self.params = rows
        return seeds

    def mode(self, vocab_size: int) -> int | None:
        """Host-side shape of the work: None when all rows are greedy, else the candidate count."""
        live = [p for p in self.params if not p.greedy]
        if not live:
            return None
        if any(p.top_k <= 0 for p in live):
            return vocab_size
        return min(vocab_size, max(p.top_k for p in live))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> tokens int64 [B]; advances the step counters (on the device)."""
        if logits.dim() != 2 or logits.shape[0] != self.batch:
            raise ValueError(f"logits must be [{self.batch}, V], got {tuple(logits.shape)}")
        tokens = sample(logits, self.temperature, self.top_k, self.top_p, self.min_p,
                        self.seed, self.step, self.mode(logits.shape[-1]))
        self.step += 1
        return tokens
