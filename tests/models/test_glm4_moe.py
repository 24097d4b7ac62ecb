"""Logits of glmtg's Glm4MoeForCausalLM equal transformers' (eager, float32, full recompute) on tiny configs;
weights are written slot by slot (fused q/k/v and gate/up shards, stacked experts).

Tolerance: everything is float32 on both sides; the two differ only in summation order (SDPA / batched
einsum experts / fp32 RoPE vs transformers' loops), which costs a few float32 ulps per op. Over 3-4 layers
logits of magnitude ~1 agree to ~1e-6; rtol 1e-4 / atol 2e-5 leaves margin for that and nothing more (one
mis-routed expert or a wrong RoPE position moves logits by > 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from glmtg.layers.attention import BACKENDS
from glmtg.loading.presets import random_model
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from tests.references.model import (
    glmtg_from_hf,
    hf_logits,
    hf_reference,
    new_cache,
    tiny,
)

RTOL, ATOL = 1e-4, 2e-5

CONFIGS = {
    "qknorm-dense1-scale2.5-vocab1001": tiny(vocab_size=1001),
    "noqknorm-dense0-scale1": tiny(use_qk_norm=False, first_k_dense_replace=0, routed_scaling_factor=1.0,
                                   num_hidden_layers=3),
    "qknorm-dense2-groups-nonorm": tiny(first_k_dense_replace=2, num_hidden_layers=3, n_group=2, topk_group=1,
                                        norm_topk_prob=False, routed_scaling_factor=1.7),
}
# (backend, page size of the stand-in cache): each backend also meets a paged layout somewhere.
BACKEND_CASES = [("sdpa", None), ("eager", 4), ("glmtg", 3), ("sdpa", 5)]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    config = CONFIGS[request.param]
    hf = hf_reference(config, seed=1)
    return config, hf, glmtg_from_hf(hf, config)


@pytest.mark.parametrize("backend,page_size", BACKEND_CASES, ids=[f"{b}-page{p}" for b, p in BACKEND_CASES])
def test_prefill_then_decode_matches_transformers(pair, backend, page_size):
    config, hf, model = pair
    gen = torch.Generator().manual_seed(7)
    prefill, steps = 6, [3, 1, 1, 1]  # a 3-token chunk (offset causal mask), then single-token decode
    total = prefill + sum(steps)
    ids = torch.randint(0, config.vocab_size, (2, total), generator=gen)
    cache = new_cache(config, batch=2, capacity=total, page_size=page_size)

    logits = model(ids[:, :prefill], cache, attn_backend=backend)
    assert logits.dtype == torch.float32 and logits.shape == (2, prefill, config.vocab_size)
    torch.testing.assert_close(logits, hf_logits(hf, ids[:, :prefill]), rtol=RTOL, atol=ATOL)
    assert cache.lengths.tolist() == [0, 0], "forward must not advance lengths"
    cache.lengths += prefill

    # Drop sequence 1's last two tokens (as sweep-bench drops TG tokens): the batch now has unequal lengths,
    # and the next tokens overwrite the dropped rows.
    cache.lengths[1] -= 2
    history = [ids[0, :prefill], ids[1, :prefill - 2]]
    pos = prefill
    for s in steps:
        new = ids[:, pos:pos + s]
        logits = model(new, cache, attn_backend=backend)
        cache.lengths += s
        for b in range(2):
            history[b] = torch.cat([history[b], new[b]])
            ref = hf_logits(hf, history[b][None])[0, -s:]
            torch.testing.assert_close(logits[b], ref, rtol=RTOL, atol=ATOL, msg=f"seq {b} at {pos}")
        pos += s


def test_backends_agree_and_last_only():
    config = tiny()
    model = random_model(config, seed=3, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    outs = {}
    for backend in BACKENDS:
        cache = new_cache(config, batch=3, capacity=8)
        outs[backend] = model(ids, cache, attn_backend=backend)
    for backend in BACKENDS:
        torch.testing.assert_close(outs[backend], outs["eager"], rtol=RTOL, atol=ATOL)
    last = model(ids, new_cache(config, batch=3, capacity=8), last_only=True)
    torch.testing.assert_close(last, outs["sdpa"][:, -1:], rtol=RTOL, atol=ATOL)


def test_unknown_backend_raises():
    config = tiny()
    model = random_model(config, dtype=torch.float32)
    cache = new_cache(config, 1, 4)
    with pytest.raises(ValueError, match="backend"):
        model(torch.zeros(1, 1, dtype=torch.long), cache, attn_backend="flash")
    assert cache.appends == [], "a bad argument must be rejected before any layer writes to the cache"


def test_random_is_seeded_and_bf16_runs():
    config = tiny()
    a = random_model(config, seed=5)
    b = random_model(config, seed=5)
    c = random_model(config, seed=6)
    assert a.dtype == torch.bfloat16
    assert a.layers[1].mlp.router.weight.dtype == torch.float32  # the router stays fp32
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embed.weight"], sc["embed.weight"])
    assert float(sa["layers.0.attn_norm.weight"].float().mean()) == 1.0
    ids = torch.randint(0, config.vocab_size, (1, 4))
    logits_bf16 = a(ids, new_cache(config, 1, 4))
    a32 = Glm4MoeForCausalLM(config, dtype=torch.float32)
    a32.load_state_dict({k: v.float() for k, v in sa.items()})
    logits_f32 = a32(ids, new_cache(config, 1, 4))
    assert torch.isfinite(logits_bf16).all()
    # bf16 weights/activations carry ~3 significant digits through 4 layers
    torch.testing.assert_close(logits_bf16, logits_f32, rtol=0.05, atol=0.02)


def test_tied_embeddings():
    config = tiny(tie_word_embeddings=True)
    model = random_model(config, dtype=torch.float32)
    assert model.lm_head.weight is model.embed.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_positions_checked_once_per_forward_and_layers_append_without_a_host_check():
    config = tiny()
    model = random_model(config, dtype=torch.float32)
    cache = new_cache(config, batch=2, capacity=6)
    ids = torch.zeros(2, 2, dtype=torch.long)
    model(ids, cache)
    assert cache.appends == [False] * config.num_hidden_layers
    cache.lengths[1] = 5  # 5 + 2 > 6
    with pytest.raises(ValueError, match="capacity 6"):
        model(ids, cache)
    cache.lengths[1] = -1
    with pytest.raises(ValueError, match=">= 0"):
        model(ids, cache)
    assert cache.appends == [False] * config.num_hidden_layers, "rejected forwards must write nothing"
    cache.lengths[1] = 0
    model(ids, cache, validate=False)  # the caller vouches for the positions: no check, no host read
    assert len(cache.appends) == 2 * config.num_hidden_layers


def test_projections_are_fused_once_at_load():
    # q/k/v and gate/up are one parameter each, filled shard by shard: no separate copies to keep in step.
    config = tiny()
    model = random_model(config, dtype=torch.float32)
    names = dict(model.named_parameters())
    d, hq, hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    assert names["layers.0.attn.qkv.weight"].shape == ((hq + 2 * hkv) * d, config.hidden_size)
    assert names["layers.0.mlp.gate_up.weight"].shape == (2 * config.intermediate_size, config.hidden_size)
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in names)
    slots = [(s.name, s.shard) for s in model.tensor_slots()]
    assert slots[2:8] == [("layers.0.attn.qkv.weight", "q"), ("layers.0.attn.qkv.bias", "q"),
                          ("layers.0.attn.qkv.weight", "k"), ("layers.0.attn.qkv.bias", "k"),
                          ("layers.0.attn.qkv.weight", "v"), ("layers.0.attn.qkv.bias", "v")]
    # writing one shard changes exactly its rows
    w = names["layers.0.attn.qkv.weight"].clone()
    new_k = torch.randn(hkv * d, config.hidden_size)
    model.load_tensor("layers.0.attn.qkv.weight", new_k, shard="k")
    got = dict(model.named_parameters())["layers.0.attn.qkv.weight"]
    assert torch.equal(got[hq * d:(hq + hkv) * d], new_k)
    assert torch.equal(got[:hq * d], w[:hq * d]) and torch.equal(got[(hq + hkv) * d:], w[(hq + hkv) * d:])


@pytest.mark.parametrize("name,kwargs,match", [
    ("layers.0.attn.qkv.weight", dict(shard="x"), "shard must be one of"),
    ("layers.0.attn.qkv.weight", dict(shard="q", value=torch.zeros(3, 3)), "expected shape"),
    ("layers.0.attn.qkv.weight", dict(shard="q", dtype=torch.float64), "expected dtype"),
    ("layers.0.attn_norm.weight", dict(expert=1), "plain parameter"),
    ("layers.1.mlp.experts.gate_proj", dict(expert=99), "expert must be"),
    ("layers.0.nope.weight", dict(), "no parameter"),
])
def test_load_tensor_rejects_bad_slots(name, kwargs, match):
    config = tiny()
    model = Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta")
    shapes = {s.name: s.shape for s in model.tensor_slots() if s.shard in (None, "q")}
    value = kwargs.pop("value", None)
    dtype = kwargs.pop("dtype", torch.float32)
    if value is None:
        shape = shapes.get(name, (1,))
        value = torch.zeros(shape[1:] if "expert" in kwargs and "experts" in name else shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        model.load_tensor(name, value, **kwargs)
