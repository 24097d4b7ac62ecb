"""qk_rope (q/k of the fused QKV output, optional per-head RMSNorm, partial NeoX RoPE, one launch).

Tolerances:
- vs the torch path (RMSNorm module + apply_partial_rope) without qk-norm: bit-equal. Both do the same fp32
  multiplies and add, each rounded (the launch disables FMA contraction), then one cast to y's dtype.
- vs the torch path with qk-norm: the sum of squares is reduced in another order, so the normalised value
  differs in the last fp32 bits; after rounding to y's dtype it sometimes sits one ulp apart, and the weight
  multiply and the rotation carry that along. Bound: |diff| <= 4 * eps * (|a*cos| + |b*sin| + |out|), where a
  and b are the (normed) value and its rotate_half partner, eps y's dtype's machine epsilon. In f16/bf16 such
  a flip needs the fp32 normed value within a few fp32 ulps of a rounding boundary (odds ~2^-10 and less per
  element), so besides the bound at most 1% of the elements may differ at all: a dropped or misplaced
  rounding differs in far more and fails.
- vs float64 (no rounding at all): the kernel rounds the normed value, the weight product and the output
  to y's dtype (each <= eps/2 relative) and the fp32 products (negligible beside them): bound
  2 * eps * (|a*cos| + |b*sin| + |out|) with |a|, |b| the unrounded values.
The outputs are pre-filled with NaN, so an element the kernel does not write cannot pass.
"""

from __future__ import annotations

import pytest
import torch

from glmtg.kernels.qk_rope import qk_rope
from glmtg.layers.norm import RMSNorm
from glmtg.layers.rope import apply_partial_rope, rope_cos_sin

EPS = 1e-5
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
# (T, Hq, Hkv, D, R): GQA and Hq == Hkv, partial and full rotation, odd token counts.
SHAPES = [(3, 6, 2, 64, 32), (2, 6, 2, 32, 16), (5, 2, 2, 32, 32), (1, 3, 1, 64, 64), (2, 6, 2, 64, 16)]


def make(t, hq, hkv, d, r, dtype, device="cpu", seed=0, norm=True):
    """Random y (with a per-column offset, like the projection bias), cos/sin at far positions, weights."""
    g = torch.Generator().manual_seed(seed)
    width = (hq + 2 * hkv) * d
    y = (torch.randn(t, width, generator=g) * 2 + torch.randn(width, generator=g)).to(dtype).to(device)
    cos, sin = rope_cos_sin(torch.randint(0, 200_000, (1, t), generator=g), r, 1_000_000.0)
    weights = tuple((torch.rand(d, generator=g) * 1.5 + 0.25).to(dtype).to(device) for _ in range(2))
    return y, cos[0].to(device), sin[0].to(device), (weights if norm else (None, None))


def torch_path(y, cos, sin, hq, hkv, d, q_norm, k_norm, eps=EPS):
    """Attention.forward's split + RMSNorm modules + apply_partial_rope, one token per sequence."""
    t = y.shape[0]
    q, k = y[:, : hq * d].view(t, 1, hq, d), y[:, hq * d: (hq + hkv) * d].view(t, 1, hkv, d)
    if q_norm is not None:
        qn, kn = RMSNorm(d, eps, y.dtype).to(y.device), RMSNorm(d, eps, y.dtype).to(y.device)
        with torch.no_grad():
            qn.weight.copy_(q_norm)
            kn.weight.copy_(k_norm)
            q, k = qn(q), kn(k)
    c, s = cos[:, None], sin[:, None]
    return apply_partial_rope(q, c, s)[:, 0], apply_partial_rope(k, c, s)[:, 0]


