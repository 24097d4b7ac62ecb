"""ModelConfig from GGUF metadata: files written with gguf.GGUFWriter making the calls llama.cpp's converter
(convert_hf_to_gguf.py, TextModel.set_gguf_parameters + Glm4MoeModel.set_gguf_parameters + _set_vocab_glm)
makes for a GLM4-MoE checkpoint, read back with open_gguf, must give the preset's config field for field;
every missing, mistyped or out-of-range key must fail with a ValueError naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from glmtg.config import ModelConfig
from glmtg.loading.gguf import open_gguf
from glmtg.loading.gguf_config import gguf_config

ARCH = "glm4moe"
PRESETS = ("tiny", "glm-4.5", "glm-4.6", "glm-4.7", "glm-4.5-air")


def write_like_converter(path: Path, cfg: ModelConfig, *, embed_rows: int | None = None,
                         skip: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> Path:
    """A GGUF holding what the converter writes for ``cfg``, plus a few tiny tensors named as llama.cpp names
    them. Shapes are real only where ``embed_rows`` is None and the preset is small enough (tiny)."""
    w = gguf.GGUFWriter(str(path), ARCH)
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    # TextModel.set_gguf_parameters
    w.add_block_count(blocks)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # Glm4MoeModel.set_gguf_parameters
    w.add_rope_dimension_count(int(cfg.head_dim * cfg.partial_rotary_factor))
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    if cfg.num_nextn_predict_layers:
        w.add_nextn_predict_layers(cfg.num_nextn_predict_layers)
    # _set_vocab_glm: the token list is padded to config.json's vocab_size; eos comes from
    # tokenizer_config (<|endoftext|>), eot is <|user|>, eom <|observation|>.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    for name, tid in zip(("eos", "eot", "eom"), cfg.eos_token_ids):
        getattr(w, f"add_{name}_token_id")(tid)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    if skip:  # drop keys after the fact: the writer has no "remove"
        for shard in w.kv_data:
            for key in skip:
                shard.pop(key, None)

    rows = cfg.vocab_size if embed_rows is None else embed_rows
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (rows, cfg.hidden_size), "output_norm.weight": (cfg.hidden_size,),
               "blk.0.attn_q.bias": (8,), "blk.0.attn_k.bias": (8,), "blk.0.attn_v.bias": (8,)}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = (rows, cfg.hidden_size)
    if cfg.use_qk_norm:
        tensors["blk.0.attn_q_norm.weight"] = (cfg.head_dim,)
        tensors["blk.0.attn_k_norm.weight"] = (cfg.head_dim,)
    if cfg.num_nextn_predict_layers:  # the MTP block keeps its tensors (here one) at index num_hidden_layers
        tensors[f"blk.{cfg.num_hidden_layers}.nextn.eh_proj.weight"] = (4, 8)
    for name, shape in tensors.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf_config")
    out = {}
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        out[name] = write_like_converter(root / f"{name}.gguf", cfg, embed_rows=None if name == "tiny" else 4)
    return out


def _metadata(path: Path) -> tuple[dict[str, Any], list[str]]:
    with open_gguf(path) as f:
        return dict(f.metadata), list(f.tensors)


# ---------------------------------------------------------------- presets round trip
@pytest.mark.parametrize("name", PRESETS)
def test_preset_from_converter_metadata(files: dict[str, Path], name: str) -> None:
    metadata, tensors = _metadata(files[name])
    cfg = ModelConfig.from_gguf(metadata, tensors)
    # Every field a GGUF carries comes back; the floats through float32 and back to config.json's decimal.
    assert cfg == ModelConfig.preset(name)
    assert metadata[f"{ARCH}.block_count"] == cfg.num_hidden_layers + cfg.num_nextn_predict_layers


def test_glm45_and_air_differ_in_what_the_tensor_table_says(files: dict[str, Path]) -> None:
    # Nothing in the metadata says "qk-norm": only the tensor table does (GLM-4.5 has it, Air not).
    big, air = (ModelConfig.from_gguf(*_metadata(files[n])) for n in ("glm-4.5", "glm-4.5-air"))
    assert big.use_qk_norm and not air.use_qk_norm
    assert big.num_hidden_layers == 92 and air.num_hidden_layers == 46  # block_count 93 / 47 less one MTP


def test_path_convenience_checks_shapes(files: dict[str, Path], tmp_path: Path) -> None:
    assert gguf_config(files["tiny"]) == ModelConfig.preset("tiny")
    with open_gguf(files["tiny"]) as f:
        assert gguf_config(f) == ModelConfig.preset("tiny")
    # The token list (1000) disagreeing with the embedding (999 rows) is caught here.
    bad = write_like_converter(tmp_path / "rows.gguf", ModelConfig.preset("tiny"), embed_rows=999)
    with pytest.raises(ValueError, match="token_embd.weight.*shape"):
        gguf_config(bad)


def test_tensor_table_decides_tie_bias_and_qk_norm(files: dict[str, Path]) -> None:
    metadata, tensors = _metadata(files["tiny"])
    plain = [t for t in tensors if t not in ("output.weight", "blk.0.attn_q.bias", "blk.0.attn_q_norm.weight")]
    cfg = ModelConfig.from_gguf(metadata, plain)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.use_qk_norm


def test_optional_keys_take_llama_cpp_defaults(files: dict[str, Path]) -> None:
    metadata, tensors = _metadata(files["glm-4.5"])
    for k in ("expert_gating_func", "expert_weights_norm", "leading_dense_block_count", "nextn_predict_layers",
              "expert_group_count", "expert_group_used_count", "attention.value_length"):
        del metadata[f"{ARCH}.{k}"]
    for k in ("eot", "eom"):
        del metadata[f"tokenizer.ggml.{k}_token_id"]
    cfg = ModelConfig.from_gguf(metadata, tensors)
    assert cfg.first_k_dense_replace == 0 and cfg.norm_topk_prob is False and cfg.n_group == 1
    assert cfg.num_nextn_predict_layers == 0 and cfg.num_hidden_layers == 93  # a --no-mtp conversion
    assert cfg.eos_token_ids == (151329,)


def test_float32_decimal_recovery() -> None:
    # The eps the file holds is float32(1e-5) = 9.99999974738e-06; the config says 1e-05 again.
    from glmtg.config import _gguf_float
    assert _gguf_float({"k": float(np.float32(1e-5))}, "k") == 1e-5
    assert _gguf_float({"k": float(np.float32(2.5))}, "k") == 2.5
    assert _gguf_float({"k": np.float32(0.1)}, "k") == 0.1
    assert _gguf_float({"k": 1e-5}, "k") == 1e-5  # a float64 value is kept as it is
    assert _gguf_float({"k": 0.1 + 2**-50}, "k") == 0.1 + 2**-50


# ---------------------------------------------------------------- bad metadata
REQUIRED = ["general.architecture", "tokenizer.ggml.tokens"] + [f"{ARCH}.{k}" for k in (
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "rope.dimension_count", "rope.freq_base",
    "attention.layer_norm_rms_epsilon", "expert_count", "expert_used_count", "expert_shared_count",
    "expert_feed_forward_length", "expert_weights_scale")]


@pytest.fixture(scope="module")
def tiny_meta(files: dict[str, Path]) -> tuple[dict[str, Any], list[str]]:
    return _metadata(files["tiny"])


def _fails(tiny_meta: tuple[dict[str, Any], list[str]], match: str, changes: dict[str, Any]) -> None:
    metadata, tensors = tiny_meta
    with pytest.raises(ValueError, match=match) as e:
        ModelConfig.from_gguf({**metadata, **changes}, tensors)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_key_is_named(tiny_meta: Any, key: str) -> None:
    metadata, tensors = tiny_meta
    metadata = {k: v for k, v in metadata.items() if k != key}
    with pytest.raises(ValueError, match=f"'{key}' is missing"):
        ModelConfig.from_gguf(metadata, tensors)


@pytest.mark.parametrize("key", [k for k in REQUIRED if k.startswith(ARCH)])
@pytest.mark.parametrize("bad", ["4", True, None, [4], np.arange(93, dtype=np.uint32)])
def test_wrong_type_is_named(tiny_meta: Any, key: str, bad: Any) -> None:
    metadata, tensors = tiny_meta
    with pytest.raises(ValueError, match=f"'{key}' must be") as e:
        ModelConfig.from_gguf({**metadata, key: bad}, tensors)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200  # a per-layer array stays one short line


def test_float_for_a_count_is_refused(tiny_meta: Any) -> None:
    _fails(tiny_meta, f"'{ARCH}.block_count' must be an integer", {f"{ARCH}.block_count": 5.0})
    _fails(tiny_meta, f"'{ARCH}.expert_count' must be in", {f"{ARCH}.expert_count": 0})
    _fails(tiny_meta, f"'{ARCH}.expert_count' must be in", {f"{ARCH}.expert_count": -8})


def test_wrong_architecture_file(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'general.architecture' must be 'glm4moe', got 'llama' \\(str\\)"):
        gguf_config(tmp_path / "llama.gguf")


@pytest.mark.parametrize("func", [1, 3])
def test_gating_other_than_sigmoid(tiny_meta: Any, func: int) -> None:
    _fails(tiny_meta, f"'{ARCH}.expert_gating_func' must be 2 \\(sigmoid\\), got {func}",
           {f"{ARCH}.expert_gating_func": func})


@pytest.mark.parametrize("nextn", [4, 5, 1000])
def test_nextn_not_below_block_count(tiny_meta: Any, nextn: int) -> None:
    _fails(tiny_meta, f"'{ARCH}.nextn_predict_layers' \\({nextn}\\) leaves no layer",
           {f"{ARCH}.nextn_predict_layers": nextn})


def test_nextn_counts_inside_block_count(tiny_meta: Any) -> None:
    metadata, tensors = tiny_meta
    cfg = ModelConfig.from_gguf({**metadata, f"{ARCH}.nextn_predict_layers": 3}, tensors)
    assert cfg.num_hidden_layers == 1 and cfg.num_nextn_predict_layers == 3


@pytest.mark.parametrize("changes, match", [
    ({f"{ARCH}.attention.value_length": 32}, "value_length' \\(32\\) must equal"),
    ({f"{ARCH}.rope.dimension_count": 33}, "rope.dimension_count' must be even"),
    ({f"{ARCH}.rope.dimension_count": 66}, "rope.dimension_count' must be even and at most the head dim 64"),
    ({f"{ARCH}.rope.scaling.type": "yarn"}, "rope.scaling.type' is 'yarn' \\(str\\); only unscaled"),
    ({f"{ARCH}.expert_weights_norm": 1}, "expert_weights_norm' must be a bool"),
    ({f"{ARCH}.vocab_size": 999}, "vocab_size' \\(999\\) differs"),
    ({"tokenizer.ggml.eos_token_id": 1000}, "eos_token_id' \\(1000\\) is outside"),
    ({"tokenizer.ggml.eot_token_id": "2"}, "eot_token_id' must be an integer"),
    ({"tokenizer.ggml.tokens": np.arange(1000)}, "tokens' must be an array of strings"),
    ({"tokenizer.ggml.tokens": "abc"}, "tokens' must be an array of strings"),
    ({f"{ARCH}.expert_weights_scale": float("nan")}, "expert_weights_scale' must be finite"),
    ({f"{ARCH}.rope.freq_base": "1e6"}, "freq_base' must be a number"),
    # relations between keys are ModelConfig's own checks, naming the field
    ({f"{ARCH}.expert_used_count": 9}, "num_experts_per_tok \\(9\\) exceeds n_routed_experts"),
    ({f"{ARCH}.attention.head_count_kv": 5}, "must be a multiple of num_key_value_heads"),
    ({f"{ARCH}.expert_weights_scale": 0.0}, "routed_scaling_factor must be > 0"),
])
def test_bad_values(tiny_meta: Any, changes: dict[str, Any], match: str) -> None:
    _fails(tiny_meta, match, changes)


def test_rope_dims_over_head_dim_round_trips(tiny_meta: Any) -> None:
    # partial_rotary_factor from dims / head_dim must give rotary_dim == dims back for every even dims;
    # plain division does not (30 / 44 * 44 truncates to 29).
    from glmtg.config import _rotary_factor
    assert int(44 * (30 / 44)) == 29
    for head_dim in range(2, 513, 2):
        for dims in range(2, head_dim + 1, 2):
            factor = _rotary_factor(dims, head_dim)
            assert int(head_dim * factor) == dims and 0 < factor <= 1
    metadata, tensors = tiny_meta
    cfg = ModelConfig.from_gguf({**metadata, f"{ARCH}.attention.key_length": 44, f"{ARCH}.attention.value_length": 44,
                                 f"{ARCH}.rope.dimension_count": 30}, tensors)
    assert cfg.head_dim == 44 and cfg.rotary_dim == 30
