"""KL-divergence math on synthetic float64 log-probabilities, and the base file format."""

import math

import numpy as np
import pytest
import torch

from glmtg.eval.chunking import scored_per_chunk
from glmtg.eval.kld import KldBase, kld_and_top1, kld_summary


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


def _base(n_ctx=8, k=4, vocab=100):
    rows = 2 * scored_per_chunk(n_ctx)
    return KldBase(tokens=np.arange(2 * n_ctx, dtype=np.int32) % vocab, n_ctx=n_ctx, vocab_size=vocab,
                   top_ids=np.zeros((rows, k), np.int32), top_logp=np.full((rows, k), -2.0, np.float32),
                   target_logp=np.full(rows, -3.0, np.float32), model="m")


@pytest.mark.parametrize("field, value, match", [
    ("top_ids", lambda b: b.top_ids + 100, "outside the vocabulary"),
    ("tokens", lambda b: b.tokens - 1, "outside the vocabulary"),
    ("top_ids", lambda b: b.top_ids.astype(np.float32), "must be integers"),
    ("top_logp", lambda b: b.top_logp.astype(np.int32), "floating point"),
    ("top_logp", lambda b: b.top_logp + 5.0, "not log-probabilities"),
    ("top_logp", lambda b: b.top_logp * np.nan, "not log-probabilities"),
    ("target_logp", lambda b: b.target_logp[:-1], "inconsistent shapes"),
])
def test_base_file_with_bad_values_is_refused(tmp_path, field, value, match):
    base = _base()
    setattr(base, field, value(base))
    from safetensors.numpy import save_file

    # written as is (save() would convert the dtypes back)
    save_file({k: getattr(base, k) for k in ("tokens", "top_ids", "top_logp", "target_logp")},
              str(tmp_path / "b.kld"), metadata={"format": "glmtg-kld-base/1", "n_ctx": "8", "vocab_size": "100"})
    with pytest.raises(ValueError, match=match):
        KldBase.load(tmp_path / "b.kld")


def test_base_file_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        KldBase.load(tmp_path)
