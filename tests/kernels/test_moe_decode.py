"""moe_decode (routed experts of a few tokens, weights read in place) against a float64 reference.

Tolerances. The reference takes the very same fp16/bf16/fp32 input values and computes in float64, and the
kernel accumulates both GEMVs and the weighted sum over slots in fp32 and rounds once to the output dtype.
So each output element may be off by the final rounding (unit roundoff u: 2^-11 fp16, 2^-8 bf16, 2^-24 fp32)
times |ref|, plus fp32 accumulation error, which grows like 2^-24 * sqrt(n) * |ref| (n = H or I terms,
<= 4096 here: ~4e-6 |ref|) and is bounded here by 1e-5 * max|ref|. Checked per element:
    |y - ref| <= u * |ref| + 1e-5 * max|ref|
which also catches a combine rounded more than once (intermediate roundings would exceed u |ref| where
slots cancel). The relative Frobenius error must further stay under 2u (fp16, bf16) or 1e-5 (fp32).
Outputs are poisoned with NaN before each call, so an unwritten element cannot pass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from glmtg.config import ModelConfig
from glmtg.kernels.moe_decode import moe_decode
from glmtg.layers import moe as moe_layer
from glmtg.layers.moe import Experts, gathered_experts

# numpy's, from inside the Triton interpreter (a loop bound passed as a runtime int goes through __index__)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FROBENIUS_TOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0 ** -11, torch.bfloat16: 2 * 2.0 ** -8}
ACCUMULATION = 1e-5  # fraction of max|ref|: fp32 accumulation error, see the module docstring

# Small odd sizes for the interpreter: no dimension a multiple of any block.
HIDDEN, INTER, EXPERTS, TOP_K = 72, 40, 9, 3
SMALL_BLOCKS = dict(block_i=8, block_k=32, block_h=8, block_k_down=16)  # several loop steps, ragged tails
AIR = dict(hidden=4096, inter=1408, experts=128, top_k=8)


def moe_ref(x, gate, up, down, ids, weights):
    """float64 [T, H] on the CPU; a slot whose id is outside [0, E) contributes nothing."""
    t_count, k = ids.shape
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(t_count):
        xt = x[t].double()
        for j in range(k):
            e = int(ids[t, j])
            if not 0 <= e < gate.shape[0]:
                continue
            h = F.silu(gate[e].double() @ xt) * (up[e].double() @ xt)
            out[t] += float(weights[t, j]) * (down[e].double() @ h)
    return out.cpu()


def make_case(t, hidden, inter, experts, top_k, dtype, device, seed=0):
    """Random x, weights and routing; std chosen so that g, u and y are O(1), i.e. silu is nonlinear."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(shape, generator=g, device=device) * std).to(dtype)

    case = dict(
        x=randn(t, hidden, std=1.0),
        gate=randn(experts, inter, hidden, std=hidden ** -0.5),
        up=randn(experts, inter, hidden, std=hidden ** -0.5),
        down=randn(experts, hidden, inter, std=inter ** -0.5),
        weights=torch.rand(t, top_k, generator=g, device=device) + 0.1,
    )
    # Distinct experts per token (as top-k gives) but overlapping between tokens.
    cpu = torch.Generator().manual_seed(seed)
    case["ids"] = torch.stack([torch.randperm(experts, generator=cpu)[:top_k] for _ in range(t)]).to(device)
    return case


def run_and_check(case, dtype, **kwargs):
    x = case["x"]
    out = torch.full_like(x, float("nan"))
    y = moe_decode(x, case["gate"], case["up"], case["down"], case["ids"], case["weights"], out=out, **kwargs)
    assert y is out
    assert not torch.isnan(y).any(), "some output elements were not written"
    ref = moe_ref(x, case["gate"], case["up"], case["down"], case["ids"], case["weights"])
    yd = y.double().cpu()
    bound = UNIT_ROUNDOFF[dtype] * ref.abs() + ACCUMULATION * ref.abs().max()
    worst = ((yd - ref).abs() / bound).max()
    assert worst <= 1, f"an element is off by {worst:.2f}x its bound"
    err = (yd - ref).norm() / ref.norm()
    assert err < FROBENIUS_TOL[dtype], f"relative error {err:.2e} >= {FROBENIUS_TOL[dtype]:.2e}"
    return y


# ---------------------------------------------------------------- CPU (Triton interpreter), small

