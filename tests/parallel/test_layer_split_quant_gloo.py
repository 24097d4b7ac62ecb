"""Layer split (-sm layer) over GGUF blocks on CPU: 2 and 3 gloo stages (-ts-style ratios) give the
single-process logits of the same quantized model, loaded from the whole model's tensors or from a GGUF file;
a stage reads from the file only the tensors it holds.

The model: tests/references/quant_tp.py's tiny config with 4 layers (one dense, three MoE) in its q8_0 / q4_0 /
q5_0 mix, seeded; the file is that model written with write_gguf (raw blocks as they are, float tensors f32).
Each stage holds whole layers in the same block formats and the activations are handed on unchanged, so
every layer runs as in the whole model on the same bytes: the logits are bitwise equal (tolerance 0). A lost
layer, a wrong cache layer, a wrong hand-over or a block read from the wrong offset changes them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.layers.quant_experts import QuantExperts
from glmtg.layers.quant_linear import QuantEmbedding, QuantLinear
from glmtg.loading.gguf import GGUFFile
from glmtg.loading.gguf_model import load_gguf_model
from glmtg.loading.gguf_writer import model_tensors, write_gguf
from glmtg.loading.names import expected_gguf_names
from glmtg.parallel import LayerSplitModel, TPGroup, layer_ranges, load_split_from_full
from tests.references.quant_tp import CONFIG as TP_CONFIG
from tests.references.quant_tp import mix_formats, random_quant_model
from tests.references.gloo import prefill_then_decode, spawn_ranks

CONFIG = dataclasses.replace(TP_CONFIG, num_hidden_layers=4)
BATCH, PROMPT, DECODE_STEPS = 2, 5, 3
# 2 stages: layers [0,1) and [1,4); 3 stages: [0,2), [2,3), [3,4)
RATIOS = {2: (1.0, 3.0), 3: (2.0, 1.0, 1.0)}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "mix.gguf"
    write_gguf(path, CONFIG, model_tensors(random_quant_model(CONFIG)))
    return path


def _run(model, num_layers: int, ids: torch.Tensor, **kw) -> list[torch.Tensor]:
    """Logits of a prefill of ids[:, :PROMPT], then one decode step per later column (fixed tokens)."""
    return prefill_then_decode(model, CONFIG, num_layers, ids[:, :PROMPT + DECODE_STEPS], PROMPT, **kw)


def _stage_builder(group: TPGroup, layers: tuple[int, int]):
    return lambda config, formats: LayerSplitModel(config, group, layers, torch.float32, weight_formats=formats)


def _worker(group: TPGroup, path: str) -> None:
    torch.set_num_threads(1)
    rank, world = group.rank, group.world_size
    full = random_quant_model(CONFIG)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(5))
    ref = _run(full, CONFIG.num_hidden_layers, ids)
    ref_last = _run(full, CONFIG.num_hidden_layers, ids, last_only=True)
    layers = layer_ranges(CONFIG.num_hidden_layers, RATIOS[world])[rank]
    from_full = load_split_from_full(
        LayerSplitModel(CONFIG, group, layers, torch.float32, weight_formats=mix_formats()), full)
    del full
    from_file, _ = load_gguf_model(path, dtype=torch.float32, progress=False, build=_stage_builder(group, layers))
    for stage in (from_full, from_file):
        for i, layer in stage.layers.items():  # the stage keeps the blocks: no float copy
            assert isinstance(layer.attn.qkv, QuantLinear)
            assert isinstance(layer.mlp.down_proj if int(i) == 0 else layer.mlp.experts, (QuantLinear, QuantExperts))
        assert not any(p.is_meta for p in stage.parameters())
        for i, (g, r) in enumerate(zip(_run(stage, stage.num_layers, ids), ref)):
            assert torch.equal(g, r), f"rank {rank}/{world} step {i}: max |diff| {(g - r).abs().max():.3g}"
        for g, r in zip(_run(stage, stage.num_layers, ids, last_only=True), ref_last):
            assert torch.equal(g, r), f"rank {rank}/{world} last_only: max |diff| {(g - r).abs().max():.3g}"


@pytest.mark.parametrize("world", [2, 3])
def test_quant_layer_split_matches_single_process(world: int, gguf_file) -> None:
    spawn_ranks(_worker, world, (str(gguf_file),))


def test_stage_reads_only_its_tensors(gguf_file, monkeypatch) -> None:
    """Each stage of 3 asks the file for its tensors alone (their bytes), holds exactly those parameters in
    their block formats, with the whole model's values; together the stages read every tensor once."""
    read: list[str] = []
    real = GGUFFile.tensor_bytes

    def recording(self, name):
        read.append(name)
        return real(self, name)

    monkeypatch.setattr(GGUFFile, "tensor_bytes", recording)
    whole, _ = load_gguf_model(gguf_file, dtype=torch.float32, progress=False)
    all_names = set(expected_gguf_names(whole.tensor_slots()))
    assert sorted(read) == sorted(all_names)
    whole_params = dict(whole.named_parameters())
    seen: list[str] = []
    for rank, layers in enumerate(layer_ranges(CONFIG.num_hidden_layers, RATIOS[3])):
        read.clear()
        stage, _ = load_gguf_model(gguf_file, dtype=torch.float32, progress=False,
                                   build=_stage_builder(TPGroup(rank, 3), layers))
        mine = set(expected_gguf_names(stage.tensor_slots()))
        assert sorted(read) == sorted(mine), f"stage {rank} read {sorted(set(read) - mine)} it does not hold"
        for name in read:  # blocks of its layers only (and the embedding / the head on the first / last)
            block = name.split(".")[1] if name.startswith("blk.") else None
            assert (block is not None and layers[0] <= int(block) < layers[1]) or \
                (name == "token_embd.weight" and rank == 0) or (name in ("output.weight", "output_norm.weight")
                                                                and rank == 2), (rank, name)
        seen += read
        names = {name for name, _ in stage.named_parameters()}
        assert names and all(stage.holds(n) for n in names)
        for name, p in stage.named_parameters():
            assert torch.equal(p, whole_params[name]), name
        assert isinstance(stage.embed, QuantEmbedding) == (rank == 0)
    assert sorted(seen) == sorted(all_names)  # every tensor read by exactly one stage
