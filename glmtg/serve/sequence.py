"""What the scheduler hands the model runner (torch-free).

Placeholder holding only the two classes the runner needs, exactly as SERVE.md gives them; the
scheduler helper's sequence.py replaces this file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSpec:            # what a request asks for; the runner turns it into tensors
    temperature: float = 1.0   # 0 = greedy
    top_k: int = 0             # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0              # always concrete (the API layer draws one when the request has none)


@dataclass(frozen=True)
class RunnerBatch:             # one forward: either ONE prefill chunk row or several decode rows
    token_ids: list[list[int]]     # per row: the chunk's tokens (prefill) or [last token] (decode)
    start_positions: list[int]     # per row: tokens of that sequence already in the KV cache
    block_tables: list[list[int]]  # per row: the sequence's KV pages, in order (page p holds positions p*bs .. p*bs+bs-1)
    sample: list[bool]             # per row: sample a next token after this row's last token?
    specs: list[SamplingSpec]      # per row
    steps: list[int]               # per row: how many tokens this sequence has generated so far (the sampler's step)
