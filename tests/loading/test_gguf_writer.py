"""write_gguf: files our reader and the gguf package read back with llama.cpp's names, dims, types and keys."""

from __future__ import annotations

import dataclasses
import os

import gguf
import numpy as np
import pytest
import torch

from glmtg.config import ModelConfig
from glmtg.formats import dequantize_blocks
from glmtg.loading.gguf import open_gguf
from glmtg.loading.gguf_config import gguf_config
from glmtg.loading.gguf_writer import model_tensors, random_mtp_tensors, write_gguf
from glmtg.loading.presets import random_model
from glmtg.loading.synthetic_vocab import (
    GLM_SPECIALS,
    byte_level_alphabet,
    synthetic_vocab,
)
from glmtg.loading.tokenizer import Tokenizer
from tests.references.model import tiny

# A mix like a real file: router, norms and biases f32, the embedding q4_0, the rest q8_0, down projections
# f16 and the shared expert bf16 (so all three float types and two block types are written).


def mix(name: str, shape: tuple[int, ...]) -> str | None:
    if len(shape) == 1 or "gate_inp" in name:
        return "f32"
    if name == "token_embd.weight":
        return "q4_0"
    if "ffn_down" in name and "shexp" not in name:
        return "f16"
    if "shexp" in name:
        return "bf16"
    return "q8_0"


def tiny_model(config: ModelConfig, seed: int = 0):
    return random_model(config, seed=seed, dtype=torch.float32)


