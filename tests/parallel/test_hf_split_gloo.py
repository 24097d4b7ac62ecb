"""-sm graph / -sm layer over an HF (safetensors) directory: ``load_model(build=...)`` fills one rank's part
from the checkpoint, reading only that part, and 2 gloo ranks give the single-process logits of the same
directory.

The checkpoint is the tiny preset (3 layers: one dense, two MoE) drawn in float32, stored in bfloat16 in two
safetensors shards, loaded as float32 (so the bf16 -> f32 conversion of a slice is exercised).

Tolerances: -sm graph, 2e-5 of the largest logit (tests/parallel/test_tp_gloo.py's: the split sums the same
float32 products in another order, ~3e-7 measured; one mis-cut slice moves logits by > 1e-3). -sm layer: 0
(each stage runs whole layers on the same weights; the activations are handed on unchanged). The weights a
rank loads are compared bitwise with the slices ``load_from_full`` cuts from the whole loaded model: the same
checkpoint values, read by get_slice instead of whole.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmtg.config import ModelConfig
from glmtg.loading import load_model
from glmtg.loading import safetensors as st
from glmtg.loading.presets import random_model
from glmtg.parallel import (
    LayerSplitModel,
    TPGroup,
    build_tp_model,
    layer_ranges,
    load_from_full,
    load_split_from_full,
    local_kv_heads,
)
from tests.references.gloo import assert_rank_logits, prefill_then_decode, spawn_ranks
from tests.references.hf_dir import write_hf_dir

CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=3, first_k_dense_replace=1)
GRAPH_REL_TOL = 2e-5
RATIOS = (2.0, 1.0)
BATCH, PROMPT, DECODE_STEPS = 2, 5, 2


def _graph(group: TPGroup, split: str = "width"):
    return lambda config, formats: build_tp_model(config, group, torch.float32, weight_formats=formats,
                                                  experts_split=split)


def _stage(group: TPGroup):
    layers = layer_ranges(CONFIG.num_hidden_layers, RATIOS)[group.rank]
    return lambda config, formats: LayerSplitModel(config, group, layers, torch.float32, weight_formats=formats)


def _same_weights(part: torch.nn.Module, ref: torch.nn.Module) -> None:
    got, want = dict(part.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for name, p in got.items():
        assert torch.equal(p, want[name]), name


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf") / "tiny"
    return write_hf_dir(root, random_model(CONFIG, dtype=torch.float32), CONFIG, dtype=torch.bfloat16, shards=2)


def _worker(group: TPGroup, root: str, mode: str, split: str = "width") -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    whole, config = load_model(root, dtype=torch.float32, progress=False)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(4))
    ref = prefill_then_decode(whole, config, config.num_hidden_layers, ids, PROMPT)
    if mode == "graph":
        part, _ = load_model(root, dtype=torch.float32, progress=False, build=_graph(group, split))
        _same_weights(part, load_from_full(_graph(group, split)(config, None), whole))
        got = prefill_then_decode(part, config, config.num_hidden_layers, ids, PROMPT,
                                  kv_heads=local_kv_heads(config, group))
        assert_rank_logits(got, ref, GRAPH_REL_TOL, group.rank, group.world_size)
    else:
        part, _ = load_model(root, dtype=torch.float32, progress=False, build=_stage(group))
        _same_weights(part, load_split_from_full(_stage(group)(config, None), whole))
        got = prefill_then_decode(part, config, part.num_layers, ids, PROMPT)
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            assert torch.equal(g, r), f"rank {group.rank} step {i}: max |diff| {(g - r).abs().max():.3g}"


@pytest.mark.parametrize("mode, split", [("graph", "width"), ("graph", "expert"), ("layer", None)])
def test_split_hf_dir_matches_single_process(hf_dir, mode, split) -> None:
    spawn_ranks(_worker, 2, (str(hf_dir), mode, split))


def _reads(monkeypatch) -> list[tuple[str, tuple | None]]:
    """Record every (tensor, index) load_model reads: the whole tensor for index None or ()."""
    reads: list[tuple[str, tuple | None]] = []
    real = st._read

    def spy(f, name, file, index):
        reads.append((name, index))
        return real(f, name, file, index)

    monkeypatch.setattr(st, "_read", spy)
    return reads


@pytest.mark.parametrize("split", ["width", "expert"])
def test_graph_rank_reads_only_its_slices(hf_dir, monkeypatch, split) -> None:
    """Rank 1 of 2 (built without torch.distributed: loading communicates nothing) reads its rows of q/k/v and
    gate/up, its columns of o_proj and down, experts 4..7 only (by expert) or every expert's second half of
    its width (width), and the replicated tensors whole."""
    log = _reads(monkeypatch)
    load_model(hf_dir, dtype=torch.float32, progress=False, build=_graph(TPGroup(1, 2), split))
    reads = dict(log)
    assert len(reads) == len(log)  # no tensor read twice
    q_rows = CONFIG.num_attention_heads * CONFIG.head_dim
    assert reads["model.layers.0.self_attn.q_proj.weight"] == (slice(q_rows // 2, q_rows),)
    assert reads["model.layers.0.self_attn.k_proj.bias"] == (slice(CONFIG.head_dim, 2 * CONFIG.head_dim),)
    assert reads["model.layers.1.self_attn.o_proj.weight"] == (slice(None), slice(q_rows // 2, q_rows))
    inner = CONFIG.intermediate_size
    assert reads["model.layers.0.mlp.up_proj.weight"] == (slice(inner // 2, inner),)
    assert reads["model.layers.0.mlp.down_proj.weight"] == (slice(None), slice(inner // 2, inner))
    shared = CONFIG.moe_intermediate_size
    assert reads["model.layers.2.mlp.shared_experts.down_proj.weight"] == (slice(None), slice(shared // 2, shared))
    experts = {int(n.split(".")[5]) for n in reads if ".mlp.experts." in n}
    if split == "expert":
        assert experts == set(range(CONFIG.n_routed_experts // 2, CONFIG.n_routed_experts))
        assert reads["model.layers.1.mlp.experts.5.gate_proj.weight"] is None
    else:
        assert experts == set(range(CONFIG.n_routed_experts))
        half = slice(shared // 2, shared)  # moe_intermediate_size: the shared expert's width too
        assert reads["model.layers.1.mlp.experts.0.gate_proj.weight"] == (half,)
        assert reads["model.layers.2.mlp.experts.7.up_proj.weight"] == (half,)
        assert reads["model.layers.2.mlp.experts.3.down_proj.weight"] == (slice(None), half)
    vocab = CONFIG.vocab_size  # the head is split by vocabulary rows
    assert reads["lm_head.weight"] == (slice(vocab // 2, vocab),)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight"):
        assert reads[name] is None, name


def test_layer_stage_reads_only_its_layers(hf_dir, monkeypatch) -> None:
    reads = _reads(monkeypatch)
    load_model(hf_dir, dtype=torch.float32, progress=False, build=_stage(TPGroup(1, 2)))
    names = {name for name, _ in reads}
    assert all(index is None for _, index in reads)
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"2"}
    assert "model.embed_tokens.weight" not in names and {"model.norm.weight", "lm_head.weight"} <= names


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the two-shard checkpoint ``src`` with ``change(state)`` applied to its tensors, as one file."""
    dst.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    change(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("what, change, match", [
    # a tensor no part wants is refused by every rank
    ("unknown", lambda s: s.__setitem__("model.rotary.inv_freq", torch.ones(4)), "not a GLM4-MoE tensor"),
    # tensors of rank 0's part only: rank 1 does not read them but still judges them
    ("shape", lambda s: s.__setitem__("model.embed_tokens.weight", torch.ones(3, CONFIG.hidden_size)),
     "model.embed_tokens.weight has shape"),
    ("dtype", lambda s: s.__setitem__("model.layers.0.input_layernorm.weight",
                                      torch.ones(CONFIG.hidden_size, dtype=torch.int32)), "has dtype int32"),
    ("missing", lambda s: s.pop("model.layers.1.mlp.experts.0.up_proj.weight"), "missing"),
])
@pytest.mark.parametrize("mode", ["graph", "layer"])
def test_split_load_judges_the_whole_checkpoint(hf_dir, tmp_path, what, change, match, mode) -> None:
    root = _rewrite(hf_dir, tmp_path / what, change)
    group = TPGroup(1, 2)
    build = _graph(group) if mode == "graph" else _stage(group)
    with pytest.raises(ValueError, match=match) as info:
        load_model(root, dtype=torch.float32, progress=False, build=build)
    assert "\n" not in str(info.value)


def test_non_finite_value_in_a_read_slice_is_refused(hf_dir, tmp_path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"

    def poison(state):
        state[name] = state[name].clone()
        state[name][-1, 3] = float("nan")  # the last row: rank 1's half

    root = _rewrite(hf_dir, tmp_path / "nan", poison)
    with pytest.raises(ValueError, match=rf"tensor {name} holds 1 non-finite"):
        load_model(root, dtype=torch.float32, progress=False, build=_graph(TPGroup(1, 2)))


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_load_kept_stores_what_load_shard_keeps(rank) -> None:
    """Each tensor-parallel linear given ``whole[kept(...)]`` holds what it holds given the whole tensor
    (3 ranks, odd widths: 5 input features per rank, shards of 3 and 6 rows per rank)."""
    from glmtg.parallel import ColumnParallelLinear, RowParallelLinear

    group, gen = TPGroup(rank, 3), torch.Generator().manual_seed(rank)
    shards = (("gate", 9), ("up", 18))
    a = ColumnParallelLinear(15, shards, bias=True, dtype=torch.float64, tp=group)
    b = ColumnParallelLinear(15, shards, bias=True, dtype=torch.float64, tp=group)
    for name, rows in shards:
        for param, shape in (("weight", (rows, 15)), ("bias", (rows,))):
            whole = torch.randn(shape, generator=gen, dtype=torch.float64)
            a.load_shard(param, name, whole)
            b.load_kept(param, name, whole[b.kept(param, name)])
    r1 = RowParallelLinear(15, 7, bias=True, dtype=torch.float64, tp=group)
    r2 = RowParallelLinear(15, 7, bias=True, dtype=torch.float64, tp=group)
    for param, shape in (("weight", (7, 15)), ("bias", (7,))):
        whole = torch.randn(shape, generator=gen, dtype=torch.float64)
        r1.load_shard(param, None, whole)
        r2.load_kept(param, None, whole[r2.kept(param, None)])
    for x, y in ((a, b), (r1, r2)):
        assert torch.equal(x.weight, y.weight) and torch.equal(x.bias, y.bias)
    assert r2.weight.shape == (7, 5) and a.weight.shape == (9, 15)
