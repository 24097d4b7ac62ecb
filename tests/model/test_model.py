"""Logits of glmtg's Glm4MoeForCausalLM equal transformers' (eager, float32, full recompute) on tiny configs.

Tolerance: everything is float32 on both sides; the two differ only in summation order (SDPA / batched
einsum experts / fp32 RoPE vs transformers' loops), which costs a few float32 ulps per op. Over 3-4 layers
logits of magnitude ~1 agree to ~1e-6; rtol 1e-4 / atol 2e-5 leaves margin for that and nothing more (one
mis-routed expert or a wrong RoPE position moves logits by > 1e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmtg.attention import BACKENDS, attend
from glmtg.config import ModelConfig
from glmtg.model import Experts, Glm4MoeForCausalLM, Router

from .helpers import glmtg_from_hf, hf_logits, hf_reference, new_cache, tiny

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
    model = Glm4MoeForCausalLM.random(config, seed=3, dtype=torch.float32)
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
    model = Glm4MoeForCausalLM.random(config, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        model(torch.zeros(1, 1, dtype=torch.long), new_cache(config, 1, 4), attn_backend="flash")
    q = torch.zeros(1, 1, config.num_attention_heads, config.head_dim)
    with pytest.raises(ValueError, match="backend"):
        attend(q, new_cache(config, 1, 4), 0, torch.ones(1, dtype=torch.int32), "nope", 0.1)


def test_experts_gathered_and_grouped_paths_equal_per_expert_loop():
    config = tiny(n_routed_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    experts = Experts(config, torch.float32)
    for p in experts.parameters():
        p.data.normal_(0, 0.05)
    router = Router(config)
    router.weight.data.normal_(0, 0.1)
    router.e_score_correction_bias.data.normal_(0, 0.05)
    x = torch.randn(9, config.hidden_size)
    ids, w = router(x)
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):  # plain per-token, per-expert loop
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.silu(experts.gate_proj[e] @ x[t]) * (experts.up_proj[e] @ x[t])
            ref[t] += w[t, j] * (experts.down_proj[e] @ h)
    # 9 tokens x 4 > 16 experts: grouped path; 3 x 4 <= 16: gathered path
    torch.testing.assert_close(experts(x, ids, w), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts(x[:3], ids[:3], w[:3]), ref[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts._gathered(x, ids), experts._grouped(x, ids), rtol=1e-5, atol=1e-6)


def test_router_math():
    config = tiny(routed_scaling_factor=2.5)
    router = Router(config)
    torch.manual_seed(1)
    router.weight.data.normal_(0, 0.2)
    router.e_score_correction_bias.data = torch.linspace(-0.5, 0.5, config.n_routed_experts)
    x = torch.randn(5, config.hidden_size)
    ids, w = router(x)
    s = torch.sigmoid(x @ router.weight.T)
    want = (s + router.e_score_correction_bias).topk(config.num_experts_per_tok).indices
    assert torch.equal(ids.sort(-1).values, want.sort(-1).values)  # chosen by biased score
    sel = s.gather(1, ids)  # weighted by the unbiased score
    torch.testing.assert_close(w, sel / sel.sum(-1, keepdim=True) * 2.5)


def test_random_is_seeded_and_bf16_runs():
    config = tiny()
    a = Glm4MoeForCausalLM.random(config, seed=5)
    b = Glm4MoeForCausalLM.random(config, seed=5)
    c = Glm4MoeForCausalLM.random(config, seed=6)
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
    model = Glm4MoeForCausalLM.random(config, dtype=torch.float32)
    assert model.lm_head.weight is model.embed.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_partial_rope_matches_transformers_formula():
    from glmtg.model import apply_partial_rope, rope_cos_sin

    config = ModelConfig.preset("glm-4.5")  # rotary 64 of 128, theta 1e6
    pos = torch.tensor([[0, 1, 4095, 131071]])
    cos, sin = rope_cos_sin(pos, config.rotary_dim, config.rope_theta)
    x = torch.randn(1, 4, 2, config.head_dim, dtype=torch.float64).float()
    out = apply_partial_rope(x, cos, sin)
    r = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    ang = pos[0, :, None].double() * inv  # [S, R/2]
    x1, x2 = x[..., : r // 2].double(), x[..., r // 2: r].double()
    c, s_ = ang.cos()[None, :, None], ang.sin()[None, :, None]
    want = torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_, x[..., r:].double()], dim=-1)
    # The angle pos * inv_freq is formed in fp32 (as transformers does), so its error grows as pos * 2^-24 rad:
    # exact to 1e-6 at small positions, ~1e-3 absolute on values of size ~3 at position 4095.
    torch.testing.assert_close(out[:, :2].double(), want[:, :2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 2:3].double(), want[:, 2:3], rtol=0, atol=2e-3)
    torch.testing.assert_close(out[..., r:], x[..., r:], rtol=0, atol=0)  # pass-through dims untouched


@pytest.mark.parametrize("name", ["qknorm-dense1-scale2.5-vocab1001", "qknorm-dense2-groups-nonorm"])
def test_fused_projections_match_transformers(name):
    # The engine fuses q/k/v and gate/up on CUDA; the fused model must still equal transformers, keep its
    # parameter names and shapes, and hold no second copy of the weights (parameters are views).
    config = CONFIGS[name]
    hf = hf_reference(config, seed=2)
    model = glmtg_from_hf(hf, config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    model.fuse_projections()
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    attn = model.layers[0].attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    cache = new_cache(config, batch=2, capacity=8)
    logits = model(ids[:, :6], cache, attn_backend="sdpa")
    torch.testing.assert_close(logits, hf_logits(hf, ids[:, :6]), rtol=RTOL, atol=ATOL)
    cache.lengths += 6
    step = model(ids[:, 6:], cache, attn_backend="eager")
    torch.testing.assert_close(step[:, 0], hf_logits(hf, ids)[:, -1], rtol=RTOL, atol=ATOL)
    fused_ptr = attn.fused[0].data_ptr()
    model.fuse_projections()  # a second engine on the same model must not fuse (copy) again
    assert attn.fused[0].data_ptr() == fused_ptr


def test_set_parameter_after_fusing_uses_the_new_weight():
    # A fused matrix holds copies of the old values: replacing a projection must not be silently ignored.
    config = tiny()
    fused = Glm4MoeForCausalLM.random(config, seed=4, dtype=torch.float32)
    plain = Glm4MoeForCausalLM.random(config, seed=4, dtype=torch.float32)
    fused.fuse_projections()
    for model in (fused, plain):
        for name in ("layers.0.attn.k_proj.weight", "layers.1.mlp.shared.up_proj.weight"):
            shape = dict(model.named_parameters())[name].shape
            model.set_parameter(name, torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    ids = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused(ids, new_cache(config, 1, 8)), plain(ids, new_cache(config, 1, 8)),
                               rtol=RTOL, atol=ATOL)
