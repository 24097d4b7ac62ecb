"""Cutting GGUF-block weights for tensor parallelism (no processes started): the block partition, the byte
slicing against the whole tensor's dequantized values, each rank's weights as slices of the whole model's,
a GGUF file loaded per rank, and the refusals.

Exactness: dequantizing a row's blocks [b0, b1) reads exactly the bytes dequantizing the whole row reads for
those values, so every comparison here is bitwise (torch.equal)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from glmtg.formats import dequantize_blocks, quantize_blocks
from glmtg.layers.quant_linear import QuantLinear
from glmtg.loading.gguf_model import load_gguf_model
from glmtg.loading.gguf_writer import model_tensors, write_gguf
from glmtg.parallel import TPGroup, build_tp_model, load_from_full
from glmtg.parallel.quant_linear import (
    QuantRowParallelLinear,
    block_partition,
    partition_columns,
    slice_block_columns,
)
from tests.references.model import Float32Cache
from tests.references.quant_tp import CONFIG, mix_formats, random_quant_model


def test_block_partition_is_balanced_and_covers() -> None:
    for n, parts in [(44, 8), (342, 4), (342, 8), (7, 4), (5, 2), (8, 4), (3, 4)]:
        ranges = block_partition(n, parts)
        sizes = [b - a for a, b in ranges]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a1 == b0 for (_, a1), (b0, _) in itertools.pairwise(ranges))
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert block_partition(44, 8) == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 29), (29, 34), (34, 39), (39, 44)]
    assert [b - a for a, b in block_partition(342, 4)] == [86, 86, 85, 85]


@pytest.mark.parametrize("n, parts", [(-1, 2), (4, 0), (4, True), (2.0, 2)])
def test_block_partition_refuses_bad_input(n, parts) -> None:
    with pytest.raises(ValueError, match="n_blocks|parts"):
        block_partition(n, parts)


def test_partition_columns_air_widths() -> None:
    # Air's moe_intermediate 1408 (44 blocks of 32) over 8 ranks and intermediate 10944 (342) over 4
    for width, world in [(1408, 8), (10944, 4), (10944, 8), (1408, 3)]:
        cuts = [partition_columns(width, 32, TPGroup(r, world), "w") for r in range(world)]
        assert cuts[0].start == 0 and cuts[-1].stop == width
        assert all(c.start % 32 == 0 and c.stop % 32 == 0 and c.stop > c.start for c in cuts)
        assert all(a.stop == b.start for a, b in itertools.pairwise(cuts))
    assert [partition_columns(96, 32, TPGroup(r, 4), "w") for r in range(4)] == \
        [slice(0, 32), slice(32, 64), slice(64, 96), slice(96, 96)]  # fewer blocks than ranks: the last gets none
    with pytest.raises(ValueError, match="w \\(100\\) is not a whole number of blocks of 32"):
        partition_columns(100, 32, TPGroup(0, 2), "w")


@pytest.mark.parametrize("fmt, width, cols", [("q8_0", 160, slice(32, 96)), ("q4_0", 224, slice(192, 224)),
                                              ("q5_0", 96, slice(0, 64)), ("q4_k", 768, slice(256, 768)),
                                              ("q6_k", 512, slice(0, 256))])
def test_sliced_blocks_dequantize_to_the_whole_tensors_slice(fmt, width, cols) -> None:
    values = torch.randn(5, width, generator=torch.Generator().manual_seed(3))
    raw = quantize_blocks(values, fmt)
    whole = dequantize_blocks(raw, fmt)
    part = dequantize_blocks(slice_block_columns(raw, fmt, cols).contiguous(), fmt)
    assert torch.equal(part, whole[:, cols])


def test_slicing_refuses_cuts_inside_a_block() -> None:
    raw = quantize_blocks(torch.randn(2, 96), "q8_0")
    for cols in (slice(16, 64), slice(32, 80), slice(64, 64), slice(0, 128)):
        with pytest.raises(ValueError, match="cols|raw"):
            slice_block_columns(raw, "q8_0", cols)


def _deq(linear: QuantLinear, shard: str | None) -> torch.Tensor:
    return dequantize_blocks(linear.raw_shard(shard).contiguous(), linear.storage(shard)[1])


def _deq_stack(experts, param: str) -> torch.Tensor:
    return dequantize_blocks(getattr(experts, param).contiguous(), experts.formats[param])


@pytest.mark.parametrize("split", ["expert", "width"])
@pytest.mark.parametrize("world", [2, 4])
def test_rank_weights_are_the_whole_models_slices(world: int, split: str) -> None:
    """Rank r: down's columns and gate/up's rows are one block cut of the inner width, ranks' cuts tile it;
    q/k/v rows by whole KV heads, o_proj's columns to match; routed experts by range, or every expert cut as
    the shared expert (the same width, 96, and down format, q5_0); the head by vocabulary rows; the embedding whole."""
    full = random_quant_model()
    d, hq, hkv = CONFIG.head_dim, CONFIG.num_attention_heads, CONFIG.num_key_value_heads
    covered = {"dense": 0, "shared": 0}
    for r in range(world):
        model = load_from_full(build_tp_model(CONFIG, TPGroup(r, world), torch.float32,
                                              weight_formats=mix_formats(), experts_split=split), full)
        if split == "width":
            part, whole = model.layers[1].mlp.experts, full.layers[1].mlp.experts
            if world == 4 and r == 3:  # no block of the 3: one block of zeros against the first block's rows
                assert part.down_proj.shape[2] == 22 and not part.down_proj.any()
                assert torch.equal(_deq_stack(part, "gate_proj"), _deq_stack(whole, "gate_proj")[:, :32])
            else:
                cols = slice(covered["shared"], covered["shared"] + model.layers[1].mlp.shared.down_proj.in_features)
                assert torch.equal(_deq_stack(part, "down_proj"), _deq_stack(whole, "down_proj")[:, :, cols])
                for param in ("gate_proj", "up_proj"):
                    assert torch.equal(_deq_stack(part, param), _deq_stack(whole, param)[:, cols])
        for key, part, whole in (("dense", model.layers[0].mlp, full.layers[0].mlp),
                                 ("shared", model.layers[1].mlp.shared, full.layers[1].mlp.shared)):
            lo, width = covered[key], part.down_proj.in_features
            if world == 4 and r == 3 and key == "shared":  # 3 blocks over 4 ranks: one block of zeros here
                assert width == 32 and not part.down_proj.weight.any() and not _deq(part.down_proj, None).any()
                assert torch.equal(_deq(part.gate_up, "gate"), _deq(whole.gate_up, "gate")[:32])
                continue
            cols = slice(lo, lo + width)
            covered[key] += width
            assert torch.equal(_deq(part.down_proj, None), _deq(whole.down_proj, None)[:, cols])
            for shard in ("gate", "up"):
                assert torch.equal(_deq(part.gate_up, shard), _deq(whole.gate_up, shard)[cols])
        pa, wa = model.layers[1].attn, full.layers[1].attn
        q = slice(r * hq // world * d, (r + 1) * hq // world * d)
        kv = slice(r * hkv // world * d, (r + 1) * hkv // world * d)
        for shard, rows in (("q", q), ("k", kv), ("v", kv)):
            assert torch.equal(_deq(pa.qkv, shard), _deq(wa.qkv, shard)[rows])
        assert torch.equal(pa.qkv.bias, torch.cat([b[rows] for b, rows in zip(wa.qkv.split(wa.qkv.bias), (q, kv, kv))]))
        assert torch.equal(_deq(pa.o_proj, None), _deq(wa.o_proj, None)[:, q])
        if split == "expert":
            e = CONFIG.n_routed_experts // world
            assert torch.equal(model.layers[1].mlp.experts.down_proj,
                               full.layers[1].mlp.experts.down_proj[r * e:(r + 1) * e])
        assert torch.equal(model.embed.weight, full.embed.weight)
        v = CONFIG.vocab_size // world  # the head: vocabulary rows [r V/N, (r+1) V/N)
        assert torch.equal(model.lm_head.weight, full.lm_head.weight[r * v:(r + 1) * v])
    assert covered == {"dense": CONFIG.intermediate_size, "shared": CONFIG.moe_intermediate_size}


def test_single_rank_is_the_whole_model() -> None:
    """A group of one: bitwise the single-process quantized model."""
    full = random_quant_model()
    model = load_from_full(build_tp_model(CONFIG, TPGroup.single(), torch.float32, weight_formats=mix_formats()),
                           full)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    caches = [Float32Cache(CONFIG.num_hidden_layers, 2, 6, CONFIG.num_key_value_heads, CONFIG.head_dim)
              for _ in range(2)]
    assert torch.equal(model(ids, caches[0]), full(ids, caches[1]))


@pytest.mark.parametrize("split", ["width", "expert"])
def test_gguf_file_loads_per_rank(tmp_path, split, monkeypatch) -> None:
    """load_gguf_model(build=a rank's model) holds what load_from_full cuts from the whole model (the file's
    expert stacks cut on the host, never handed whole to a width-split rank, or read for its range); o_proj
    kept in F32 in the file goes through the float row-parallel linear."""
    from glmtg.parallel.experts import QuantWidthExperts

    def whole_stack_given(*args, **kwargs):
        raise AssertionError("a whole expert stack went to the device")

    formats = mix_formats({"attn.o_proj.weight": None})
    full = random_quant_model(weight_formats=formats)
    path = tmp_path / "tiny-tp.gguf"
    write_gguf(path, CONFIG, model_tensors(full))
    world = 4
    for r in range(world):
        tp = TPGroup(r, world)
        with monkeypatch.context() as m:
            m.setattr(QuantWidthExperts, "load_expert", whole_stack_given)
            got, config = load_gguf_model(path, device="cpu", dtype=torch.float32, progress=False,
                                          build=lambda c, wf, tp=tp: build_tp_model(
                                              c, tp, torch.float32, weight_formats=wf, experts_split=split))
        want = load_from_full(build_tp_model(CONFIG, tp, torch.float32, weight_formats=formats,
                                             experts_split=split), full)
        assert config == CONFIG
        got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
        assert got_params.keys() == want_params.keys()
        for name, p in want_params.items():
            assert torch.equal(got_params[name], p), name


def test_o_proj_blocks_must_tile_a_ranks_heads() -> None:
    # q4_k blocks of 256 tile o_proj's 1536 columns, not a rank's 6 heads x 64 = 384 of them
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.o_proj is q4_k.*256.*384"):
        build_tp_model(CONFIG, TPGroup(0, 4), torch.float32, weight_formats=mix_formats({"attn.o_proj.weight": "q4_k"}))


def test_fewer_blocks_than_ranks() -> None:
    """The tiny preset's shared expert (32 = one block) over 2 ranks: rank 1 holds a zero block, whose
    partial product is exactly 0; the float model of one block still splits evenly (16 + 16)."""
    config = dataclasses.replace(CONFIG, moe_intermediate_size=32)
    full = random_quant_model(config)
    model = load_from_full(build_tp_model(config, TPGroup(1, 2), torch.float32, weight_formats=mix_formats()), full)
    down = model.layers[1].mlp.shared.down_proj
    assert down.in_features == 32 and not down.weight.any()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    assert not down(x).any()  # reduce=False (the MoE sums): the partial product alone
    build_tp_model(config, TPGroup(1, 2), torch.float32)


def test_uneven_float_matrix_is_refused() -> None:
    # a float down_proj (an F32 tensor in a file) keeps the float TP's even split: 224 over 3 ranks is not one
    config = dataclasses.replace(CONFIG, num_attention_heads=18, num_key_value_heads=3)
    formats = mix_formats({"mlp.down_proj.weight": None})
    with pytest.raises(ValueError, match=r"layers\.0\.mlp inner width \(224\) must be a multiple of .* 3"):
        build_tp_model(config, TPGroup(0, 3), torch.float32, weight_formats=formats)
    build_tp_model(config, TPGroup(0, 3), torch.float32, weight_formats=mix_formats())  # all blocks: uneven is fine


def test_loading_checks_formats_and_bytes() -> None:
    full = random_quant_model()
    other = build_tp_model(CONFIG, TPGroup(0, 2), torch.float32, weight_formats=mix_formats({"mlp.down_proj.weight": "q4_0"}))
    with pytest.raises(ValueError, match="weight"):
        load_from_full(other, full)  # q8_0 blocks of down_proj offered to a q4_0 slot
    row = QuantRowParallelLinear(96, 8, cols=slice(64, 96), bias=False, formats="q8_0", dtype=torch.float32,
                                 tp=TPGroup(1, 2))
    with pytest.raises(ValueError, match="expected raw q8_0 blocks \\[rows, 102\\]"):
        row.load_shard("weight", None, torch.zeros(8, 68, dtype=torch.uint8))
    with pytest.raises(ValueError, match="format q5_0 has blocks of 32"):
        QuantRowParallelLinear(96, 8, cols=slice(16, 96), bias=False, formats="q5_0", dtype=torch.float32,
                               tp=TPGroup(1, 2))
