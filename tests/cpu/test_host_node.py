"""The CPU expert kernel's host-node entry (moe_kernel.c glmtg_cpu_moe_node, glmtg.cpu.host_node.NodeArgs),
called directly through ctypes with a struct, as the CUDA driver's callback thread calls it.

Checks: the ctypes struct has the C struct's size and offsets; the node's output is bit-identical to
``cpu_moe``'s (the same C function underneath: exact equality is the tolerance) on random inputs with odd T
and slots routed elsewhere (-1 and ids >= E); a failing call leaves NaN and its code. The CUDA path
(pinned staging, cudaLaunchHostFunc, graphs) is tests/cpu/test_host_node_gpu.py.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from glmtg.cpu import CPU_FORMATS, cpu_moe
from glmtg.cpu.build import kernel_library
from glmtg.cpu.host_node import _FIELDS, NodeArgs, layout_matches
from tests.references.gguf_weights import gguf_weight

E = 5

# (gate/up format, down format, H, I, T, k): odd T, formats of both block widths
CASES = [
    ("q4_0", "q4_0", 96, 160, 3, 4),
    ("q4_k", "q6_k", 256, 256, 5, 3),
    ("iq4_nl", "q5_1", 160, 96, 1, 6),
    ("q8_0", "q5_0", 64, 224, 7, 2),
]


@pytest.fixture(scope="module")
def lib():
    lib = kernel_library()
    if lib is None:
        pytest.skip("no C compiler: the host node needs the compiled kernel")
    return lib


def _inputs(fmt_gu: str, fmt_d: str, h: int, i: int, t: int, k: int, seed: int):
    gate, up = (gguf_weight(fmt_gu, (E, i), h, seed + j) for j in (0, 1))
    down = gguf_weight(fmt_d, (E, h), i, seed + 2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * 0.1
    # distinct ids per token from [-1, E + 2): -1, E and E + 1 are slots held elsewhere (add nothing)
    ids = torch.stack([torch.randperm(E + 3, generator=g)[:k] - 1 for _ in range(t)]).to(torch.int64)
    weights = torch.rand(t, k, generator=g) + 0.1
    return x, gate, up, down, ids, weights


def _node_args(x, gate, up, down, ids, weights, out, fgu: int, fd: int, threads: int) -> NodeArgs:
    t, h = x.shape
    return NodeArgs(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), out.data_ptr(), gate.data_ptr(),
                    up.data_ptr(), down.data_ptr(), t, h, gate.shape[1], gate.shape[0], ids.shape[1], fgu, fd,
                    threads, -7)


def test_struct_layout_matches_the_c_side(lib):
    values = (ctypes.c_int64 * 32)()
    n = lib.glmtg_cpu_moe_node_layout(values, 32)
    assert n == 1 + len(_FIELDS)
    assert values[0] == ctypes.sizeof(NodeArgs)
    assert list(values[1:n]) == [getattr(NodeArgs, f).offset for f in _FIELDS]
    assert layout_matches(lib)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-T{c[4]}" for c in CASES])
def test_node_entry_is_bit_identical_to_cpu_moe(lib, case):
    fmt_gu, fmt_d, h, i, t, k = case
    x, gate, up, down, ids, weights = _inputs(fmt_gu, fmt_d, h, i, t, k, seed=CASES.index(case) * 10 + 1)
    assert (ids < 0).any() or (ids >= E).any()  # some slots are held elsewhere
    want = cpu_moe(x, gate, up, down, ids, weights, fmt_gu, fmt_d, threads=3)
    out = torch.full((t, h), float("nan"))
    args = _node_args(x, gate, up, down, ids, weights, out, CPU_FORMATS[fmt_gu], CPU_FORMATS[fmt_d], 3)
    lib.glmtg_cpu_moe_node(ctypes.addressof(args))
    assert args.rc == 0
    assert want.abs().max() > 0 and torch.equal(out, want)
    # a second call on the same struct (as a graph replays it) reads the buffers afresh
    x.copy_(torch.randn(t, h, generator=torch.Generator().manual_seed(99)) * 0.1)
    out.fill_(float("nan"))
    lib.glmtg_cpu_moe_node(ctypes.addressof(args))
    assert torch.equal(out, cpu_moe(x, gate, up, down, ids, weights, fmt_gu, fmt_d, threads=3))
    assert not torch.equal(out, want)


def test_failing_call_leaves_nan_and_its_code(lib):
    x, gate, up, down, ids, weights = _inputs("q4_0", "q4_0", 64, 96, 3, 2, seed=5)
    out = torch.zeros(3, 64)
    args = _node_args(x, gate, up, down, ids, weights, out, 99, CPU_FORMATS["q4_0"], 2)  # 99: no such format
    lib.glmtg_cpu_moe_node(ctypes.addressof(args))
    assert args.rc == 1 and torch.isnan(out).all()