def nextn_tensors(config: ModelConfig, seed: int = 1):
    """The tensors of one MTP block after ``config``'s layers: a whole MoE layer plus the nextn.* ones."""
    n = config.num_hidden_layers
    bigger = random_model(dataclasses.replace(config, num_hidden_layers=n + 1), seed=seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    h, v = config.hidden_size, config.vocab_size
    out = [t for t in model_tensors(bigger, mix) if t[0].startswith(f"blk.{n}.")]
    for suffix, shape in (("eh_proj", (h, 2 * h)), ("enorm", (h,)), ("hnorm", (h,)), ("shared_head_norm", (h,)),
                          ("shared_head_head", (v, h))):
        out.append((f"blk.{n}.nextn.{suffix}.weight", "f32", shape, torch.randn(shape, generator=gen)))
    return out


def test_round_trip_names_types_shapes_bytes(tmp_path):
    config = tiny()
    model = tiny_model(config)
    entries = list(model_tensors(model, mix))
    path = tmp_path / "m.gguf"
    write_gguf(path, config, entries, file_type="Q8_0")

    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    assert [t.name for t in reader.tensors] == [e[0] for e in entries]
    with open_gguf(path) as f:
        assert list(f.tensors) == [e[0] for e in entries]
        for name, fmt, shape, value in entries:
            info = f.tensors[name]
            assert info.type_name == fmt.upper()
            assert info.shape == tuple(shape) and info.ne == tuple(shape)[::-1]
            assert by_name[name].tensor_type.name == fmt.upper()
            assert tuple(int(d) for d in by_name[name].shape) == tuple(shape)[::-1]  # gguf's shape is ne
            raw = f.tensor_bytes(name)
            # the bytes are exactly the gguf package's encoding of the values: bit-exact
            if fmt in ("q8_0", "q4_0"):
                want = gguf.quants.quantize(value.numpy(), gguf.GGMLQuantizationType[fmt.upper()])
            elif fmt == "bf16":
                want = value.to(torch.bfloat16).view(torch.uint8).numpy()
            else:
                want = value.numpy().astype(np.float32 if fmt == "f32" else np.float16)
            assert np.array_equal(raw, np.ascontiguousarray(want).view(np.uint8).reshape(-1))
        back = gguf_config(f)
        md = f.metadata
    assert back == config
    assert md["general.architecture"] == "glm4moe"
    assert md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert md["general.quantization_version"] == 2
    expect = {
        "block_count": 4, "context_length": 4096, "embedding_length": 64, "feed_forward_length": 128,
        "attention.head_count": 12, "attention.head_count_kv": 2, "attention.key_length": 64,
        "attention.value_length": 64, "rope.dimension_count": 32, "expert_count": 8, "expert_used_count": 2,
        "expert_shared_count": 1, "expert_feed_forward_length": 32, "leading_dense_block_count": 1,
        "expert_gating_func": 2, "expert_weights_norm": True, "expert_group_count": 1, "expert_group_used_count": 1,
    }
    for key, value in expect.items():
        assert md[f"glm4moe.{key}"] == value, key
    # float32 keys hold the config's values rounded to float32
    for key, value in (("rope.freq_base", 10000.0), ("expert_weights_scale", 2.5),
                       ("attention.layer_norm_rms_epsilon", 1e-5)):
        assert md[f"glm4moe.{key}"] == pytest.approx(value, rel=1e-7)
    assert "glm4moe.nextn_predict_layers" not in md
    # value types llama.cpp insists on: token types INT32, merges strings
    field = reader.fields["tokenizer.ggml.token_type"]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert reader.fields["tokenizer.ggml.merges"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # the temporary folder is gone


def test_synthetic_tokenizer_llama_cpp_needs(tmp_path):
    """What llama-vocab.cpp checks: unique tokens, every byte-level character a token (its BPE falls back to
    them), merges of known tokens, and the special ids; the file's tokenizer round-trips text."""
    config = tiny()
    path = tmp_path / "m.gguf"
    write_gguf(path, config, model_tensors(tiny_model(config), mix))
    with open_gguf(path) as f:
        md = f.metadata
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == len(set(tokens)) == config.vocab_size
    assert set(byte_level_alphabet()) <= set(tokens)
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "glm4"
    assert len(md["tokenizer.ggml.merges"]) == config.vocab_size - 256 - len(GLM_SPECIALS)
    assert tokens[md["tokenizer.ggml.eos_token_id"]] == "<|endoftext|>" and md["tokenizer.ggml.eos_token_id"] == 2
    assert tokens[md["tokenizer.ggml.bos_token_id"]] == "[gMASK]"
    tok = Tokenizer.from_gguf(md)
    text = "Hello, wörld!\n\t 123456 ünïcödé 日本 <|user|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_to_id("<|user|>") in ids  # control tokens are matched whole
    assert tok.eos_token_ids == config.eos_token_ids
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_synthetic_vocab_glm_layout():
    """At GLM's real vocabulary size the control tokens land on GLM-4.5's ids (eos, eot, eom as the converter
    writes them)."""
    config = ModelConfig.preset("glm-4.5-air")
    vocab = synthetic_vocab(config)
    assert len(vocab.tokens) == 151552 == len(set(vocab.tokens))
    assert vocab.tokens[151329] == "<|endoftext|>" and vocab.tokens[151331] == "[gMASK]"
    assert vocab.tokens[151336] == "<|user|>" and vocab.tokens[151338] == "<|observation|>"
    assert vocab.special_ids == {"bos": 151331, "eos": 151329, "eot": 151336, "eom": 151338, "unknown": 151329}
    assert synthetic_vocab(config).tokens == vocab.tokens  # deterministic


def test_real_tokenizer_round_trip(tmp_path):
    """A tokenizer read from one file writes the same tokenizer metadata into the next."""
    config = tiny()
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    entries = list(model_tensors(tiny_model(config), mix))
    write_gguf(first, config, entries)
    with open_gguf(first) as f:
        md1 = f.metadata
    write_gguf(second, config, entries, tokenizer=Tokenizer.from_gguf(md1))
    with open_gguf(second) as f:
        md2 = f.metadata
    for key in ("tokens", "merges", "pre", "model", "eos_token_id", "bos_token_id", "unknown_token_id"):
        assert md2[f"tokenizer.ggml.{key}"] == md1[f"tokenizer.ggml.{key}"], key
    assert np.array_equal(md2["tokenizer.ggml.token_type"], md1["tokenizer.ggml.token_type"])
    assert md2["tokenizer.chat_template"] == md1["tokenizer.chat_template"]


def test_nextn_block(tmp_path):
    config = tiny()
    path = tmp_path / "m.gguf"
    write_gguf(path, config, [*model_tensors(tiny_model(config), mix), *nextn_tensors(config)])
    with open_gguf(path) as f:
        assert f.metadata["glm4moe.block_count"] == 5 and f.metadata["glm4moe.nextn_predict_layers"] == 1
        assert gguf_config(f).num_hidden_layers == 4
        assert f.tensors["blk.4.nextn.eh_proj.weight"].ne == (128, 64)  # llama.cpp's {2 * n_embd, n_embd}
        assert "blk.4.ffn_gate_exps.weight" in f.tensors


def test_random_mtp_block(tmp_path):
    """A random preset's MTP block, drawn as it is written: a whole MoE layer plus eh_proj/enorm/hnorm/
    shared_head_norm, in the formats asked for; the file holds block_count = layers + 1."""
    config = tiny(num_nextn_predict_layers=1)
    made = []
    mtp = random_mtp_tensors(config, mix, seed=7)
    for i, (name, fmt, shape, make) in enumerate(mtp):
        mtp[i] = (name, fmt, shape, lambda make=make, name=name: made.append(name) or make())
    assert not made  # nothing drawn before the writer needs it
    path = tmp_path / "m.gguf"
    write_gguf(path, config, [*model_tensors(tiny_model(config), mix), *mtp])
    assert made == [e[0] for e in mtp]
    with open_gguf(path) as f:
        md = f.metadata
        assert md["glm4moe.block_count"] == 5 and md["glm4moe.nextn_predict_layers"] == 1
        assert gguf_config(f) == config
        mtp_names = {n for n in f.tensors if n.startswith("blk.4.")}
        assert {"blk.4.nextn.eh_proj.weight", "blk.4.nextn.shared_head_norm.weight", "blk.4.ffn_down_exps.weight",
                "blk.4.exp_probs_b.bias"} <= mtp_names and len(mtp_names) == len(mtp)
        assert f.tensors["blk.4.ffn_up_exps.weight"].type_name == "Q8_0"
        norm = np.frombuffer(f.tensor_bytes("blk.4.nextn.enorm.weight").tobytes(), np.float32)
        assert np.array_equal(norm, np.ones(64, np.float32))
        assert f.tensors["blk.4.nextn.eh_proj.weight"].type_name == "Q8_0"
        raw = torch.from_numpy(f.tensor_bytes("blk.4.nextn.eh_proj.weight").copy()).view(64, -1)
        eh = dequantize_blocks(raw, "q8_0")
        assert eh.shape == (64, 128) and 0.015 < float(eh.std()) < 0.025  # std 0.02 draws (8192 of them)


def _fails(tmp_path, config, entries, match, **kw):
    path = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=match):
        write_gguf(path, config, entries, **kw)
    assert not os.listdir(tmp_path)  # nothing written, no temporary left


def test_bad_input(tmp_path):
    config = tiny()
    entries = list(model_tensors(tiny_model(config), mix))
    names = [e[0] for e in entries]
    i = names.index("blk.1.attn_output.weight")
    _fails(tmp_path, config, entries[:i] + entries[i + 1:], "missing, e.g. blk.1.attn_output.weight")
    name, fmt, shape, value = entries[i]
    wrong = (shape[0], shape[1] + 32)
    _fails(tmp_path, config, [*entries[:i], (name, fmt, wrong, torch.randn(wrong)), *entries[i + 1:]],
           r"blk.1.attn_output.weight has shape \(64, 800\), expected \(64, 768\)")
    _fails(tmp_path, config, [*entries, ("blk.0.bogus.weight", "f32", (4,), torch.randn(4))], "not a glm4moe tensor")
    _fails(tmp_path, config, [*entries, entries[0]], "given twice")
    _fails(tmp_path, config, [*entries[:i], (name, "q9_9", shape, value), *entries[i + 1:]], "format must be")
    _fails(tmp_path, config, [*entries[:i], (name, "q8_0", shape, torch.zeros(64, 10, dtype=torch.uint8)),
                              *entries[i + 1:]], r"raw Q8_0 data has shape \(64, 10\), expected \(64, 816\)")
    odd = dataclasses.replace(config, hidden_size=48)  # rows of 48 values are not whole 32-value q4_0 blocks
    _fails(tmp_path, odd, [("token_embd.weight", "q4_0", (1000, 48), torch.randn(1000, 48))], "block size 32")
    _fails(tmp_path, config, entries, "file_type", file_type="Q7_X")
    _fails(tmp_path, dataclasses.replace(config, num_hidden_layers=3, first_k_dense_replace=1), entries,
           "MTP block 3 lacks tensor blk.3.nextn.eh_proj.weight")