def float64_terms(x, w, cos, sin, eps):
    """x [T, H, D] -> (out, |a*cos| + |b*sin| + |out|) in float64, nothing rounded."""
    x = x.double()
    if w is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    r = cos.shape[-1]
    c, s = cos.double()[:, None], sin.double()[:, None]
    rot = x[..., :r]
    partner = torch.cat((-rot[..., r // 2:], rot[..., : r // 2]), -1)
    out = torch.cat((rot * c + partner * s, x[..., r:]), -1)
    scale = torch.cat(((rot * c).abs() + (partner * s).abs(), x[..., r:].abs()), -1) + out.abs()
    return out, scale


def run(y, cos, sin, hq, hkv, d, weights, eps=EPS):
    t = y.shape[0]
    q_out = torch.full((t, hq, d), float("nan"), dtype=y.dtype, device=y.device)
    k_out = torch.full((t, hkv, d), float("nan"), dtype=y.dtype, device=y.device)
    q, k = qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=weights[0],
                   k_norm=weights[1], eps=eps, q_out=q_out, k_out=k_out)
    assert q is q_out and k is k_out
    return q, k


def assert_torch_norm(got, want, scale, dtype, what):
    """The qk-norm comparison with the torch path (module docstring)."""
    assert_bound(got, want, scale, 4, dtype, what)
    if dtype != torch.float32:
        differ = (got.view(BITS[dtype]) != want.view(BITS[dtype])).double().mean().item()
        assert differ <= 0.01, f"{what}: {differ:.1%} of the elements differ from the torch path"


def assert_bound(got, want, scale, factor, dtype, what):
    assert not got.isnan().any(), f"{what}: NaN left in the output (an element was not written)"
    bound = factor * torch.finfo(dtype).eps * scale
    excess = ((got.double() - want.double()).abs() - bound).max().item()
    assert excess <= 0, f"{what}: off the bound by {excess:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-Hq{}-Hkv{}-D{}-R{}".format(*s))
def test_matches_torch_path_and_float64(shape, norm, dtype):
    t, hq, hkv, d, r = shape
    y, cos, sin, weights = make(t, hq, hkv, d, r, dtype, seed=sum(shape), norm=norm)
    y_before = y.clone()
    q, k = run(y, cos, sin, hq, hkv, d, weights)
    assert torch.equal(y.view(BITS[dtype]), y_before.view(BITS[dtype])), "y (and so v) must not be written"
    q_ref, k_ref = torch_path(y, cos, sin, hq, hkv, d, *weights)
    heads = (("q", q, q_ref, y[:, : hq * d].view(t, hq, d), weights[0]),
             ("k", k, k_ref, y[:, hq * d: (hq + hkv) * d].view(t, hkv, d), weights[1]))
    for name, got, want, x, w in heads:
        exact, scale = float64_terms(x, w, cos, sin, EPS)
        assert_bound(got, exact, scale, 2, dtype, f"{name} vs float64")
        if norm:
            assert_torch_norm(got, want, scale, dtype, f"{name} vs torch path")
        else:
            assert torch.equal(got.view(BITS[dtype]), want.view(BITS[dtype])), f"{name} not bit-equal to torch"


def test_strided_outputs_and_input_rows():
    """y a column slice of a wider buffer; q_out/k_out slices of NaN-poisoned buffers: only they are written."""
    t, hq, hkv, d, r = 3, 6, 2, 32, 16
    y_full, cos, sin, weights = make(t, hq, hkv, d + 8, r, torch.float16, seed=7)
    y = y_full[:, : (hq + 2 * hkv) * d]
    weights = tuple(w[:d] for w in weights)
    q_buf = torch.full((t, hq + 1, d + 4), float("nan"), dtype=torch.float16)
    k_buf = torch.full((t, hkv, 2 * d), float("nan"), dtype=torch.float16)
    q_out, k_out = q_buf[:, 1:, 2: d + 2], k_buf[:, :, d:]
    qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=weights[0], k_norm=weights[1],
            q_out=q_out, k_out=k_out)
    q_ref, k_ref = torch_path(y.contiguous(), cos, sin, hq, hkv, d, *weights)
    heads = (("q", q_out, q_ref, y[:, : hq * d].reshape(t, hq, d), weights[0]),
             ("k", k_out, k_ref, y[:, hq * d: (hq + hkv) * d].reshape(t, hkv, d), weights[1]))
    for name, got, want, x, w in heads:
        exact, scale = float64_terms(x, w, cos, sin, EPS)
        assert_torch_norm(got, want, scale, torch.float16, f"{name} vs torch path")
        assert_bound(got, exact, scale, 2, torch.float16, f"{name} vs float64")
    q_buf[:, 1:, 2: d + 2] = float("nan")
    k_buf[:, :, d:] = float("nan")
    assert q_buf.isnan().all() and k_buf.isnan().all(), "written outside q_out/k_out"


