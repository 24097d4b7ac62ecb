"""A fake model runner for the serve engine tests, with a fake paged KV store that it checks.

The "model" is a deterministic function of the whole token history, the request's seed and the
sampler step, so any request's output can be computed alone (reference_run) and compared with what
the engine produced under batching, chunking, prefix reuse and preemption. The runner never sees the
history directly: it reads it back from its page store through the row's block table, so a wrong
block table, a page reused while still needed, or a skipped prefill changes the output (and a read of
a slot nothing wrote fails at once).
"""

from __future__ import annotations

from glmtg.serve.sequence import RunnerBatch, SamplingSpec

VOCAB = 97  # prime, so the hash below spreads over every token id


def next_token(history: list[int], spec: SamplingSpec, step: int) -> int:
    """The fake model: order-sensitive hash of the history, mixed with the seed and the step."""
    h = 0
    for t in history:
        h = (h * 131 + t + 1) % 1_000_003
    return (h + 7 * spec.seed + 13 * step) % VOCAB


def reference_run(prompt: list[int], spec: SamplingSpec, max_tokens: int,
                  eos: tuple[int, ...] = ()) -> tuple[list[int], str]:
    """What one request alone must produce: its tokens and finish reason."""
    history, out = list(prompt), []
    while True:
        t = next_token(history, spec, len(out))
        out.append(t)
        history.append(t)
        if t in eos:
            return out, "stop"
        if len(out) >= max_tokens:
            return out, "length"


class FakeRunner:
    """ModelRunner stand-in: checks each batch's metadata against its page store, then samples."""

    def __init__(self, block_size: int, num_blocks: int, max_model_len: int,
                 known: list[list[int]] | None = None) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.known = known  # full expected histories; every row's history must prefix one of them
        self.store: dict[tuple[int, int], int] = {}
        self.log: list[RunnerBatch] = []

    def run(self, batch: RunnerBatch) -> list[int | None]:
        self.log.append(batch)
        n = len(batch.token_ids)
        assert n >= 1 and all(len(f) == n for f in (batch.start_positions, batch.block_tables,
                                                    batch.sample, batch.specs, batch.steps))
        if n > 1:  # a decode batch: one token per row, each sampled
            assert all(len(t) == 1 for t in batch.token_ids) and all(batch.sample)
        bs = self.block_size
        written: set[tuple[int, int]] = set()
        out: list[int | None] = []
        for tokens, start, table, sample, spec, step in zip(
                batch.token_ids, batch.start_positions, batch.block_tables, batch.sample,
                batch.specs, batch.steps):
            assert tokens and len(set(table)) == len(table), table
            assert all(0 <= p < self.num_blocks for p in table), table
            end = start + len(tokens)
            assert end <= self.max_model_len and end <= len(table) * bs, (start, len(tokens), table)

            def slot(pos: int, table: list[int] = table) -> tuple[int, int]:
                return table[pos // bs], pos % bs

            missing = [p for p in range(start) if slot(p) not in self.store]
            assert not missing, f"positions {missing[:5]} read before they were written"
            history = [self.store[slot(p)] for p in range(start)] + list(tokens)
            for pos, t in zip(range(start, end), tokens):
                assert slot(pos) not in written, "two rows wrote one slot"
                written.add(slot(pos))
                self.store[slot(pos)] = t
            if self.known is not None:
                assert any(k[:len(history)] == history for k in self.known), "history not expected"
            out.append(next_token(history, spec, step) if sample else None)
        return out


def drain(engine, results: dict | None = None, max_steps: int = 10_000) -> dict[str, dict]:
    """Step engine until it has nothing left; per request: tokens, finish reason, events."""
    results = {} if results is None else results
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return results
        for ev in engine.step():
            r = results.setdefault(ev.request_id, {"tokens": [], "reason": None, "events": []})
            assert r["reason"] is None, f"event after the end of {ev.request_id}"
            r["events"].append(ev)
            if ev.token_id is not None:
                r["tokens"].append(ev.token_id)
            if ev.finished:
                r["reason"] = ev.finish_reason
    raise AssertionError(f"engine still busy after {max_steps} steps")
