"""Shared request types of the serving engine (torch-free).

Placeholder holding only the two types the HTTP layer uses; the scheduler's version of this file
(with RunnerBatch and the sequence state) replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSpec:
    """What a request asks for; the runner turns it into tensors."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0  # always concrete (the API layer draws one when the request has none)


@dataclass
class TokenEvent:
    """What LLMEngine.step reports, one per request that advanced or ended."""

    request_id: str
    token_id: int | None  # None when the request ended without a new token
    finished: bool
    finish_reason: str | None  # "stop" (eos token), "length" (max_tokens or the context), "abort"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (not prefilled)