def test_new_outputs_and_eps():
    t, hq, hkv, d, r = 2, 2, 1, 32, 32
    y, cos, sin, weights = make(t, hq, hkv, d, r, torch.float32, seed=3)
    y = y * 1e-3  # so that eps matters
    q, k = qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=weights[0], k_norm=weights[1],
                   eps=1e-4)
    assert q.shape == (t, hq, d) and k.shape == (t, hkv, d) and q.dtype == k.dtype == torch.float32
    q_ref, k_ref = torch_path(y, cos, sin, hq, hkv, d, *weights, eps=1e-4)
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)  # a few fp32 ulps (norm reduction order)
    torch.testing.assert_close(k, k_ref, rtol=1e-6, atol=1e-6)
    # the same inputs at the default eps give visibly different k: eps is really used
    _, k_default = torch_path(y, cos, sin, hq, hkv, d, *weights)
    assert (k_default - k).abs().max() > 1e-3


@pytest.mark.parametrize("seq", [1, 2])
def test_appends_roped_k_and_v_to_the_cache(seq):
    """k_cache/v_cache/start: each token's roped k (bit-equal to k_out) and v (y's, bit for bit) land at
    start[b] + s; every other slot keeps its NaN; a token past the capacity writes nothing. The stores are
    one layer of a KVCache (f16), as Attention.forward would pass them."""
    from glmtg.kv_cache import KVCache

    batch, hq, hkv, d, r, capacity = 3, 6, 2, 32, 16, 9
    t = batch * seq
    y, cos, sin, weights = make(t, hq, hkv, d, r, torch.float16, seed=11 + seq)
    cache = KVCache(num_layers=2, batch=batch, capacity=capacity, num_kv_heads=hkv, head_dim=d, k_format="f16")
    kc, vc = cache.k(1).data, cache.v(1).data
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    start = torch.tensor([0, 5, capacity - 1], dtype=torch.int32)  # with S=2 the last token is past the end
    q, k = qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=weights[0], k_norm=weights[1],
                   k_cache=kc, v_cache=vc, start=start)
    q_ref, k_ref = run(y, cos, sin, hq, hkv, d, weights)
    assert torch.equal(q.view(torch.int16), q_ref.view(torch.int16))
    assert torch.equal(k.view(torch.int16), k_ref.view(torch.int16))
    v = y[:, (hq + hkv) * d:].view(batch, seq, hkv, d)
    written = torch.zeros(batch, capacity, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq):
            pos = int(start[b]) + i
            if pos < capacity:
                written[b, pos] = True
                assert torch.equal(kc[b, :, pos].view(torch.int16), k[b * seq + i].view(torch.int16))
                assert torch.equal(vc[b, :, pos].view(torch.int16), v[b, i].view(torch.int16))
    assert int(written.sum()) == (t if seq == 1 else t - 1)
    for store in (kc, vc):
        assert store.transpose(1, 2)[~written].isnan().all(), "a slot not appended to was written"
    assert cache.k(0).data.eq(0).all() and cache.v(0).data.eq(0).all(), "another layer was written"


