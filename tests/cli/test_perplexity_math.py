"""Perplexity / KL-divergence math on synthetic values, and chunk scoring on the tiny model."""

import math

import numpy as np
import pytest
import torch

from glmtg.cli.perplexity import (
    KldBase,
    evaluate,
    kld_and_top1,
    kld_summary,
    perplexity_estimate,
    scored_per_chunk,
)
from glmtg.config import ModelConfig
from glmtg.engine import Engine
from glmtg.models.glm4_moe import Glm4MoeForCausalLM


def test_perplexity_estimate_is_llama_cpps_delta_method():
    ppl, err = perplexity_estimate(np.array([1.0, 2.0, 3.0, 4.0]))
    # mean 2.5, E[x^2] - mean^2 = 7.5 - 6.25 = 1.25, error = PPL * sqrt(1.25 / (N - 1))
    assert ppl == pytest.approx(math.exp(2.5), rel=1e-12)
    assert err == pytest.approx(math.exp(2.5) * math.sqrt(1.25 / 3), rel=1e-12)
    with pytest.raises(ValueError):
        perplexity_estimate(np.zeros(0))


def _logp(seed, n=6, v=50, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * scale, -1)


def test_kld_full_vocabulary_is_exact_and_top_k_is_a_lower_bound():
    p, q = _logp(0), _logp(1)
    exact = (p.exp() * (p - q)).sum(-1)
    values, ids = p.topk(50, dim=-1)
    full, _ = kld_and_top1(ids, values, q)
    torch.testing.assert_close(full, exact, rtol=1e-9, atol=1e-12)  # K = V: the tail is empty
    values, ids = p.topk(5, dim=-1)
    merged, _ = kld_and_top1(ids, values, q)
    # by hand: the 5 tokens plus one bucket for the other 45
    p_tail = 1 - values.exp().sum(-1)
    q_tail = 1 - q.gather(1, ids).exp().sum(-1)
    by_hand = (values.exp() * (values - q.gather(1, ids))).sum(-1) + p_tail * torch.log(p_tail / q_tail)
    torch.testing.assert_close(merged, by_hand, rtol=1e-9, atol=1e-12)
    assert torch.all(merged <= exact + 1e-12) and torch.all(merged >= -1e-12)


def test_kld_of_a_run_with_itself_is_zero_and_top1_agrees():
    p = _logp(2).float()
    values, ids = p.topk(8, dim=-1)
    kld, same = kld_and_top1(ids, values, p)
    assert torch.all(kld == 0) and torch.all(same)
    q = p.clone()
    q[0, ids[0, 0]] -= 10.0  # row 0's top token is no longer the top one
    _, same = kld_and_top1(ids, values, q)
    assert same.tolist() == [False] + [True] * 5


def test_kld_summary():
    s = kld_summary(np.array([0.0, 0.1, 0.2, 0.3]), np.array([True, True, False, True]))
    assert s["mean"] == pytest.approx(0.15) and s["max"] == 0.3 and s["min"] == 0.0
    assert s["same_top_pct"] == 75.0 and s["p50"] == pytest.approx(0.15)
    assert s["same_top_err_pct"] == pytest.approx(100 * math.sqrt(0.75 * 0.25 / 3))


def test_base_file_roundtrip_and_corrupt_file(tmp_path):
    n_ctx = 8
    rows = 2 * scored_per_chunk(n_ctx)
    base = KldBase(tokens=np.arange(16, dtype=np.int32), n_ctx=n_ctx, vocab_size=100,
                   top_ids=np.zeros((rows, 4), np.int32), top_logp=np.full((rows, 4), -2.0, np.float32),
                   target_logp=np.full(rows, -3.0, np.float32), model="m")
    base.save(tmp_path / "b.kld")
    back = KldBase.load(tmp_path / "b.kld")
    assert back.n_ctx == 8 and back.vocab_size == 100 and np.array_equal(back.tokens, base.tokens)
    (tmp_path / "bad.kld").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        KldBase.load(tmp_path / "bad.kld")
    with pytest.raises(FileNotFoundError):
        KldBase.load(tmp_path / "missing.kld")


@pytest.fixture(scope="module")
def tiny32():
    cfg = ModelConfig.preset("tiny")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Glm4MoeForCausalLM.random(cfg, seed=0, dtype=torch.float32, device=device), cfg


def _engine(model, cfg, n_ctx, ubatch):
    # the torch attention path keeps the fp32 model in fp32 for any chunking (see tests/engine)
    return Engine(model, cfg, ctx_size=n_ctx, ubatch=ubatch, attn_backend="sdpa", use_cuda_graph=False)


def test_evaluate_scores_the_second_half_of_each_chunk(tiny32):
    model, cfg = tiny32
    tokens = torch.randint(0, cfg.vocab_size, (19,), generator=torch.Generator().manual_seed(4)).tolist()
    n_ctx = 8
    result = evaluate(_engine(model, cfg, n_ctx, 3), tokens, n_ctx, save_top_k=4)
    # by hand: each chunk from an empty cache, positions 4..6 predict tokens 5..7; the 3 tokens left over
    # after two whole chunks are not used
    want = []
    for c in range(2):
        chunk = tokens[c * 8:(c + 1) * 8]
        e = _engine(model, cfg, n_ctx, 8)
        logits = []
        e.prefill(chunk, on_logits=lambda s, lg, out=logits: out.append(lg))
        logp = torch.log_softmax(logits[0][0], -1)
        want += [-float(logp[j, chunk[j + 1]]) for j in range(4, 7)]
    np.testing.assert_allclose(result.nll, want, rtol=1e-4)
    assert len(result.running_ppl) == 2
    assert result.running_ppl[-1] == pytest.approx(math.exp(np.mean(want)), rel=1e-4)
    assert result.base.top_ids.shape == (6, 4) and result.base.tokens.size == 16
    # comparing the run with its own base: KLD 0, top-1 100 %
    again = evaluate(_engine(model, cfg, n_ctx, 3), tokens, n_ctx, base=result.base)
    assert np.all(again.kld == 0) and np.all(again.same_top)
    with pytest.raises(ValueError, match="at least 16 tokens"):
        evaluate(_engine(model, cfg, n_ctx, 3), tokens[:15], n_ctx)
