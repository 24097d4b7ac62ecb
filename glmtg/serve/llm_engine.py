"""The engine loop of glmtg serve: requests in, one runner call per step, TokenEvents out.

Torch-free: the model runner is any object with block_size, num_blocks, max_model_len and
run(RunnerBatch) -> list[int | None] (glmtg.serve.runner.ModelRunner on the GPU, a fake in tests).
Not thread-safe: the async layer calls every method from its one engine thread (or under one lock).
"""

from __future__ import annotations

from glmtg.serve.block_manager import BlockManager
from glmtg.serve.scheduler import ScheduledRow, Scheduler, SchedulerConfig
from glmtg.serve.sequence import RunnerBatch, SamplingSpec, Sequence, TokenEvent

__all__ = ["LLMEngine", "QueueFull", "SchedulerConfig"]


class QueueFull(Exception):
    """add_request found max_waiting requests already waiting (the server answers 503)."""


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class LLMEngine:
    """Continuous batching over a paged KV pool: see glmtg.serve.scheduler for the policy."""

    def __init__(self, runner, config: SchedulerConfig, eos_token_ids: tuple[int, ...]) -> None:
        for name in ("block_size", "num_blocks", "max_model_len"):
            if not _positive_int(getattr(runner, name, None)):
                raise ValueError(f"runner.{name} must be an integer >= 1, "
                                 f"got {getattr(runner, name, None)!r}")
        if not isinstance(config, SchedulerConfig):
            raise ValueError(f"config must be a SchedulerConfig, got {type(config).__name__}")
        eos = tuple(eos_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
            raise ValueError(f"eos_token_ids must be non-negative integers, got {eos_token_ids!r}")
        self.runner = runner
        self.config = config
        self.eos_token_ids = eos
        # The usable context is the smallest of the three limits. The pool's size is one of them:
        # a sequence larger than the whole pool could never finish (it would preempt itself forever).
        self.max_model_len = min(config.max_model_len, runner.max_model_len,
                                 runner.num_blocks * runner.block_size)
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size,
                                          config.enable_prefix_cache)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len, eos)
        self._active: dict[str, Sequence] = {}  # waiting or running, by request id
        self._pending_events: list[TokenEvent] = []  # aborts, reported by the next step

    def add_request(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec,
                    max_tokens: int) -> None:
        """Queue a request. ValueError names the bad argument; QueueFull when the queue is full."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._active:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError("prompt_ids must be a non-empty list of token ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt_ids):
            raise ValueError("prompt_ids must hold non-negative integer token ids")
        if not isinstance(spec, SamplingSpec):
            raise ValueError(f"spec must be a SamplingSpec, got {type(spec).__name__}")
        if not _positive_int(max_tokens):
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt_ids has {len(prompt_ids)} tokens; the context holds "
                             f"{self.max_model_len} (max_model_len), prompt included")
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens {max_tokens} with a prompt of {len(prompt_ids)} tokens "
                             f"exceeds max_model_len {self.max_model_len}")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests are waiting "
                            f"(max_waiting {self.config.max_waiting})")
        seq = Sequence(request_id, list(prompt_ids), spec, max_tokens)
        self._active[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """End a request now and free its pages; unknown or finished ids are ignored.

        The next step() reports it once, with finish_reason "abort" and no token.
        """
        seq = self._active.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.finish(seq, "abort")
        self._pending_events.append(self._event(seq, None))

    def has_unfinished(self) -> bool:
        """True while a request waits or runs, or an abort has not been reported yet."""
        return bool(self._active or self._pending_events)

    def step(self) -> list[TokenEvent]:
        """Run one forward (a prefill chunk or a decode batch) and report what it produced."""
        events, self._pending_events = self._pending_events, []
        rows = self.scheduler.schedule()
        if not rows:
            return events
        sampled = self.runner.run(self._batch(rows))
        if len(sampled) != len(rows):
            raise RuntimeError(f"runner returned {len(sampled)} tokens for {len(rows)} rows")
        for row, token in zip(rows, sampled):
            if row.sample and not (isinstance(token, int) and token >= 0):
                raise RuntimeError(f"runner returned {token!r} for a row that samples")
        for seq in self.scheduler.commit(rows, sampled):
            if seq.finished:
                del self._active[seq.request_id]
            events.append(self._event(seq, seq.token_ids[-1]))
        return events

    def stats(self) -> dict:
        """Gauges and running totals for /metrics (tokens counted once per request, not per recompute)."""
        s, bm = self.scheduler, self.block_manager
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "kv_blocks_used": bm.num_used,
            "kv_blocks_total": bm.num_blocks,
            "kv_usage": bm.usage,
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "preemptions": s.preemptions,
        }

    @staticmethod
    def _batch(rows: list[ScheduledRow]) -> RunnerBatch:
        return RunnerBatch(
            token_ids=[list(r.token_ids) for r in rows],
            start_positions=[r.start for r in rows],
            block_tables=[list(r.seq.block_table) for r in rows],
            sample=[r.sample for r in rows],
            specs=[r.seq.spec for r in rows],
            steps=[r.seq.num_generated for r in rows],
        )

    @staticmethod
    def _event(seq: Sequence, token_id: int | None) -> TokenEvent:
        return TokenEvent(seq.request_id, token_id, seq.finished, seq.finish_reason,
                          seq.num_prompt_tokens, seq.cached_tokens)