def _bad_cases():
    t, hq, hkv, d, r = 2, 2, 1, 32, 16
    y, cos, sin, (qw, kw) = make(t, hq, hkv, d, r, torch.float16)
    base = dict(y=y, cos=cos, sin=sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=qw, k_norm=kw)
    odd = rope_cos_sin(torch.arange(t)[None], 16, 1e4)[0][0][:, :15]
    return [
        ("y", dict(y=y[:, :-1])),
        ("y", dict(y=y.double())),
        ("y", dict(y=y.t().contiguous().t())),
        ("cos", dict(cos=cos.double())),
        ("cos", dict(cos=cos[:1])),
        ("sin", dict(sin=sin[:, :8])),
        ("R = 15", dict(cos=odd, sin=odd)),
        ("R = 64", dict(cos=torch.ones(t, 64), sin=torch.ones(t, 64))),
        ("q_norm and k_norm", dict(k_norm=None)),
        ("q_norm", dict(q_norm=qw.float())),
        ("k_norm", dict(k_norm=kw[:16])),
        ("q_out", dict(q_out=torch.empty(t, hq + 1, d, dtype=torch.float16))),
        ("k_out", dict(k_out=torch.empty(t, hkv, d))),
        ("k_out", dict(k_out=torch.empty(t, hkv, 2 * d, dtype=torch.float16)[..., ::2])),
        ("num_kv_heads", dict(num_kv_heads=0)),
        ("eps", dict(eps=-1.0)),
        ("cos is on meta", dict(cos=torch.empty(t, r, device="meta"))),
        ("k_cache, v_cache and start", dict(k_cache=torch.empty(t, hkv, 8, d, dtype=torch.float16))),
        ("k_cache", dict(k_cache=torch.empty(t, hkv, 8, d, dtype=torch.int16),
                         v_cache=torch.empty(t, hkv, 8, d, dtype=torch.int16),
                         start=torch.zeros(t, dtype=torch.int32))),
        ("v_cache", dict(k_cache=torch.empty(t, hkv, 8, d, dtype=torch.float16),
                         v_cache=torch.empty(t, hkv, 9, d, dtype=torch.float16),
                         start=torch.zeros(t, dtype=torch.int32))),
        ("start", dict(k_cache=torch.empty(t, hkv, 8, d, dtype=torch.float16),
                       v_cache=torch.empty(t, hkv, 8, d, dtype=torch.float16), start=torch.zeros(t))),
        ("does not divide", dict(k_cache=torch.empty(3, hkv, 8, d, dtype=torch.float16),
                                 v_cache=torch.empty(3, hkv, 8, d, dtype=torch.float16),
                                 start=torch.zeros(3, dtype=torch.int32))),
    ], base


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_inputs_raise(case):
    cases, base = _bad_cases()
    expected, change = cases[case]
    kwargs = {**base, **change}
    y, cos, sin = kwargs.pop("y"), kwargs.pop("cos"), kwargs.pop("sin")
    with pytest.raises(ValueError, match=expected):
        qk_rope(y, cos, sin, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("t", [1, 4])
def test_gpu_bf16_glm_shapes(t, norm):
    """GLM-4.5-Air attention (Hq=96, Hkv=8, D=128, R=64) in bf16 on the GPU: bit-equal without qk-norm, within
    the reduction-order bound with it (module docstring)."""
    hq, hkv, d, r = 96, 8, 128, 64
    y, cos, sin, weights = make(t, hq, hkv, d, r, torch.bfloat16, device="cuda", seed=t, norm=norm)
    q, k = run(y, cos, sin, hq, hkv, d, weights)
    q_ref, k_ref = torch_path(y, cos, sin, hq, hkv, d, *weights)
    for name, got, want, x, w in (("q", q, q_ref, y[:, : hq * d].view(t, hq, d), weights[0]),
                                  ("k", k, k_ref, y[:, hq * d: (hq + hkv) * d].view(t, hkv, d), weights[1])):
        exact, scale = float64_terms(x, w, cos, sin, EPS)
        assert_bound(got, exact, scale, 2, torch.bfloat16, f"{name} vs float64")
        if norm:
            assert_torch_norm(got, want, scale, torch.bfloat16, f"{name} vs torch path")
        else:
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name} not bit-equal to torch"


