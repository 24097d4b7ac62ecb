"""Scheduler policy: FIFO admission, the prefill/decode alternation, preemption order, finishing.

The rows are checked directly (no runner): sampled tokens are made up by the test, since only the
bookkeeping is under test here; tests/serve/test_llm_engine.py checks outputs end to end.
"""

from __future__ import annotations

from glmtg.serve.block_manager import BlockManager
from glmtg.serve.scheduler import Scheduler, SchedulerConfig
from glmtg.serve.sequence import SamplingSpec, Sequence, SequenceStatus


def make(blocks=32, bs=4, eos=(), **cfg):
    config = SchedulerConfig(**cfg)
    return Scheduler(config, BlockManager(blocks, bs), config.max_model_len, eos)


def seq(rid, n, max_tokens=50):
    return Sequence(rid, [(7 * i + len(rid)) % 91 + 1 for i in range(n)], SamplingSpec(), max_tokens)


def step(s, token=5):
    """One schedule + commit with every sampling row given `token`; returns the rows."""
    rows = s.schedule()
    s.commit(rows, [token if r.sample else None for r in rows])
    return rows


def test_fifo_admission_head_blocks():
    s = make(blocks=6, max_num_seqs=3)
    a, big, c = seq("a", 5), seq("big", 20), seq("c", 3)  # 2, 5 and 1 pages of the 6
    for x in (a, big, c):
        s.add(x)
    step(s)
    assert s.running == [a] and list(s.waiting) == [big, c]  # c would fit but does not overtake big
    s.finish(a, "abort")
    step(s)
    assert s.running == [big, c] and not s.waiting and s.block_manager.num_free == 0


def test_seat_limit():
    s = make(max_num_seqs=2)
    xs = [seq(f"r{i}", 3) for i in range(3)]
    for x in xs:
        s.add(x)
    step(s)
    assert s.running == xs[:2] and list(s.waiting) == xs[2:]


def test_prefill_chunks_alternate_with_decode():
    s = make(max_prefill_tokens=4)
    a = seq("a", 3)
    s.add(a)
    step(s)  # a prefilled, sampled
    b = seq("b", 14)
    s.add(b)
    kinds = []
    for _ in range(9):
        rows = step(s)
        kinds.append("D" if rows[0].seq is a and len(rows[0].token_ids) == 1 and rows[0].sample
                     else f"P{rows[0].start}")
    # a's prefill came last, so a decode step first; then b's 4 chunks, each followed by a decode
    # step, and after b's last chunk (which samples) both decode together.
    assert kinds == ["D", "P0", "D", "P4", "D", "P8", "D", "P12", "D"]
    assert [r.seq for r in rows] == [a, b]


def test_preemption_takes_the_newest_and_requeues_it_first():
    s = make(blocks=6, bs=2, max_num_seqs=4)
    xs = [seq(x, 3) for x in "abcw"]
    for x in xs:
        s.add(x)
    for _ in range(30):
        before = list(s.running)
        rows = step(s)
        if s.preemptions:
            break
    assert s.preemptions == 1 and len(before) == 3  # w never got pages: 3 sequences fill the pool
    victim = before[-1]  # the most recently admitted
    assert s.waiting[0] is victim and list(s.waiting)[1:] == [xs[3]]
    assert [r.seq for r in rows] == [x for x in before[:-1] if x.prefilled] and rows
    assert victim.block_table == [] and victim.num_computed == 0 and not victim.prefilled
    assert victim.status is SequenceStatus.WAITING and victim.num_tokens >= 3
    assert s.block_manager.num_used == sum(len(x.block_table) for x in s.running)
    while s.running or s.waiting:  # the oldest always progresses: everything finishes
        step(s)
        if all(x.num_generated >= 4 for x in s.running):
            for x in list(s.running):
                s.finish(x, "length")
    assert s.block_manager.num_used == 0


def test_commit_finishes_on_eos_max_tokens_and_context():
    def run(x, eos_at=None):
        s = make(eos=(9,), max_model_len=8)
        s.add(x)
        while not x.finished:
            step(s, token=9 if x.num_generated == eos_at else 5)
        assert s.running == [] and s.block_manager.num_used == 0
        return x.finish_reason, x.num_generated

    assert run(seq("a", 2, max_tokens=5), eos_at=2) == ("stop", 3)  # the eos token is kept
    assert run(seq("b", 2, max_tokens=3)) == ("length", 3)
    assert run(seq("c", 5, max_tokens=50)) == ("length", 3)  # the context (8), not max_tokens
