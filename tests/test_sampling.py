"""Sampler tests: greedy, each filter on hand-built distributions, reproducibility, frequencies."""

import math

import numpy as np
import pytest
import torch

from glmtg.sampling import GREEDY, Sampler, SamplingParams, filter_logits, hash_uniform


def _survivors(probs, top_k=0, top_p=1.0, min_p=0.0):
    logits = torch.tensor([math.log(p) for p in probs])[None, :]
    values, ids = filter_logits(logits, torch.tensor([top_k]), torch.tensor([top_p]),
                                torch.tensor([min_p]), len(probs))
    return sorted(ids[0][torch.isfinite(values[0])].tolist())


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(7, 1000)
    logits[3, 17] = logits[3, 900] = 50.0  # a tie: argmax's first index wins
    sampler = Sampler(7, "cpu")
    sampler.set_params(GREEDY)
    assert torch.equal(sampler(logits), logits.argmax(-1))
    assert sampler(logits)[3].item() == 17


def test_greedy_rows_mixed_with_sampled_rows():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    sampler = Sampler(4, "cpu")
    sampler.set_params([GREEDY, SamplingParams(seed=1), GREEDY, SamplingParams(top_k=0, seed=2)])
    out = sampler(logits)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_mask():
    probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    assert _survivors(probs, top_k=2) == [0, 1]
    assert _survivors(probs, top_k=0) == [0, 1, 2, 3, 4]
    assert _survivors(probs, top_k=99) == [0, 1, 2, 3, 4]


def test_top_p_mask_keeps_the_crossing_token():
    probs = [0.05, 0.4, 0.1, 0.3, 0.15]  # unsorted on purpose; ids refer to positions
    assert _survivors(probs, top_p=0.4) == [1]           # 0.4 reaches 0.4 (fp32: cumsum-p ~ 0)
    assert _survivors(probs, top_p=0.69) == [1, 3]
    assert _survivors(probs, top_p=0.71) == [1, 3, 4]
    assert _survivors(probs, top_p=1.0) == [0, 1, 2, 3, 4]
    assert _survivors(probs, top_p=0.0) == [1]            # the top token always survives


def test_top_p_applies_to_renormalised_top_k():
    probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    # after top-3 the mass is 0.85: 0.4/0.85 = 0.47, +0.3/0.85 -> 0.82 reaches 0.8
    assert _survivors(probs, top_k=3, top_p=0.8) == [0, 1]
    assert _survivors(probs, top_k=3, top_p=0.83) == [0, 1, 2]


def test_min_p_mask_is_relative_to_the_top_token():
    probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    assert _survivors(probs, min_p=0.3) == [0, 1, 2]      # keep p >= 0.12
    assert _survivors(probs, min_p=0.5) == [0, 1]         # keep p >= 0.2
    assert _survivors(probs, min_p=0.0) == [0, 1, 2, 3, 4]


def test_same_seed_same_tokens_and_step_advances():
    torch.manual_seed(2)
    logits = torch.randn(1, 300).expand(3, -1)
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a, b = Sampler(3, "cpu"), Sampler(3, "cpu")
    a.set_params(params)
    b.set_params(params)
    seq_a = [a(logits) for _ in range(20)]
    seq_b = [b(logits) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b, strict=True))
    assert len({tuple(x.tolist()) for x in seq_a}) > 10  # the step counter changes the draw
    # all rows share the seed, so all rows draw the same token: the row index plays no part
    assert all(len(set(x.tolist())) == 1 for x in seq_a)
    b.set_params(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=99))
    assert [b(logits)[0].item() for _ in range(20)] != [x[0].item() for x in seq_a]


def test_random_seed_is_drawn_and_reported():
    sampler = Sampler(2, "cpu")
    s1 = sampler.set_params(SamplingParams())
    s2 = sampler.set_params(SamplingParams())
    assert s1 != s2 and all(0 <= s < 2**63 for s in s1 + s2)


def test_hash_uniform_is_uniform():
    ids = torch.arange(200_000)[None, :]
    u = hash_uniform(torch.tensor([7]), torch.tensor([3]), ids)[0].double()
    assert 0 < u.min() and u.max() < 1
    # 20 bins of 10k expected each; 6 sigma (sqrt(10k) = 100) keeps the test free of flakes
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert (counts - 10_000).abs().max() < 600


def _reference(probs, temperature, top_k, top_p, min_p):
    """float64 llama.cpp chain: top-k, top-p and min-p at temperature 1, then temperature."""
    p = np.asarray(probs, np.float64)
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    kept = order[:top_k] if top_k > 0 else order
    q = p[kept] / p[kept].sum()
    n = len(kept)
    if top_p < 1.0:
        n = int(np.searchsorted(np.cumsum(q), top_p) + 1)
    kept = kept[:n]
    kept = kept[p[kept] >= min_p * p[kept[0]]]
    keep[kept] = True
    out = np.where(keep, p ** (1.0 / temperature), 0.0)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0),
    (0.7, 6, 0.9, 0.05),
    (1.6, 0, 0.75, 0.1),
])
def test_frequencies_match_filtered_distribution(temperature, top_k, top_p, min_p):
    probs = [0.3, 0.02, 0.2, 0.12, 0.1, 0.08, 0.07, 0.06, 0.05]
    expected = _reference(probs, temperature, top_k, top_p, min_p)
    n = 20_000
    logits = torch.tensor([math.log(p) for p in probs], dtype=torch.float32).expand(n, -1)
    sampler = Sampler(n, "cpu")
    # one draw from each of n seeds; the stream test below covers many steps of one seed
    sampler.set_params([SamplingParams(temperature, top_k, top_p, min_p, seed=s) for s in range(n)])
    counts = np.bincount(sampler(logits).numpy(), minlength=len(probs))
    sigma = np.sqrt(n * expected * (1 - expected))
    # 5 sigma per token (two-sided 6e-7 each): a failure is a bug, not bad luck
    assert np.all(np.abs(counts - n * expected) <= 5 * sigma + 1e-9), (counts, n * expected)
    assert np.all(counts[expected == 0] == 0)


def test_frequencies_along_one_seeds_stream():
    probs = [0.5, 0.25, 0.125, 0.125]
    logits = torch.tensor([[math.log(p) for p in probs]])
    sampler = Sampler(1, "cpu")
    sampler.set_params(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5))
    n = 4000
    draws = torch.stack([sampler(logits) for _ in range(n)]).flatten().numpy()
    counts = np.bincount(draws, minlength=4)
    expected = np.array(probs)
    sigma = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) <= 5 * sigma), counts


def test_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=-0.1)