@pytest.mark.gpu
def test_gpu_bf16_cache_append_glm_shapes():
    """The append at GLM shapes in bf16 on the GPU (4 sequences, one token each): the stores hold k_out and
    y's v bit for bit at start[b], NaN elsewhere."""
    batch, hq, hkv, d, r, capacity = 4, 96, 8, 128, 64, 33
    y, cos, sin, weights = make(batch, hq, hkv, d, r, torch.bfloat16, device="cuda", seed=5)
    kc = torch.full((batch, hkv, capacity, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    vc = torch.full_like(kc, float("nan"))
    start = torch.tensor([0, 7, 31, capacity - 1], dtype=torch.int32, device="cuda")
    _, k = qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=weights[0], k_norm=weights[1],
                   k_cache=kc, v_cache=vc, start=start)
    rows = torch.arange(batch, device="cuda")
    pos = start.long()
    assert torch.equal(kc[rows, :, pos].view(torch.int16), k.view(torch.int16))
    assert torch.equal(vc[rows, :, pos].view(torch.int16), y[:, (hq + hkv) * d:].view(batch, hkv, d).view(torch.int16))
    kc[rows, :, pos] = float("nan")
    vc[rows, :, pos] = float("nan")
    assert kc.isnan().all() and vc.isnan().all(), "a slot not appended to was written"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_into_f16_cache_as_append():
    """A bf16 model with an f16 cache (glmtg's -ctk f16): the launch converts k and v to the store's type as
    KVCache.append does, bit for bit."""
    from glmtg.kv_cache import KVCache

    batch, hq, hkv, d, r, capacity = 2, 96, 8, 128, 64, 17
    y, cos, sin, weights = make(batch, hq, hkv, d, r, torch.bfloat16, device="cuda", seed=9)
    fused, plain = (KVCache(num_layers=1, batch=batch, capacity=capacity, num_kv_heads=hkv, head_dim=d,
                            k_format="f16", device="cuda") for _ in range(2))
    for cache in (fused, plain):  # the same random contents before: only the appended slots may change
        gen = torch.Generator(device="cuda").manual_seed(1)
        for store in (cache.k(0).data, cache.v(0).data):
            store.copy_(torch.randn(store.shape, generator=gen, device="cuda"))
    start = torch.tensor([3, 16], dtype=torch.int32, device="cuda")
    _, k = qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, k_cache=fused.k(0).data,
                   v_cache=fused.v(0).data, start=start)
    v = y[:, (hq + hkv) * d:].reshape(batch, 1, hkv, d)
    plain.append(0, k.view(batch, 1, hkv, d), v, start=start)
    for a, b in ((fused.k(0).data, plain.k(0).data), (fused.v(0).data, plain.v(0).data)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_q_dtype_is_the_rounded_q_converted(device):
    """q_dtype: q comes out in another dtype (the decode kernel's query dtype) exactly as the y-dtype result
    converted afterwards (``q.to(...)``, one launch fewer); k stays in y's dtype. fp32 -> f16 in the
    interpreter, bf16 -> f16 (GLM with an f16 cache) on the GPU; bit-equality, no tolerance."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t, hq, hkv, d, r = 3, 4, 2, 64, 32
    y, cos, sin, weights = make(t, hq, hkv, d, r, dtype, device=device, seed=12)
    q_ref, k_ref = qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=weights[0],
                           k_norm=weights[1])
    q_out = torch.full((t, hq, d), float("nan"), dtype=torch.float16, device=device)
    q, k = qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=weights[0], k_norm=weights[1],
                   q_dtype=torch.float16, q_out=q_out)
    assert q is q_out and q.dtype == torch.float16 and k.dtype == dtype
    assert torch.equal(q, q_ref.to(torch.float16)) and torch.equal(k, k_ref)
    with pytest.raises(ValueError, match="q_out must be torch.float16"):
        qk_rope(y, cos, sin, num_heads=hq, num_kv_heads=hkv, head_dim=d, q_dtype=torch.float16,
                q_out=torch.empty(t, hq, d, dtype=dtype, device=device))
