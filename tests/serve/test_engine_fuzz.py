"""A bounded random load on LLMEngine: arrivals, shared prefixes, aborts and a pool that forces
preemption. Nothing may be lost or mixed: every request that was not aborted produces exactly what it
produces alone; an aborted one a prefix of that; each request ends exactly once; all pages come back.
"""

from __future__ import annotations

import random

import pytest

from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
from glmtg.serve.sequence import SamplingSpec
from tests.references.fake_runner import VOCAB, FakeRunner, reference_run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_load_loses_and_mixes_nothing(seed):
    rng = random.Random(seed)
    eos = (rng.randrange(VOCAB),)
    bases = [[rng.randrange(VOCAB) for _ in range(16)] for _ in range(3)]
    reqs = []
    for i in range(24):
        p = rng.choice(bases)[:rng.randrange(0, 16)] + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 9))]
        reqs.append((f"r{i}", p, SamplingSpec(seed=rng.randrange(5)), rng.randrange(1, 40 - len(p) + 1)))
    ref = {rid: reference_run(p, s, m, eos) for rid, p, s, m in reqs}
    known = [p + ref[rid][0] for rid, p, _, _ in reqs]
    runner = FakeRunner(4, 14, 40, known)
    engine = LLMEngine(runner, SchedulerConfig(max_num_seqs=3, max_prefill_tokens=5, max_model_len=40,
                                               max_waiting=100), eos)
    pending, added, aborted, got, ended = list(reqs), [], set(), {}, {}
    for _ in range(3000):
        while pending and rng.random() < 0.3:
            engine.add_request(*pending[0])
            added.append(pending.pop(0)[0])
        if rng.random() < 0.04 and added:  # waiting, mid-prefill, decoding or already ended
            victim = rng.choice(added)
            if victim not in ended:
                aborted.add(victim)
            engine.abort(victim)
        for ev in engine.step():
            assert ev.request_id not in ended, f"{ev.request_id} reported after its end"
            if ev.token_id is not None:
                got.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.finished:
                ended[ev.request_id] = ev.finish_reason
        if not pending and not engine.has_unfinished():
            break
    assert not pending and not engine.has_unfinished()
    assert set(ended) == {r[0] for r in reqs}
    for rid, (tokens, reason) in ref.items():
        if rid in aborted:
            assert ended[rid] == "abort" and tokens[:len(got.get(rid, []))] == got.get(rid, [])
        else:
            assert (got[rid], ended[rid]) == (tokens, reason), rid
    st = engine.stats()
    assert st["kv_blocks_used"] == 0 and st["running"] == 0 and st["waiting"] == 0
    assert st["preemptions"] > 0 and st["prefix_hit_tokens"] > 0 and aborted  # all were exercised