@pytest.mark.parametrize("blocks", [{}, SMALL_BLOCKS], ids=["default_blocks", "small_blocks"])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_reference(dtype, t, blocks):
    case = make_case(t, HIDDEN, INTER, EXPERTS, TOP_K, dtype, "cpu", seed=t)
    run_and_check(case, dtype, **blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_repeated_experts_within_and_across_tokens(dtype):
    case = make_case(3, HIDDEN, INTER, EXPERTS, TOP_K, dtype, "cpu", seed=5)
    # token 0 picks expert 8 twice; every token uses expert 8; tokens 1 and 2 share all of theirs
    case["ids"] = torch.tensor([[8, 8, 0], [3, 8, 1], [1, 3, 8]])
    run_and_check(case, dtype, **SMALL_BLOCKS)


def test_out_of_range_ids_contribute_zero():
    # Masked on the device: no read outside the weights (an unmasked 10**12 would crash the process).
    case = make_case(2, HIDDEN, INTER, EXPERTS, TOP_K, torch.float32, "cpu", seed=6)
    case["ids"] = torch.tensor([[-1, 4, EXPERTS], [10**12, 2, 2]])
    run_and_check(case, torch.float32, **SMALL_BLOCKS)


def test_strided_small_inputs_are_accepted():
    case = make_case(3, HIDDEN, INTER, EXPERTS, TOP_K, torch.float32, "cpu", seed=7)
    case["x"] = torch.cat([case["x"], case["x"]], dim=1)[:, :HIDDEN]  # row stride 2H
    case["ids"] = case["ids"].T.contiguous().T
    run_and_check(case, torch.float32)


def test_no_tokens():
    case = make_case(1, HIDDEN, INTER, EXPERTS, TOP_K, torch.float32, "cpu")
    x = case["x"][:0]
    y = moe_decode(x, case["gate"], case["up"], case["down"], case["ids"][:0], case["weights"][:0])
    assert y.shape == (0, HIDDEN)


def _bad(message, change, case_id=None):
    return pytest.param(change, message, id=case_id or message.replace("\\", ""))


BAD_ARGUMENTS = [
    _bad("x must be a 2-D", lambda c: c.update(x=c["x"][0])),
    _bad("x dtype", lambda c: c.update(x=c["x"].double())),
    _bad("gate_proj must be a 3-D", lambda c: c.update(gate=c["gate"][0])),
    _bad("gate_proj must be \\[E, I, H", lambda c: c.update(gate=c["gate"][..., 1:].contiguous())),
    _bad("up_proj dtype", lambda c: c.update(up=c["up"].half())),
    _bad("up_proj shape", lambda c: c.update(up=c["up"][:, 1:].contiguous())),
    _bad("down_proj must be \\[E", lambda c: c.update(down=c["down"].transpose(1, 2).contiguous())),
    _bad("down_proj must be contiguous", lambda c: c.update(down=c["down"].transpose(1, 2).contiguous()
                                                           .transpose(1, 2))),
    _bad("ids must be a 2-D", lambda c: c.update(ids=c["ids"][0])),
    _bad("ids must be a 2-D", lambda c: c.update(ids=c["ids"][:1]), "ids wrong T"),
    _bad("ids dtype", lambda c: c.update(ids=c["ids"].int())),
    _bad("ids must have k >= 1", lambda c: c.update(ids=c["ids"][:, :0], weights=c["weights"][:, :0])),
    _bad("weights must have ids' shape", lambda c: c.update(weights=c["weights"][:, :1])),
    _bad("weights dtype", lambda c: c.update(weights=c["weights"].half())),
    _bad("weights is on meta", lambda c: c.update(weights=c["weights"].to("meta"))),
    _bad("up_proj is on meta", lambda c: c.update(up=c["up"].to("meta"))),
    _bad("out must be", lambda c: c.update(out=torch.empty(2, HIDDEN, dtype=torch.float16))),
    _bad("out must be", lambda c: c.update(out=torch.empty(HIDDEN, 2).T), "out strided"),
    _bad("block_i must be a power of two", lambda c: c.update(block_i=24)),
    _bad("block_k_down must be a power of two", lambda c: c.update(block_k_down=0)),
]


@pytest.mark.parametrize("change,message", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error(change, message):
    case = make_case(2, HIDDEN, INTER, EXPERTS, TOP_K, torch.float32, "cpu")
    args = dict(x=case["x"], gate=case["gate"], up=case["up"], down=case["down"], ids=case["ids"],
                weights=case["weights"])
    change(args)
    x, gate, up, down, ids, weights = (args.pop(n) for n in ("x", "gate", "up", "down", "ids", "weights"))
    with pytest.raises(ValueError, match=f"^{message}"):
        moe_decode(x, gate, up, down, ids, weights, **args)


def _experts(hidden, inter, experts, top_k, dtype, device, seed=0, backend="auto"):
    config = dataclasses.replace(ModelConfig.preset("tiny"), hidden_size=hidden, moe_intermediate_size=inter,
                                 n_routed_experts=experts, num_experts_per_tok=top_k)
    with torch.device(device):
        module = Experts(config, dtype, backend=backend)
    g = torch.Generator(device=device).manual_seed(seed)
    for p in module.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g, device=device) * p.shape[-1] ** -0.5)
    return module


def _torch_decode_path(experts, x, ids, weights):
    """Experts.forward's decode path before the kernel: gathered weights, fp32 combine."""
    y = gathered_experts(x, experts.gate_proj, experts.up_proj, experts.down_proj, ids)
    return (y.float() * weights[..., None]).sum(1).to(x.dtype)


