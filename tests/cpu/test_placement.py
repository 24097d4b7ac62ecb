"""glmtg.cpu.placement: llama.cpp's --cpu-moe, --n-cpu-moe N and -ot REGEX=DEVICE, resolved per layer."""

from __future__ import annotations

import pytest

from glmtg.cpu.placement import HostPlacement, resolve, rules_of

EXPS = ("gate", "up", "down")


def names(layers: int = 5, dense: int = 1) -> list[str]:
    """A glm4moe tensor table: dense layers first, then MoE layers with router, shared and routed experts."""
    out = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(layers):
        out += [f"blk.{i}.attn_norm.weight", f"blk.{i}.attn_q.weight", f"blk.{i}.attn_q.bias"]
        if i < dense:
            out += [f"blk.{i}.ffn_{p}.weight" for p in EXPS]
        else:
            out += [f"blk.{i}.ffn_gate_inp.weight", f"blk.{i}.exp_probs_b.bias"]
            out += [f"blk.{i}.ffn_{p}_shexp.weight" for p in EXPS]
            out += [f"blk.{i}.ffn_{p}_exps.weight" for p in EXPS]
    return out


def host(*flags: tuple[str, object], layers: int = 5) -> set[int]:
    return set(resolve(rules_of(flags), names(layers)).layers)


def test_no_flags_keep_everything_on_the_device():
    placement = resolve(rules_of([]), names())
    assert placement == HostPlacement() and not placement and not placement.on_host(1)


def test_cpu_moe_puts_every_moe_layer_on_the_host():
    assert host(("--cpu-moe", None)) == {1, 2, 3, 4}
    assert host(("-cmoe", None)) == {1, 2, 3, 4}


@pytest.mark.parametrize("n, want", [(0, set()), (1, set()), (2, {1}), (4, {1, 2, 3}), (99, {1, 2, 3, 4})])
def test_n_cpu_moe_counts_blocks_from_zero(n, want):
    # llama.cpp's meaning: the first N blocks, dense ones included (block 0 has no experts to move)
    assert host(("--n-cpu-moe", n)) == want
    assert host(("-ncmoe", str(n))) == want


def test_n_cpu_moe_does_not_match_a_longer_block_number():
    # blk\.1\.ffn... must not take blk.11 or blk.12
    assert host(("--n-cpu-moe", 2), layers=13) == {1}


@pytest.mark.parametrize("spec, want", [
    ("exps=CPU", {1, 2, 3, 4}),
    (r"blk\.[23]\.ffn_.*_exps=CPU", {2, 3}),
    (r"blk\.(1|4)\.=CPU", None),  # would move attention tensors too: refused (below)
    (r"ffn_(gate|up|down)_exps=cpu", {1, 2, 3, 4}),  # device names are case-insensitive
    (r"blk\.2\.ffn=CUDA0,exps=CPU", {1, 3, 4}),  # a comma list; first match wins inside it too
    ("exps=GPU", set()),
    ("nothing-matches=CPU", set()),
])
def test_override_tensor(spec, want):
    if want is None:
        with pytest.raises(ValueError, match=r"blk\.1\.attn_norm\.weight.*only routed-expert tensors"):
            host(("-ot", spec))
    else:
        assert host(("-ot", spec)) == want
        assert host(("--override-tensor", spec)) == want


def test_first_matching_rule_wins_across_flags_in_order():
    # -ot before --cpu-moe: its GPU rule wins for layer 2; after it, --cpu-moe's rule matches first
    assert host(("-ot", r"blk\.2\.=CUDA0"), ("--cpu-moe", None)) == {1, 3, 4}
    assert host(("--cpu-moe", None), ("-ot", r"blk\.2\.=CUDA0")) == {1, 2, 3, 4}
    assert host(("-ot", r"blk\.4\.ffn_.*_exps=CPU"), ("--n-cpu-moe", 3)) == {1, 2, 4}
    # a GPU rule that also matches non-expert tensors is fine (they stay where they are)
    assert host(("-ot", "attn=CUDA1"), ("-ot", "exps=CPU")) == {1, 2, 3, 4}


def test_cpu_rule_for_other_tensors_names_the_tensor_and_the_flag():
    with pytest.raises(ValueError, match=r"^-ot .*=CPU: places tensor token_embd\.weight on the CPU, but only "
                                         r"routed-expert tensors \(\*_exps\)"):
        host(("-ot", ".*=CPU"))
    with pytest.raises(ValueError, match=r"blk\.3\.ffn_gate_inp\.weight"):
        host(("-ot", r"blk\.3\.ffn_gate_inp=CPU"))
    # the shared expert is not a routed expert
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_gate_shexp\.weight"):
        host(("-ot", "shexp=CPU"))


def test_a_layer_split_between_cpu_and_gpu_is_refused():
    with pytest.raises(ValueError, match=r"only blk\.2\.ffn_up_exps\.weight of layer 2's routed experts"):
        host(("-ot", r"blk\.2\.ffn_up_exps=CPU"))
    with pytest.raises(ValueError, match="layer 3"):
        host(("-ot", r"blk\.3\.ffn_down_exps=CUDA0"), ("--cpu-moe", None))


@pytest.mark.parametrize("flag, value, match", [
    ("--n-cpu-moe", -1, "--n-cpu-moe must be an integer >= 0"),
    ("--n-cpu-moe", "two", "--n-cpu-moe must be an integer >= 0"),
    ("--n-cpu-moe", True, "--n-cpu-moe must be an integer >= 0"),
    ("-ot", "exps", r"-ot wants REGEX=DEVICE, got 'exps' \(no '='\)"),
    ("-ot", "", "-ot wants REGEX=DEVICE"),
    ("-ot", "exps=CPU,", "-ot wants REGEX=DEVICE, got ''"),
    ("-ot", "blk.(=CPU", r"-ot 'blk.\(=CPU': bad regex"),
    ("-ot", "exps=Vulkan0", "-ot 'exps=Vulkan0': unknown device 'Vulkan0'"),
    ("-ot", "exps=CPU=x", "unknown device 'CPU=x'"),  # split at the first '=', as llama.cpp
    ("--gpu-experts", "auto", "unknown placement flag '--gpu-experts'"),
])
def test_bad_flags_name_the_flag(flag, value, match):
    with pytest.raises(ValueError, match=match):
        rules_of([(flag, value)])


def test_host_placement_checks_its_layers():
    assert HostPlacement(frozenset({3, 1})).on_host(3)
    with pytest.raises(ValueError, match="layers must be ints >= 0"):
        HostPlacement(frozenset({-1}))
    with pytest.raises(ValueError, match="layers must be ints >= 0"):
        HostPlacement(frozenset({True}))
