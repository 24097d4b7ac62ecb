"""Which sequences run in the next forward: admission, chunked prefill, decode, preemption.

nano-vllm's shape, plus chunked prefill. A waiting request is admitted (FIFO, no overtaking) when
fewer than max_num_seqs run and the block manager can hold its history; its cached prefix is not
prefilled. Each forward is either one prefill chunk of the oldest running sequence that still needs
prefill, or one decode step of every running sequence that has finished prefill; while both kinds
have work they alternate, so running streams keep flowing while a long prompt is prefilled.
When a decode step needs a page and none is free, the most recently admitted running sequence is
preempted: its pages are freed and it goes back to the front of the queue, to be recomputed from its
whole history later (the oldest sequence always progresses, so preemption cannot livelock).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from glmtg.serve.block_manager import BlockManager
from glmtg.serve.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Engine limits (re-exported by glmtg.serve.llm_engine, where the CLI builds it)."""

    max_num_seqs: int = 4  # --parallel
    max_prefill_tokens: int = 512  # chunk size
    max_model_len: int = 4096  # -c
    max_waiting: int = 64  # --max-queue (add_request raises QueueFull beyond it)
    enable_prefix_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefill_tokens", "max_model_len", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class ScheduledRow:
    """One row of the next forward: the tokens to feed for seq, from position start."""

    seq: Sequence
    token_ids: list[int]
    start: int
    sample: bool


class Scheduler:
    """Queue, running set and batch choice; the engine turns its rows into a RunnerBatch."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 eos_token_ids: tuple[int, ...]) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._last_was_prefill = False
        # Totals for stats(); prompt and cache counts are taken at a request's first admission.
        self.prompt_tokens = 0
        self.prefix_hit_tokens = 0
        self.generated_tokens = 0
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq wherever it is (queue or running) and free its pages at once."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> list[ScheduledRow]:
        """Rows of the next forward (empty when there is nothing to run)."""
        self._admit()
        ready = any(s.prefilled for s in self.running)
        pending = self._first_pending()
        if ready and (pending is None or self._last_was_prefill):
            rows = self._decode_rows()
            if rows:
                self._last_was_prefill = False
                return rows
            # Every decode-ready sequence was preempted; freed pages may admit someone to prefill.
            self._admit()
            pending = self._first_pending()
        if pending is None:
            return []
        self._last_was_prefill = True
        start = pending.num_computed
        end = min(pending.num_tokens, start + self.config.max_prefill_tokens)
        return [ScheduledRow(pending, pending.token_ids[start:end], start, end == pending.num_tokens)]

    def commit(self, rows: list[ScheduledRow], sampled: list[int | None]) -> list[Sequence]:
        """Apply the runner's output: mark K/V written, append sampled tokens, finish sequences.

        Returns the sequences that received a token, in row order (some may now be finished).
        """
        advanced = []
        for row, token in zip(rows, sampled):
            seq = row.seq
            self.block_manager.mark_computed(seq, row.start + len(row.token_ids))
            if not row.sample:
                continue
            seq.prefilled = True
            seq.token_ids.append(token)
            self.generated_tokens += 1
            if token in self.eos_token_ids:
                self.finish(seq, "stop")
            elif seq.num_generated >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                self.finish(seq, "length")
            advanced.append(seq)
        return advanced

    def _first_pending(self) -> Sequence | None:
        return next((s for s in self.running if not s.prefilled), None)

    def _admit(self) -> None:
        """Move waiting sequences to running while slots and pages allow (FIFO: the head blocks)."""
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.prefilled = False
            self.running.append(seq)
            if not seq.ever_admitted:
                seq.ever_admitted = True
                seq.cached_tokens = seq.num_computed
                self.prompt_tokens += seq.num_prompt_tokens
                self.prefix_hit_tokens += seq.num_computed

    def _decode_rows(self) -> list[ScheduledRow]:
        """One decode row per prefilled running sequence, preempting the newest when pages run out."""
        rows = []
        for seq in [s for s in self.running if s.prefilled]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while not self.block_manager.append_slot(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                rows.append(ScheduledRow(seq, [seq.token_ids[-1]], seq.num_computed, True))
        return rows

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.prefilled = False
        self.waiting.appendleft(seq)
        self.preemptions += 1
