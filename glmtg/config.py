"""ModelConfig: the shape of a GLM4-MoE model (HF model_type ``glm4_moe``), checked once on creation."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

MODEL_TYPE = "glm4_moe"
# Sizes above this are no real model and would overflow index arithmetic (int32 in the kernels).
MAX_SIZE = 2**31 - 1
_REQUIRED = object()  # sentinel: a GGUF key without a default
GGUF_ARCH = "glm4moe"  # llama.cpp's name for the architecture (general.architecture)
GGUF_GATING_SIGMOID = 2  # gguf.ExpertGatingFuncType.SIGMOID; 0 (none) means sigmoid to llama.cpp too
_BOOL_FIELDS = ("norm_topk_prob", "use_qk_norm", "attention_bias", "tie_word_embeddings")
_FLOAT_FIELDS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "partial_rotary_factor")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _brief(value: Any) -> str:
    """A one-line, bounded description of a bad metadata value (a per-layer array can hold 93 numbers)."""
    text = " ".join(repr(value).split())
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _gguf_value(metadata: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    if key in metadata:
        return metadata[key]
    if default is _REQUIRED:
        raise ValueError(f"GGUF key {key!r} is missing")
    return default


def _gguf_uint(metadata: Mapping[str, Any], key: str, default: Any = _REQUIRED, minimum: int = 0) -> int:
    """An integer key (GGUF writes counts as uint32); numpy integers are accepted, bools and floats not."""
    value = _gguf_value(metadata, key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"GGUF key {key!r} must be an integer, got {_brief(value)}")
    if not minimum <= int(value) <= MAX_SIZE:
        raise ValueError(f"GGUF key {key!r} must be in [{minimum}, {MAX_SIZE}], got {int(value)}")
    return int(value)


def _gguf_float(metadata: Mapping[str, Any], key: str) -> float:
    """A float key, given back as the shortest decimal that rounds to the same float32.

    The converter writes config.json's decimals (1e-05, 2.5) as float32; reading 9.99999974738e-06 back
    would make the config differ from the HF one for no reason, so the decimal is recovered. A value that
    is no float32 (a float64 key) is returned as it is.
    """
    value = _gguf_value(metadata, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"GGUF key {key!r} must be a number, got {_brief(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"GGUF key {key!r} must be finite, got {value}")
    try:
        as_f32 = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return value
    if as_f32 != value:
        return value
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        decimal = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", decimal))[0] == value:
            return decimal
    return value


def _rotary_factor(dims: int, head_dim: int) -> float:
    """The partial_rotary_factor whose ``int(head_dim * factor)`` (transformers' rotary dim) is ``dims``.

    dims / head_dim alone can land one ulp low (30 / 44 * 44 = 29.999...), so it is nudged up until the
    truncation gives ``dims`` back.
    """
    factor = dims / head_dim
    for _ in range(4):
        if int(head_dim * factor) >= dims:
            break
        factor = math.nextafter(factor, math.inf)
    return factor


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested JSON object of config.json (null or absent: empty)."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object or null, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Fields mirror the HF glm4_moe config.json keys of the same name."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense SwiGLU MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # each routed expert (and each shared expert)
    num_hidden_layers: int  # excludes the MTP/nextn layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    partial_rotary_factor: float = 0.5
    use_qk_norm: bool = False
    attention_bias: bool = True
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    n_group: int = 1
    topk_group: int = 1
    eos_token_ids: tuple[int, ...] = ()

    PRESETS: ClassVar[tuple[str, ...]] = ("glm-4.5", "glm-4.6", "glm-4.7", "glm-4.5-air", "tiny")

    def __post_init__(self) -> None:
        # Types first (a config.json can hold any JSON value), then ranges and relations.
        # bool is an int subclass in Python: True is no layer count, so it is refused explicitly.
        if isinstance(self.eos_token_ids, (str, bytes)) or not isinstance(self.eos_token_ids, (list, tuple)):
            raise ValueError(f"eos_token_ids must be a list of ints, got {self.eos_token_ids!r}")
        if not all(_is_int(t) for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be ints, got {list(self.eos_token_ids)!r}")
        # Normalise list -> tuple so the dataclass stays hashable whatever the caller passed.
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "n_routed_experts",
                    "num_experts_per_tok", "max_position_embeddings", "n_group", "topk_group")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_SIZE:
                raise ValueError(f"{name} must be an int in [1, {MAX_SIZE}], got {value!r}")
        for name in ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= MAX_SIZE:
                raise ValueError(f"{name} must be an int in [0, {MAX_SIZE}], got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives an odd or empty rotary "
                             f"dim {self.rotary_dim} for head_dim {self.head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                             f"({self.n_routed_experts})")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers "
                             f"({self.num_hidden_layers})")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group "
                             f"({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            # group scores are the sum of each group's top-2 experts
            raise ValueError(f"n_group ({self.n_group}) leaves fewer than 2 experts per group")
        if self.n_group > 1 and self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            raise ValueError(f"topk_group ({self.topk_group}) groups hold fewer experts than num_experts_per_tok "
                             f"({self.num_experts_per_tok})")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        bad_eos = [t for t in self.eos_token_ids if not 0 <= t < self.vocab_size]
        if bad_eos:
            raise ValueError(f"eos_token_ids {bad_eos} are outside the vocabulary [0, {self.vocab_size})")

    @property
    def gqa_ratio(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dim(self) -> int:
        # int() truncation, as transformers computes it
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_hf_json(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> ModelConfig:
        """Read an HF config.json (a path to the file or its directory, or the parsed dict).

        Accepts both published shapes: rope_theta / partial_rotary_factor at the top level (GLM repos) or
        inside ``rope_parameters`` (transformers 5), and ``eos_token_id`` as an int, a list or null.
        """
        if isinstance(path_or_dict, dict):
            raw = path_or_dict
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    raw = json.load(f)
            except FileNotFoundError:
                raise ValueError(f"config file not found: {path}") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"config file {path} is not valid JSON: {e}") from None
            if not isinstance(raw, dict):
                raise ValueError(f"config file {path} does not hold a JSON object")
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {model_type!r}")

        rope = _object(raw, "rope_parameters")
        scaling = _object(raw, "rope_scaling")
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type not in (None, "default"):
            raise ValueError(f"rope_type {rope_type!r} is not supported (only default RoPE)")

        def pick(key: str, default: Any = None) -> Any:
            for source in (raw, rope):
                if source.get(key) is not None:
                    return source[key]
            return default

        eos = raw.get("eos_token_id")
        if eos is None:
            eos_ids: Any = ()
        elif _is_int(eos):
            eos_ids = (eos,)
        elif isinstance(eos, list):
            eos_ids = eos
        else:
            raise ValueError(f"eos_token_id must be an int, a list of ints or null, got {eos!r}")
        heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
        head_dim = raw.get("head_dim")
        if head_dim is None and _is_int(heads) and _is_int(hidden) and heads > 0:
            head_dim = hidden // heads  # HF's default when config.json leaves it out
        nextn = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0))
        kwargs: dict[str, Any] = {
            "head_dim": head_dim,
            "rope_theta": pick("rope_theta", 1e6),
            "partial_rotary_factor": pick("partial_rotary_factor", 0.5),
            "num_nextn_predict_layers": 0 if nextn is None else nextn,
            "eos_token_ids": eos_ids,
        }
        for f in dataclasses.fields(cls):
            if f.name in kwargs or raw.get(f.name) is None:
                continue  # null means "not set": the default applies, as in transformers
            kwargs[f.name] = raw[f.name]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and kwargs.get(f.name) is None]
        if required:
            raise ValueError(f"config is missing required field(s): {', '.join(required)}")
        return cls(**kwargs)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], tensor_names: Collection[str]) -> ModelConfig:
        """The config of a llama.cpp GGUF file: its metadata KVs and the names in its tensor table (any
        collection of names; ``GGUFFile.tensors`` will do). ``glmtg.loading.gguf_config`` takes a path.

        Keys are those llama.cpp's converter (``Glm4MoeModel``) writes. Optional, with the default llama.cpp's
        loader gives them: nextn_predict_layers 0 (a ``--no-mtp`` conversion), leading_dense_block_count 0,
        expert_weights_norm false, expert_gating_func sigmoid, expert_group_count and expert_group_used_count
        1, attention.value_length = key_length, rope.scaling.type none, the eos/eot/eom ids. The rest are
        required; a missing or mistyped key is a ValueError naming it. ``block_count`` counts the next-token-prediction (MTP) blocks too,
        so ``num_hidden_layers = block_count - nextn_predict_layers``. What no key says is read from the
        tensor table the way llama.cpp decides it: q/k norms exist when ``blk.0.attn_q_norm.weight`` does,
        attention biases when ``blk.0.attn_q.bias`` does, and the output head is the token embedding when
        ``output.weight`` is absent. The vocabulary size is the length of ``tokenizer.ggml.tokens`` (the
        converter pads it to config.json's vocab_size, the row count of the embedding). End-of-generation
        ids are eos, eot and eom, in that order, as llama.cpp stops on all three.
        """
        arch_key = "general.architecture"
        arch = _gguf_value(metadata, arch_key)
        if arch != GGUF_ARCH:
            raise ValueError(f"GGUF key {arch_key!r} must be {GGUF_ARCH!r}, got {_brief(arch)}")

        def key(name: str) -> str:
            return f"{GGUF_ARCH}.{name}"

        def uint(name: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
            return _gguf_uint(metadata, key(name), default, minimum)

        blocks = uint("block_count")
        nextn = uint("nextn_predict_layers", 0, minimum=0)
        if nextn >= blocks:
            raise ValueError(f"GGUF key {key('nextn_predict_layers')!r} ({nextn}) leaves no layer of "
                             f"{key('block_count')!r} ({blocks})")
        head_dim = uint("attention.key_length")
        value_length = uint("attention.value_length", head_dim)
        if value_length != head_dim:
            raise ValueError(f"GGUF key {key('attention.value_length')!r} ({value_length}) must equal "
                             f"{key('attention.key_length')!r} ({head_dim})")
        rope_dims = uint("rope.dimension_count")
        if rope_dims > head_dim or rope_dims % 2:
            raise ValueError(f"GGUF key {key('rope.dimension_count')!r} must be even and at most the head dim "
                             f"{head_dim}, got {rope_dims}")
        scaling_key = key("rope.scaling.type")
        scaling = _gguf_value(metadata, scaling_key, "none")
        if scaling != "none":
            raise ValueError(f"GGUF key {scaling_key!r} is {_brief(scaling)}; only unscaled RoPE is supported")
        gating = uint("expert_gating_func", GGUF_GATING_SIGMOID, minimum=0)
        if gating not in (0, GGUF_GATING_SIGMOID):
            raise ValueError(f"GGUF key {key('expert_gating_func')!r} must be {GGUF_GATING_SIGMOID} (sigmoid), "
                             f"got {gating}")
        norm_key = key("expert_weights_norm")
        norm = _gguf_value(metadata, norm_key, False)
        if not isinstance(norm, bool):
            raise ValueError(f"GGUF key {norm_key!r} must be a bool, got {_brief(norm)}")

        tokens_key = "tokenizer.ggml.tokens"
        tokens = _gguf_value(metadata, tokens_key)
        if (isinstance(tokens, (str, bytes)) or not isinstance(tokens, Collection)
                or not all(isinstance(t, str) for t in tokens)):
            raise ValueError(f"GGUF key {tokens_key!r} must be an array of strings, got {type(tokens).__name__}")
        vocab = len(tokens)
        if key("vocab_size") in metadata and uint("vocab_size") != vocab:
            raise ValueError(f"GGUF key {key('vocab_size')!r} ({metadata[key('vocab_size')]}) differs from the "
                             f"length of {tokens_key!r} ({vocab})")
        eos_ids: list[int] = []
        for name in ("eos", "eot", "eom"):
            tid_key = f"tokenizer.ggml.{name}_token_id"
            if tid_key in metadata:
                tid = _gguf_uint(metadata, tid_key)
                if tid >= vocab:
                    raise ValueError(f"GGUF key {tid_key!r} ({tid}) is outside the vocabulary [0, {vocab})")
                if tid not in eos_ids:
                    eos_ids.append(tid)

        config = cls(
            vocab_size=vocab,
            hidden_size=uint("embedding_length"),
            intermediate_size=uint("feed_forward_length"),
            moe_intermediate_size=uint("expert_feed_forward_length"),
            num_hidden_layers=blocks - nextn,
            num_attention_heads=uint("attention.head_count"),
            num_key_value_heads=uint("attention.head_count_kv"),
            head_dim=head_dim,
            n_routed_experts=uint("expert_count"),
            n_shared_experts=uint("expert_shared_count", minimum=0),
            num_experts_per_tok=uint("expert_used_count"),
            first_k_dense_replace=uint("leading_dense_block_count", 0, minimum=0),
            routed_scaling_factor=_gguf_float(metadata, key("expert_weights_scale")),
            norm_topk_prob=norm,
            rms_norm_eps=_gguf_float(metadata, key("attention.layer_norm_rms_epsilon")),
            rope_theta=_gguf_float(metadata, key("rope.freq_base")),
            partial_rotary_factor=_rotary_factor(rope_dims, head_dim),
            use_qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            max_position_embeddings=uint("context_length"),
            tie_word_embeddings="output.weight" not in tensor_names,
            num_nextn_predict_layers=nextn,
            n_group=uint("expert_group_count", 1),
            topk_group=uint("expert_group_used_count", 1),
            eos_token_ids=tuple(eos_ids),
        )
        if config.rotary_dim != rope_dims:  # dims / head_dim * head_dim must come back exactly
            raise ValueError(f"GGUF key {key('rope.dimension_count')!r} ({rope_dims}) is not representable as "
                             f"a fraction of head dim {head_dim}")
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict in the published GLM shape (rope at the top level), readable by transformers."""
        out: dict[str, Any] = {"architectures": ["Glm4MoeForCausalLM"], "model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name != "eos_token_ids":
                out[f.name] = getattr(self, f.name)
        out["eos_token_id"] = list(self.eos_token_ids) if self.eos_token_ids else None
        out["hidden_act"] = "silu"
        return out

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """Published shapes (DESIGN.md §2), plus "tiny" for CPU tests."""
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**_PRESETS[key])


_GLM_COMMON: dict[str, Any] = dict(
    vocab_size=151552, num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_shared_experts=1,
    num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-5, rope_theta=1e6, partial_rotary_factor=0.5,
    attention_bias=True, tie_word_embeddings=False, num_nextn_predict_layers=1, n_group=1, topk_group=1,
    eos_token_ids=(151329, 151336, 151338),
)
_GLM_45: dict[str, Any] = dict(
    _GLM_COMMON, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=92,
    n_routed_experts=160, first_k_dense_replace=3, routed_scaling_factor=2.5, use_qk_norm=True,
    max_position_embeddings=131072,
)
_PRESETS: dict[str, dict[str, Any]] = {
    "glm-4.5": _GLM_45,
    "glm-4.6": dict(_GLM_45, max_position_embeddings=202752),
    "glm-4.7": dict(_GLM_45, max_position_embeddings=202752),
    "glm-4.5-air": dict(
        _GLM_COMMON, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=46,
        n_routed_experts=128, first_k_dense_replace=1, routed_scaling_factor=1.0, use_qk_norm=False,
        max_position_embeddings=131072,
    ),
    # CPU-sized: GQA 6 like a slice of the real 12, partial RoPE over 32 of 64 dims, one dense layer then MoE.
    "tiny": dict(
        vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=12, num_key_value_heads=2, head_dim=64, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        rms_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True,
        max_position_embeddings=4096, tie_word_embeddings=False, num_nextn_predict_layers=0, n_group=1,
        topk_group=1, eos_token_ids=(2,),
    ),
}
