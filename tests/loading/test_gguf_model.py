"""load_gguf_model: a written GGUF file loads into the model that was written, raw blocks bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glmtg.formats import quantize_blocks
from glmtg.layers.quant_experts import QuantExperts
from glmtg.layers.quant_linear import QuantEmbedding, QuantLinear
from glmtg.loading import gguf_writer
from glmtg.loading.gguf import open_gguf
from glmtg.loading.gguf_model import gguf_weight_bytes, load_gguf_model
from glmtg.loading.gguf_writer import model_tensors, write_gguf
from glmtg.models.glm4_moe import Glm4MoeForCausalLM
from tests.references.model import new_cache, tiny


def mix(name: str, shard: str | None) -> str | None:
    """q8_0 attention q/k/v and embedding, q4_0 FFNs and experts, q8_0 experts' down; o_proj and the head
    stay float (f32 tensors in the file)."""
    if name.endswith(("o_proj.weight", "lm_head.weight")):
        return None
    if ".mlp." in name:
        return "q8_0" if name.endswith("experts.down_proj") else "q4_0"
    return "q8_0"


def quantized_model(config, seed: int = 0) -> Glm4MoeForCausalLM:
    """Random values (nonzero biases, norms near 1) in the formats of ``mix``, on the CPU in float32."""
    model = Glm4MoeForCausalLM(config, dtype=torch.float32, device="meta", experts_backend="torch",
                               weight_formats=mix)
    gen = torch.Generator().manual_seed(seed)
    for slot in list(model.tensor_slots()):
        base = 1.0 if slot.name.endswith("norm.weight") else 0.0
        value = base + torch.randn(slot.shape, generator=gen) * (0.01 if "bias" in slot.name else 0.05)
        value = quantize_blocks(value, slot.format) if slot.format else value.to(slot.dtype)
        model.load_tensor(slot.name, value, shard=slot.shard)
    return model.eval()


def logits(model, config, ids):
    return model(ids, new_cache(config, ids.shape[0], ids.shape[1]))


def load(path, **kw):
    return load_gguf_model(path, device="cpu", dtype=torch.float32, experts_backend="torch", progress=False, **kw)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    config = tiny()
    model = quantized_model(config)
    path = tmp_path_factory.mktemp("gguf") / "tiny-mix.gguf"
    write_gguf(path, config, model_tensors(model))
    return config, model, path


def test_loads_the_model_written(written):
    config, model, path = written
    loaded, back = load(path)
    assert back == config
    assert isinstance(loaded.embed, QuantEmbedding) and isinstance(loaded.layers[0].attn.qkv, QuantLinear)
    assert isinstance(loaded.layers[1].mlp.experts, QuantExperts)
    with open_gguf(path) as f:
        assert f.tensors["blk.1.ffn_down_exps.weight"].type_name == "Q8_0"
        assert f.tensors["blk.0.attn_output.weight"].type_name == "F32"
    pairs = list(zip(model.slot_tensors(), loaded.slot_tensors(), strict=True))
    for (slot, value), (slot2, value2) in pairs:
        assert slot == slot2
        assert value2.device.type == "cpu" and torch.equal(value, value2), slot.name  # raw bytes bit-exact
    assert {s.format for (s, _), _ in pairs} == {None, "q8_0", "q4_0"}
    # Same bytes, same code, same device: the logits are identical (tolerance 0).
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    want = logits(model, config, ids)
    assert want.abs().max() > 0.05  # the weights reach the logits
    assert torch.equal(logits(loaded, config, ids), want)


def test_weight_bytes_from_the_table(written):
    _, _, path = written
    loaded, _ = load(path)
    held = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert gguf_weight_bytes(path, torch.float32) == held


def test_float_file_loads_in_dtype(tmp_path):
    """F16 matrices become float parameters in the model's dtype (bf16 here), equal to the file's values."""
    config = tiny(num_hidden_layers=2)
    model = Glm4MoeForCausalLM(config, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(2)
    for slot in list(model.tensor_slots()):
        model.load_tensor(slot.name, torch.randn(slot.shape, generator=gen) * 0.05, shard=slot.shard)
    path = tmp_path / "f16.gguf"
    write_gguf(path, config, model_tensors(model, lambda name, shape: "f16" if len(shape) > 1 else None))
    loaded, _ = load_gguf_model(path, device="cpu", dtype=torch.bfloat16, progress=False)
    for (slot, value), (slot2, value2) in zip(model.slot_tensors(), loaded.slot_tensors(), strict=True):
        assert slot2.format is None
        if "router" in slot.name:  # the router is float32 in every model (its matrix is f16 in this file)
            assert value2.dtype == torch.float32
            assert torch.equal(value2, value.half().float() if len(slot.shape) > 1 else value)
        elif len(slot.shape) > 1:
            assert value2.dtype == torch.bfloat16 and torch.equal(value2, value.half().to(torch.bfloat16))
        else:
            assert torch.equal(value2, value.to(torch.bfloat16))


def test_split_file_loads(written, tmp_path):
    """A set written in parts (gguf-split's names) loads from its first part like the single file."""
    config, model, _ = written
    paths = write_gguf(tmp_path / "tiny.gguf", config, model_tensors(model), split_max_bytes=60_000)
    assert len(paths) > 2 and paths[0].name == f"tiny-00001-of-{len(paths):05d}.gguf"
    with open_gguf(paths[0]) as f:
        assert len(f.paths) == len(paths)
    loaded, back = load(paths[0])
    assert back == config
    for (slot, value), (_, value2) in zip(model.slot_tensors(), loaded.slot_tensors(), strict=True):
        assert torch.equal(value, value2), slot.name


def nextn_tensors(config, seed: int = 5):
    """One MTP block after the config's layers, in the same formats: a MoE layer and the nextn.* tensors."""
    n = config.num_hidden_layers
    bigger = quantized_model(dataclasses.replace(config, num_hidden_layers=n + 1), seed)
    gen = torch.Generator().manual_seed(seed)
    h, v = config.hidden_size, config.vocab_size
    out = [t for t in model_tensors(bigger) if t[0].startswith(f"blk.{n}.")]
    for suffix, shape in (("eh_proj", (h, 2 * h)), ("enorm", (h,)), ("hnorm", (h,)), ("embed_tokens", (v, h))):
        out.append((f"blk.{n}.nextn.{suffix}.weight", "q8_0" if len(shape) > 1 else "f32", shape,
                    torch.randn(shape, generator=gen)))
    return out


def test_nextn_block_is_skipped_but_listed(written, tmp_path):
    config, model, _ = written
    path = tmp_path / "mtp.gguf"
    write_gguf(path, config, [*model_tensors(model), *nextn_tensors(config)])
    loaded, back = load(path)
    assert back.num_hidden_layers == 4 and back.num_nextn_predict_layers == 1 and len(loaded.layers) == 4
    with open_gguf(path) as f:
        assert f.tensors["blk.4.nextn.eh_proj.weight"].type_name == "Q8_0"
        assert f.tensor_bytes("blk.4.ffn_up_exps.weight").size > 0  # still loadable
    ids = torch.randint(0, config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(loaded, config, ids), logits(model, config, ids))


def _write_unchecked(monkeypatch, path, config, entries):
    """A file the writer itself would refuse (its name/shape check switched off), to test the loader's."""
    monkeypatch.setattr(gguf_writer, "_check_tensors", lambda config, planned: 0)
    write_gguf(path, config, entries)


def test_bad_files(written, tmp_path, monkeypatch):
    config, model, _ = written
    entries = list(model_tensors(model))
    names = [e[0] for e in entries]
    i = names.index("blk.1.attn_output.weight")
    cases = {
        "missing": (entries[:i] + entries[i + 1:], "1 tensor.s. missing, e.g. blk.1.attn_output.weight"),
        "shape": ([*entries[:i], ("blk.1.attn_output.weight", "f32", (64, 736), torch.randn(64, 736)),
                   *entries[i + 1:]], r"tensor blk.1.attn_output.weight has shape \[64, 736\]"),
        "extra": ([*entries, ("blk.0.bogus.weight", "f32", (4,), torch.randn(4))],
                  "tensor blk.0.bogus.weight is not a glm4moe tensor"),
        "misplaced": ([*entries, ("blk.0.ffn_up_exps.weight", "q4_0", (8, 32, 64), torch.randn(8, 32, 64))],
                      "tensor blk.0.ffn_up_exps.weight does not fit this config"),
    }
    for what, (bad, match) in cases.items():
        path = tmp_path / f"{what}.gguf"
        _write_unchecked(monkeypatch, path, config, bad)
        with pytest.raises(ValueError, match=match):
            load(path)