def _count_kernel_calls(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return moe_decode(*args, **kwargs)

    monkeypatch.setattr(moe_layer, "moe_decode", spy)
    return calls


def test_model_decode_path_runs_kernel_in_interpreter(monkeypatch):
    # On a CPU the "auto" backend keeps the torch path; "kernel" runs the kernel here, in the interpreter.
    calls = _count_kernel_calls(monkeypatch)
    experts = _experts(HIDDEN, INTER, EXPERTS, TOP_K, torch.float32, "cpu", seed=8, backend="kernel")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, HIDDEN, generator=g)
    ids = torch.tensor([[2, 7, 0], [7, 2, 5], [8, 1, 7]])
    weights = torch.rand(3, TOP_K, generator=g)
    # fp32 both ways; the torch path rounds nothing below fp32 either: only summation order differs
    torch.testing.assert_close(experts(x, ids, weights), _torch_decode_path(experts, x, ids, weights),
                               rtol=1e-5, atol=1e-6)
    assert calls == [(3, HIDDEN)]
    x4 = torch.randn(4, HIDDEN, generator=g)  # 4 * 3 > 9 experts: the grouped (prefill) path, no kernel
    experts(x4, torch.tensor([[0, 1, 2]] * 4), torch.rand(4, TOP_K, generator=g))
    assert len(calls) == 1


def test_model_keeps_torch_path_on_cpu(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    experts = _experts(HIDDEN, INTER, EXPERTS, TOP_K, torch.float32, "cpu")
    experts(torch.randn(1, HIDDEN), torch.tensor([[0, 1, 2]]), torch.rand(1, TOP_K))
    assert calls == []


# ---------------------------------------------------------------- GPU, real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4])
def test_gpu_air_shapes_bf16(t):
    case = make_case(t, AIR["hidden"], AIR["inter"], AIR["experts"], AIR["top_k"], torch.bfloat16, "cuda", seed=t)
    case["ids"][-1, 0] = case["ids"][0, 1]  # an expert shared between (or, at T=1, repeated within) tokens
    run_and_check(case, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes", [(HIDDEN, INTER, EXPERTS, TOP_K), (1000, 333, 17, 4)], ids=["tiny", "odd"])
def test_gpu_odd_sizes(dtype, sizes):
    case = make_case(3, *sizes, dtype, "cuda", seed=sizes[0])
    run_and_check(case, dtype)
    run_and_check(case, dtype, **SMALL_BLOCKS)


@pytest.mark.gpu
def test_gpu_out_of_range_ids_are_masked():
    case = make_case(2, 1000, 333, 17, 4, torch.bfloat16, "cuda", seed=3)
    case["ids"][0, 0], case["ids"][1, 2], case["ids"][1, 3] = -5, 17, 2**40
    run_and_check(case, torch.bfloat16)
    torch.cuda.synchronize()  # an illegal address would surface here


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_new_routing():
    # No host sync in the launcher: one captured call, replayed as ids/weights/x change, gives the eager
    # result to the bit (same kernels, same inputs, no atomics).
    case = make_case(2, AIR["hidden"], AIR["inter"], AIR["experts"], AIR["top_k"], torch.bfloat16, "cuda")
    x, ids, weights = case["x"].clone(), case["ids"].clone(), case["weights"].clone()

    def call():
        return moe_decode(x, case["gate"], case["up"], case["down"], ids, weights)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    g = torch.Generator(device="cuda").manual_seed(11)
    for _ in range(3):
        ids.copy_(torch.randint(0, AIR["experts"], ids.shape, generator=g, device="cuda"))
        weights.copy_(torch.rand(weights.shape, generator=g, device="cuda"))
        x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        graph.replay()
        assert torch.equal(out, call())


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4])
def test_gpu_model_decode_path_equals_old_gathered_path(monkeypatch, t):
    # Experts.forward with T*k <= E runs the kernel on CUDA; the old path rounds g, u, h and each expert's
    # output to bf16 (each ~2^-8 relative), the kernel only y: they agree to ~1e-2, and the kernel must be
    # the closer of the two to the float64 reference.
    calls = _count_kernel_calls(monkeypatch)
    experts = _experts(AIR["hidden"], AIR["inter"], AIR["experts"], AIR["top_k"], torch.bfloat16, "cuda", seed=t)
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, AIR["hidden"], generator=g, device="cuda").bfloat16()
    cpu = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(AIR["experts"], generator=cpu)[:AIR["top_k"]] for _ in range(t)]).cuda()
    weights = torch.rand(t, AIR["top_k"], generator=g, device="cuda")
    new = experts(x, ids, weights)
    assert calls == [(t, AIR["hidden"])]
    old = _torch_decode_path(experts, x, ids, weights)
    ref = moe_ref(x, experts.gate_proj, experts.up_proj, experts.down_proj, ids, weights)
    err_new = (new.double().cpu() - ref).norm() / ref.norm()
    err_old = (old.double().cpu() - ref).norm() / ref.norm()
    assert (new.double() - old.double()).norm() / old.double().norm() < 2e-2
    assert err_new < FROBENIUS_TOL[torch.bfloat16] and err_new <= err_old, (err_new, err_old)
