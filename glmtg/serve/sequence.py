"""The records passed between the serve layers, and one request's state as the scheduler sees it.

Torch-free on purpose: the scheduler and block manager are plain Python so that they can be tested
(and reasoned about) without a model; only the model runner turns these records into tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSpec:
    """What a request asks of the sampler; the runner turns it into tensors."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0  # always concrete (the API layer draws one when the request has none)


@dataclass(frozen=True)
class RunnerBatch:
    """One forward: either ONE prefill chunk row or several decode rows."""

    token_ids: list[list[int]]  # per row: the chunk's tokens (prefill) or [last token] (decode)
    start_positions: list[int]  # per row: tokens of that sequence already in the KV cache
    block_tables: list[list[int]]  # per row: the sequence's KV pages, in order
    sample: list[bool]  # per row: sample a next token after this row's last token?
    specs: list[SamplingSpec]  # per row
    steps: list[int]  # per row: tokens this sequence has generated so far (the sampler's step)


@dataclass
class TokenEvent:
    """What LLMEngine.step reports, one per request that advanced or ended."""

    request_id: str
    token_id: int | None  # None when the request ended without a new token (abort)
    finished: bool
    finish_reason: str | None  # "stop" (eos token), "length" (max_tokens or the context), "abort"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (not prefilled)


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued (also after preemption), holding pages, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request's tokens, KV pages and progress.

    token_ids is the whole history (prompt, then every sampled token). The K/V of the first
    num_computed tokens are in the pages of block_table; the last sampled token is never in the cache
    until the next decode step writes it. After a preemption the pages are gone and the history is
    recomputed as one long "prompt" (num_computed back to 0), so the outputs do not change.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec,
                 max_tokens: int) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.spec = spec
        self.max_tokens = max_tokens
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.prefilled = False  # True once the history up to the last token has been prefilled
        self.ever_admitted = False  # cached_tokens and the prompt counters are set on first admission
        self.cached_tokens = 0
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed}, "
                f"blocks={self.block_table}, status={self.status.value})")
