"""Perplexity: llama.cpp's estimate on synthetic values, and chunk scoring on the tiny model (fp32)."""

import math

import numpy as np
import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.engine import Engine, EngineConfig
from glmtg.eval.perplexity import evaluate, perplexity_estimate
from glmtg.loading.presets import random_model


def test_perplexity_estimate_is_llama_cpps_delta_method():
    ppl, err = perplexity_estimate(np.array([1.0, 2.0, 3.0, 4.0]))
    # mean 2.5, E[x^2] - mean^2 = 7.5 - 6.25 = 1.25, error = PPL * sqrt(1.25 / (N - 1))
    assert ppl == pytest.approx(math.exp(2.5), rel=1e-12)
    assert err == pytest.approx(math.exp(2.5) * math.sqrt(1.25 / 3), rel=1e-12)
    with pytest.raises(ValueError):
        perplexity_estimate(np.zeros(0))


@pytest.fixture(scope="module")
def tiny32():
    cfg = ModelConfig.preset("tiny")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return random_model(cfg, seed=0, dtype=torch.float32, device=device), cfg


def _engine(model, cfg, n_ctx, ubatch):
    # the torch attention path keeps the fp32 model in fp32 for any chunking (see tests/test_engine.py)
    return Engine(model, cfg, EngineConfig(ctx_size=n_ctx, ubatch=ubatch, attn_backend="sdpa", use_cuda_graph=False))


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


@pytest.mark.parametrize("kwargs, match", [
    (dict(save_top_k=1001), r"save_top_k must be in \[1, 1000\]"),
    (dict(save_top_k=0), "save_top_k"),
    (dict(n_chunks=0), "n_chunks"),
])
def test_arguments_are_checked_before_any_chunk_runs(tiny32, kwargs, match):
    model, cfg = tiny32
    engine = _engine(model, cfg, 8, 8)
    calls = []
    engine.prefill = lambda *a, **k: calls.append(a)  # any chunk would come through here
    with pytest.raises(ValueError, match=match):
        evaluate(engine, list(range(16)), 8, **kwargs)
    assert calls == []


def test_nan_logits_are_counted(tiny32):
    model, cfg = tiny32
    broken = random_model(cfg, seed=0, dtype=torch.float32, device=next(model.parameters()).device)
    broken.norm.weight.data[0] = float("nan")  # the final norm: every logit becomes NaN
    result = evaluate(_engine(broken, cfg, 8, 8), list(range(16)), 8)
    assert result.non_finite == result.nll.size == 6
    good = evaluate(_engine(model, cfg, 8, 8), list(range(16)), 8)
    assert good.non_finite == 0
