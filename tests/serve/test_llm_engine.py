"""LLMEngine against a fake runner: every output equals the same request run alone.

The fake runner (tests/references/fake_runner.py) reads each row's history back from a fake page
store through the block table the engine sent, so batching, chunking, prefix reuse and preemption are
checked through the tokens they produce, not by peeking at engine internals. Exact comparisons: the
fake model is integer arithmetic.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from glmtg.serve.llm_engine import LLMEngine, QueueFull, SchedulerConfig
from glmtg.serve.sequence import SamplingSpec
from tests.references.fake_runner import VOCAB, FakeRunner, drain, reference_run


def make(bs=4, blocks=64, model_len=256, known=None, eos=(), **cfg):
    runner = FakeRunner(bs, blocks, model_len, known)
    cfg.setdefault("max_model_len", model_len)
    return LLMEngine(runner, SchedulerConfig(**cfg), eos), runner


def prompt(rng, n):
    return [rng.randrange(VOCAB) for _ in range(n)]


def expected(reqs, eos=()):
    """id -> (tokens, reason) of each (id, prompt, spec, max_tokens) run alone, and full histories."""
    ref = {rid: reference_run(p, s, m, eos) for rid, p, s, m in reqs}
    known = [p + ref[rid][0] for rid, p, _, _ in reqs]
    return ref, known


def check(results, ref):
    for rid, (tokens, reason) in ref.items():
        assert results[rid]["tokens"] == tokens, rid
        assert results[rid]["reason"] == reason, rid


def test_single_request():
    rng = random.Random(1)
    reqs = [("a", prompt(rng, 11), SamplingSpec(seed=5), 9)]
    ref, known = expected(reqs)
    engine, _ = make(known=known)
    engine.add_request(*reqs[0])
    res = drain(engine)
    check(res, ref)
    evs = res["a"]["events"]
    assert [e.finished for e in evs] == [False] * 8 + [True]
    assert all(e.prompt_tokens == 11 and e.cached_tokens == 0 for e in evs)
    st = engine.stats()
    assert (st["kv_blocks_used"], st["running"], st["waiting"]) == (0, 0, 0)
    assert (st["prompt_tokens"], st["generated_tokens"], st["kv_blocks_total"]) == (11, 9, 64)


def test_many_concurrent_requests_equal_alone():
    rng = random.Random(2)
    reqs = [(f"r{i}", prompt(rng, rng.randrange(1, 30)), SamplingSpec(seed=i), rng.randrange(1, 25))
            for i in range(9)]
    ref, known = expected(reqs)
    engine, runner = make(known=known, max_num_seqs=4, max_prefill_tokens=7)
    for r in reqs[:6]:
        engine.add_request(*r)
    res = {}
    for _ in range(10):
        for ev in engine.step():
            res.setdefault(ev.request_id, {"tokens": [], "reason": None, "events": []})
            res[ev.request_id]["tokens"].append(ev.token_id)
            if ev.finished:
                res[ev.request_id]["reason"] = ev.finish_reason
    for r in reqs[6:]:  # arrivals while others are mid-flight
        engine.add_request(*r)
    drain(engine, res)
    check(res, ref)
    assert max(len(b.token_ids) for b in runner.log) == 4  # decode really was batched, capped at 4
    assert engine.stats()["kv_blocks_used"] == 0


def test_chunked_prefill():
    rng = random.Random(3)
    reqs = [("a", prompt(rng, 30), SamplingSpec(seed=1), 3)]
    ref, known = expected(reqs)
    engine, runner = make(known=known, max_prefill_tokens=8)
    engine.add_request(*reqs[0])
    check(drain(engine), ref)
    chunks = [(b.start_positions[0], len(b.token_ids[0]), b.sample[0]) for b in runner.log[:4]]
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True)]
    assert [b.start_positions for b in runner.log[4:]] == [[30], [31]]


def test_running_stream_advances_between_chunks_of_a_new_prompt():
    rng = random.Random(4)
    reqs = [("a", prompt(rng, 5), SamplingSpec(seed=1), 40),
            ("b", prompt(rng, 50), SamplingSpec(seed=2), 4)]
    ref, known = expected(reqs)
    engine, runner = make(known=known, max_prefill_tokens=8)
    engine.add_request(*reqs[0])
    for _ in range(3):
        engine.step()
    engine.add_request(*reqs[1])
    first = len(runner.log)
    res = drain(engine)
    assert res["b"]["tokens"] == ref["b"][0] and res["a"]["tokens"] == ref["a"][0][3:]
    a_page = runner.log[0].block_tables[0][0]
    # Batch kinds after b arrived: "B" = a prefill chunk of b, "a" = a decode batch holding a's row.
    kinds = ["B" if b.block_tables[0][0] != a_page and b.start_positions[0] < 50
             else "a" if a_page in [t[0] for t in b.block_tables] else "-"
             for b in runner.log[first:]]
    chunks = [i for i, k in enumerate(kinds) if k == "B"]
    assert len(chunks) == 7  # ceil(50 / 8)
    assert all(kinds[i + 1] == "a" for i in chunks[:-1]), kinds


def test_prefix_cache_hits_report_cached_tokens_and_keep_outputs():
    rng = random.Random(5)
    base = prompt(rng, 14)  # 3 full blocks of 4 and 2 tokens
    other = base[:10] + [(base[10] + 1) % VOCAB] + prompt(rng, 6)  # shares 2 full blocks, then differs
    reqs = [("a", base, SamplingSpec(seed=1), 5), ("b", other, SamplingSpec(seed=2), 5),
            ("c", base, SamplingSpec(seed=3), 5), ("d", base[:12], SamplingSpec(seed=4), 5)]
    ref, known = expected(reqs)
    engine, runner = make(known=known, max_prefill_tokens=5)
    res, first_start = {}, {}
    for r in reqs:  # one after another: each sees what the earlier ones left in the cache
        engine.add_request(*r)
        n = len(runner.log)
        drain(engine, res)
        first_start[r[0]] = runner.log[n].start_positions[0]
        assert engine.stats()["kv_blocks_used"] == 0
    check(res, ref)
    # c: 3 full blocks cached (the 4th block holds the last token); d: a 12-token prompt may reuse
    # only 2 blocks because the block holding its last token must be computed.
    cached = {rid: r["events"][-1].cached_tokens for rid, r in res.items()}
    assert cached == {"a": 0, "b": 8, "c": 12, "d": 8}
    assert first_start == cached  # prefill really starts after the cached tokens
    assert engine.stats()["prefix_hit_tokens"] == 28


def test_prefix_cache_off_and_no_hit_on_uncomputed_blocks():
    rng = random.Random(6)
    p = prompt(rng, 40)
    reqs = [("a", p, SamplingSpec(seed=1), 3), ("b", p, SamplingSpec(seed=2), 3)]
    ref, known = expected(reqs)
    engine, _ = make(known=known, max_prefill_tokens=8)
    engine.add_request(*reqs[0])
    engine.step()  # a has 8 tokens (2 blocks) computed; its other pages are still empty
    engine.add_request(*reqs[1])
    res = drain(engine)
    check(res, ref)
    assert res["b"]["events"][0].cached_tokens == 8
    engine, _ = make(known=known, enable_prefix_cache=False)
    for r in reqs:
        engine.add_request(*r)
    res = drain(engine)
    check(res, ref)
    assert {e.cached_tokens for r in res.values() for e in r["events"]} == {0}


def test_abort_mid_prefill_mid_decode_and_waiting_frees_pages():
    rng = random.Random(7)
    reqs = [("dec", prompt(rng, 6), SamplingSpec(seed=2), 30),
            ("keep", prompt(rng, 9), SamplingSpec(seed=3), 12),
            ("pre", prompt(rng, 40), SamplingSpec(seed=1), 5),
            ("wait", prompt(rng, 5), SamplingSpec(seed=4), 3)]
    ref, known = expected(reqs)
    engine, runner = make(known=known, max_num_seqs=3, max_prefill_tokens=8)
    for r in reqs:
        engine.add_request(*r)
    res = {}
    for _ in range(8):  # dec and keep are decoding, pre is part-way through its prompt
        for e in engine.step():
            res.setdefault(e.request_id, []).append(e)
    assert "pre" not in res and runner.log[-2].token_ids == [reqs[2][1][:8]]  # pre's first chunk
    assert engine.stats()["running"] == 3 and engine.stats()["waiting"] == 1
    used = engine.stats()["kv_blocks_used"]
    engine.abort("pre")
    engine.abort("wait")
    engine.abort("nope")  # unknown ids are ignored
    assert engine.stats()["kv_blocks_used"] == used - 10  # pre's 40-token prompt held 10 pages
    assert engine.stats()["waiting"] == 0
    evs = engine.step()
    aborted = [e for e in evs if e.finish_reason == "abort"]
    assert [(e.request_id, e.token_id, e.finished) for e in aborted] == [("pre", None, True),
                                                                         ("wait", None, True)]
    engine.abort("dec")
    engine.abort("dec")  # twice: the second is ignored
    final = drain(engine)
    assert [e.finish_reason for e in final["dec"]["events"]] == ["abort"]
    assert [e.request_id for e in evs if e.request_id in ("pre", "wait")] == ["pre", "wait"]
    tokens = [e.token_id for e in res["keep"] + [e for e in evs if e.request_id == "keep"]]
    assert tokens + final["keep"]["tokens"] == ref["keep"][0]
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished()
    engine.add_request("pre", reqs[2][1], reqs[2][2], 5)  # an ended id may be used again
    assert drain(engine)["pre"]["tokens"] == ref["pre"][0]


def test_preemption_under_a_tiny_pool_keeps_outputs():
    rng = random.Random(8)
    reqs = [(f"r{i}", prompt(rng, rng.randrange(3, 9)), SamplingSpec(seed=i), rng.randrange(8, 14))
            for i in range(5)]
    ref, known = expected(reqs)
    # 6 pages of 4 = 24 tokens: each request fits alone (<= 22 tokens), not all together.
    engine, _ = make(known=known, blocks=6, model_len=24, max_num_seqs=4, max_prefill_tokens=4)
    for r in reqs:
        engine.add_request(*r)
    check(drain(engine), ref)
    st = engine.stats()
    assert st["preemptions"] > 0 and st["kv_blocks_used"] == 0
    assert st["prompt_tokens"] == sum(len(p) for _, p, _, _ in reqs)  # counted once, not per recompute
    assert st["generated_tokens"] >= sum(len(t) for t, _ in ref.values())


def test_max_tokens_and_eos():
    rng = random.Random(9)
    p = prompt(rng, 7)
    spec = SamplingSpec(seed=3)
    plain, _ = reference_run(p, spec, 20)
    k = next(i for i in range(3, 20) if plain[i] not in plain[:i])  # first new token from step 3
    eos = (plain[k], VOCAB + 5)
    engine, _ = make(eos=eos)
    engine.add_request("e", p, spec, 20)
    engine.add_request("m", p, spec, k)  # stops by length one token before the eos
    res = drain(engine)
    assert res["e"]["tokens"] == plain[:k + 1] and res["e"]["reason"] == "stop"
    assert res["m"]["tokens"] == plain[:k] and res["m"]["reason"] == "length"


def test_context_limit():
    rng = random.Random(10)
    p = prompt(rng, 10)
    engine, _ = make(model_len=24)
    engine.add_request("a", p, SamplingSpec(), 14)  # exactly the context
    res = drain(engine)
    assert len(res["a"]["tokens"]) == 14 and res["a"]["reason"] == "length"
    with pytest.raises(ValueError, match="max_tokens 15 .* max_model_len 24"):
        engine.add_request("b", p, SamplingSpec(), 15)
    with pytest.raises(ValueError, match="prompt_ids has 24 tokens"):
        engine.add_request("c", prompt(rng, 24), SamplingSpec(), 1)
    # The usable context is the least of the config, the runner and the pool (5 pages of 4 = 20).
    assert make(model_len=30, blocks=5, max_model_len=28)[0].max_model_len == 20
    assert make(model_len=30, blocks=50, max_model_len=28)[0].max_model_len == 28
    assert make(model_len=26, blocks=50, max_model_len=28)[0].max_model_len == 26


def test_queue_full():
    engine, _ = make(max_num_seqs=1, max_waiting=2)
    engine.add_request("a", [1, 2], SamplingSpec(), 3)
    engine.add_request("b", [1, 2], SamplingSpec(), 3)
    with pytest.raises(QueueFull):
        engine.add_request("c", [1, 2], SamplingSpec(), 3)
    engine.step()  # a is admitted, so one place frees up
    engine.add_request("c", [1, 2], SamplingSpec(), 3)
    with pytest.raises(QueueFull):
        engine.add_request("d", [1, 2], SamplingSpec(), 3)
    assert set(drain(engine)) == {"a", "b", "c"}


@pytest.mark.parametrize("args, match", [
    (("", [1], SamplingSpec(), 1), "request_id"),
    ((3, [1], SamplingSpec(), 1), "request_id"),
    (("x", [], SamplingSpec(), 1), "prompt_ids"),
    (("x", [1, -2], SamplingSpec(), 1), "prompt_ids"),
    (("x", [1, 2.0], SamplingSpec(), 1), "prompt_ids"),
    (("x", "ab", SamplingSpec(), 1), "prompt_ids"),
    (("x", [1], {"temperature": 0}, 1), "spec"),
    (("x", [1], SamplingSpec(), 0), "max_tokens"),
    (("x", [1], SamplingSpec(), True), "max_tokens"),
    (("x", [1], SamplingSpec(), 2.5), "max_tokens"),
    (("dup", [1], SamplingSpec(), 1), "already in use"),
])
def test_bad_add_request_arguments(args, match):
    engine, _ = make()
    engine.add_request("dup", [3], SamplingSpec(), 2)
    with pytest.raises(ValueError, match=match):
        engine.add_request(*args)
    assert engine.stats()["waiting"] == 1  # nothing was queued


@pytest.mark.parametrize("field", ["max_num_seqs", "max_prefill_tokens", "max_model_len", "max_waiting"])
def test_bad_config(field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: 0})


def test_core_imports_without_torch():
    code = ("import sys, glmtg.serve.scheduler, glmtg.serve.block_manager, glmtg.serve.sequence, "
            "glmtg.serve.llm_engine; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
