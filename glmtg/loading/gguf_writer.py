"""Write a GLM4-MoE model as a llama.cpp GGUF file (arch ``glm4moe``) with the ``gguf`` package's GGUFWriter.

The file holds what llama.cpp's converter writes for GLM-4.5 (conversion/glm.py) and what its loader reads for
glm4moe (src/models/glm4-moe.cpp, src/llama-model.cpp, src/llama-vocab.cpp): the hparam keys, the tensors under
llama.cpp's names (glmtg/loading/names.py) with GGUF's dims (ggml ``ne``, the torch shape reversed: GGUFWriter
reverses it) and a byte-level BPE tokenizer (a real one, or ``synthetic_vocab`` for random weights).

Tensors are streamed: their infos are written first, then each tensor is copied to the host and written on its
own, so writing a ~60 GB model needs host memory for one tensor, not for the file. The file is written under a
temporary name and renamed when complete, so a failed write never leaves a truncated ``.gguf`` behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from glmtg.config import ModelConfig
from glmtg.formats import QUANTIZABLE, quantize_blocks
from glmtg.formats.ggml_types import GGML_TYPE_IDS, GGML_TYPES
from glmtg.loading.names import (
    NEXTN_SUFFIXES,
    expected_gguf_names,
    gguf_block_index,
    glmtg_to_gguf,
    is_gguf_layer_name,
)
from glmtg.loading.synthetic_vocab import (
    GGUFVocab,
    synthetic_vocab,
    vocab_from_tokenizer,
)
from glmtg.models.glm4_moe import Glm4MoeForCausalLM

ARCH = "glm4moe"
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, written by llama-quantize and the converter
MAX_NAME_BYTES = 63
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Tensor types a writer may use: the float types and ggml's block-quantized weight types.
WRITABLE_TYPES = tuple(t.name for t in GGML_TYPES.values()
                       if t.name in FLOAT_TYPES or t.block_size > 1)
# Tensors of an MTP/nextn block beyond the layer table: (suffix, shape from (hidden, vocab)), required or not,
# as llama.cpp's glm4moe loader creates them.
_NEXTN_SHAPES = {
    "nextn.eh_proj.weight": (lambda h, v: (h, 2 * h), True),
    "nextn.enorm.weight": (lambda h, v: (h,), True),
    "nextn.hnorm.weight": (lambda h, v: (h,), True),
    "nextn.embed_tokens.weight": (lambda h, v: (v, h), False),
    "nextn.shared_head_head.weight": (lambda h, v: (v, h), False),
    "nextn.shared_head_norm.weight": (lambda h, v: (h,), False),
}
assert set(_NEXTN_SHAPES) == set(NEXTN_SUFFIXES)


@dataclass(frozen=True)
class _Planned:
    name: str
    type_name: str  # ggml type name, upper case
    shape: tuple[int, ...]  # logical torch-order shape (values)
    data: torch.Tensor | Callable[[], torch.Tensor]  # a callable makes the tensor when it is written
    nbytes: int


def ggml_type_name(fmt: str) -> str:
    """The ggml type name (``"Q4_K"``) of a format name in either spelling (``"q4_k"``, ``"Q4_K"``)."""
    if not isinstance(fmt, str) or fmt.upper() not in WRITABLE_TYPES:
        raise ValueError(f"tensor format must be one of {', '.join(t.lower() for t in WRITABLE_TYPES)}, got {fmt!r}")
    return fmt.upper()


def row_bytes(type_name: str, values: int) -> int:
    """Bytes of one row of ``values`` values in ggml type ``type_name``."""
    t = GGML_TYPES[GGML_TYPE_IDS[type_name]]
    return values // t.block_size * t.type_size


def _plan(entry: tuple[str, str, Sequence[int], torch.Tensor]) -> _Planned:
    try:
        name, fmt, shape, data = entry
    except (TypeError, ValueError):
        raise ValueError("tensors must be (gguf_name, format, shape, tensor) tuples") from None
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name must be a non-empty string of at most {MAX_NAME_BYTES} bytes, got {name!r}")
    type_name = ggml_type_name(fmt)
    shape = tuple(shape)
    if not 1 <= len(shape) <= 4 or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(f"tensor {name}: shape must be 1 to 4 positive ints, got {shape}")
    block = GGML_TYPES[GGML_TYPE_IDS[type_name]].block_size
    if shape[-1] % block:
        raise ValueError(f"tensor {name}: rows of {shape[-1]} values are not a multiple of {type_name}'s block "
                         f"size {block}")
    if isinstance(data, torch.Tensor):
        _check_data(name, type_name, shape, data)
    elif not callable(data):
        raise ValueError(f"tensor {name}: data must be a torch.Tensor or a function making one, got "
                         f"{type(data).__name__}")
    raw_shape = (*shape[:-1], row_bytes(type_name, shape[-1]))
    return _Planned(name, type_name, shape, data, int(np.prod(raw_shape)))


def _check_data(name: str, type_name: str, shape: tuple[int, ...], data: object) -> None:
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"tensor {name}: data must be a torch.Tensor, got {type(data).__name__}")
    raw_shape = (*shape[:-1], row_bytes(type_name, shape[-1]))
    if data.is_floating_point():
        if tuple(data.shape) != shape:
            raise ValueError(f"tensor {name}: float data has shape {tuple(data.shape)}, expected {shape}")
    elif data.dtype != torch.uint8:
        raise ValueError(f"tensor {name}: data must be floating point or raw uint8 bytes, got {data.dtype}")
    elif tuple(data.shape) != raw_shape:
        raise ValueError(f"tensor {name}: raw {type_name} data has shape {tuple(data.shape)}, expected {raw_shape}")


def _check_tensors(config: ModelConfig, planned: list[_Planned]) -> int:
    """Check names and shapes against what llama.cpp's glm4moe loader creates for ``config``; return the number
    of MTP/nextn blocks (blocks past the config's layers)."""
    n_layers = config.num_hidden_layers
    seen: dict[str, _Planned] = {}
    for p in planned:
        if p.name in seen:
            raise ValueError(f"tensor {p.name} is given twice")
        seen[p.name] = p
    extra_blocks = sorted({b for p in planned if (b := gguf_block_index(p.name)) is not None and b >= n_layers})
    if extra_blocks != list(range(n_layers, n_layers + len(extra_blocks))):
        raise ValueError(f"blocks past the {n_layers} layers must be MTP blocks numbered from {n_layers} on, got "
                         f"{extra_blocks}")
    n_nextn = len(extra_blocks)
    full = dataclasses.replace(config, num_hidden_layers=n_layers + n_nextn)
    expected = {name: slot.shape for name, slot in
                expected_gguf_names(Glm4MoeForCausalLM(full, dtype=torch.float32, device="meta").tensor_slots()).items()}
    h, v = config.hidden_size, config.vocab_size
    for b in extra_blocks:
        for suffix, (shape, required) in _NEXTN_SHAPES.items():
            expected[f"blk.{b}.{suffix}"] = shape(h, v)
            if required and f"blk.{b}.{suffix}" not in seen:
                raise ValueError(f"MTP block {b} lacks tensor blk.{b}.{suffix}")
    for p in planned:
        if p.name not in expected:
            known = is_gguf_layer_name(p.name, nextn=True) or p.name in ("token_embd.weight", "output.weight")
            why = "does not fit this config" if known else "is not a glm4moe tensor"
            raise ValueError(f"tensor {p.name} {why}")
        if p.shape != tuple(expected[p.name]):
            raise ValueError(f"tensor {p.name} has shape {p.shape}, expected {tuple(expected[p.name])}")
    optional = {f"blk.{b}.{s}" for b in extra_blocks for s, (_, req) in _NEXTN_SHAPES.items() if not req}
    missing = [name for name in expected if name not in seen and name not in optional]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    return n_nextn


def _file_type(file_type: str | None, planned: list[_Planned]) -> int:
    """gguf.LlamaFileType of the file: the one named (``"Q4_K_M"``), else that of the type holding most bytes."""
    if file_type is None:
        by_type: dict[str, int] = {}
        for p in planned:
            if len(p.shape) > 1:
                by_type[p.type_name] = by_type.get(p.type_name, 0) + p.nbytes
        if not by_type:
            return gguf.LlamaFileType.ALL_F32
        file_type = max(by_type, key=by_type.__getitem__)
        return int(getattr(gguf.LlamaFileType, _file_type_member(file_type), gguf.LlamaFileType.GUESSED))
    if not isinstance(file_type, str) or not hasattr(gguf.LlamaFileType, _file_type_member(file_type)):
        raise ValueError(f"file_type {file_type!r} is not a llama.cpp file type (e.g. Q4_0, Q4_K_M, Q8_0, BF16)")
    return int(getattr(gguf.LlamaFileType, _file_type_member(file_type)))


def _file_type_member(name: str) -> str:
    name = name.upper()
    return "ALL_F32" if name == "F32" else f"MOSTLY_{name}"


def _add_hparams(w: gguf.GGUFWriter, config: ModelConfig, n_nextn: int) -> None:
    """The ``glm4moe.*`` keys, as llama.cpp's converter writes them for GLM-4.5."""
    w.add_block_count(config.num_hidden_layers + n_nextn)  # llama.cpp counts the MTP blocks in block_count
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.rotary_dim)
    w.add_expert_count(config.n_routed_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_group_count(config.n_group)
    w.add_expert_group_used_count(config.topk_group)
    w.add_expert_shared_count(config.n_shared_experts)
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_leading_dense_block_count(config.first_k_dense_replace)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(config.routed_scaling_factor)
    w.add_expert_weights_norm(config.norm_topk_prob)
    if n_nextn:
        w.add_nextn_predict_layers(n_nextn)


def _add_vocab(w: gguf.GGUFWriter, vocab: GGUFVocab, config: ModelConfig) -> None:
    if len(vocab.tokens) != config.vocab_size or len(vocab.types) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(vocab.tokens)} tokens, but vocab_size is {config.vocab_size}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for name, tid in vocab.special_ids.items():
        w.add_uint32(f"tokenizer.ggml.{name}_token_id", tid)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)


def _host_bytes(p: _Planned) -> np.ndarray:
    """The tensor's bytes as stored in the file, on the host (one tensor at a time)."""
    data = p.data
    if not isinstance(data, torch.Tensor):
        data = data()
        _check_data(p.name, p.type_name, p.shape, data)
    data = data.detach()
    if data.dtype == torch.uint8:  # raw bytes as stored (blocks, or a float type's bytes)
        return data.cpu().contiguous().numpy()
    if p.type_name in FLOAT_TYPES:
        t = data.to(device="cpu", dtype=FLOAT_TYPES[p.type_name]).contiguous()
        return t.view(torch.uint8).numpy()
    fmt = p.type_name.lower()
    if fmt not in QUANTIZABLE:
        raise ValueError(f"tensor {p.name}: glmtg cannot quantize to {p.type_name}; pass raw blocks")
    # quantized where the values are (the GPU for a big model), then copied to the host
    return quantize_blocks(data, fmt).cpu().contiguous().numpy()


def write_gguf(path: str | os.PathLike, config: ModelConfig,
               tensors: Iterable[tuple[str, str, Sequence[int], torch.Tensor]], *,
               tokenizer: object = None, file_type: str | None = None, name: str | None = None,
               progress: bool = False, split_max_bytes: int = 0) -> list[Path]:
    """Write ``config`` and ``tensors`` as a GGUF file llama.cpp loads.

    ``tensors``: (GGUF name, format, logical torch-order shape, data), data either float values of that shape
    (stored in the format: converted for f32/f16/bf16, else quantized by ``glmtg.formats.quantize_blocks``) or the raw
    uint8 bytes as stored, ``[..., rows, row_bytes]``. The entries are listed first (references, no copy)
    so that names and shapes are checked against ``config`` before anything is written; blocks past the
    config's layers are MTP (nextn) blocks. ``tokenizer``: a glmtg ``Tokenizer``, a ``GGUFVocab`` or None for
    a synthetic vocabulary. ``file_type``: llama.cpp's name for the mix (``"Q4_K_M"``), written as
    ``general.file_type``; None derives it from the tensors. ``split_max_bytes`` > 0 splits the file into parts
    of at most that many tensor bytes, named as llama.cpp's gguf-split names them (``NAME-00001-of-0000N.gguf``
    from ``NAME.gguf``). Returns the paths written. Bad input is a ValueError naming the tensor.
    """
    if not isinstance(split_max_bytes, int) or isinstance(split_max_bytes, bool) or split_max_bytes < 0:
        raise ValueError(f"split_max_bytes must be an int >= 0, got {split_max_bytes!r}")
    planned = [_plan(entry) for entry in tensors]
    n_nextn = _check_tensors(config, planned)
    ftype = _file_type(file_type, planned)
    if tokenizer is None:
        vocab = synthetic_vocab(config)
    elif isinstance(tokenizer, GGUFVocab):
        vocab = tokenizer
    else:
        vocab = vocab_from_tokenizer(tokenizer, config)

    # Written in a temporary folder beside the output, then moved: a failed write leaves no truncated file.
    out = Path(path)
    tmp_dir = out.with_name(f".{out.name}.part")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    w = gguf.GGUFWriter(tmp_dir / out.name, ARCH, split_max_size=split_max_bytes)
    try:
        w.add_name(name or "glmtg GLM4-MoE")
        w.add_file_type(ftype)
        w.add_quantization_version(QUANTIZATION_VERSION)
        _add_hparams(w, config, n_nextn)
        _add_vocab(w, vocab, config)
        for p in planned:
            raw_shape = (*p.shape[:-1], row_bytes(p.type_name, p.shape[-1]))
            w.add_tensor_info(p.name, raw_shape, np.dtype(np.uint8), p.nbytes, gguf.GGMLQuantizationType[p.type_name])
        files = w.format_shard_names(tmp_dir / out.name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in tqdm(planned, desc="writing tensors", unit="tensor", disable=not progress):
            w.write_tensor_data(_host_bytes(p))
        w.close()
        written = []
        for f in files:
            os.replace(f, out.with_name(f.name))
            written.append(out.with_name(f.name))
        return written
    finally:
        w.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)


def model_tensors(model: Glm4MoeForCausalLM, fmt_of: Callable[[str, tuple[int, ...]], str | None] | None = None
                  ) -> Iterator[tuple[str, str, tuple[int, ...], torch.Tensor]]:
    """``write_gguf``'s tensors for a model: each slot under its GGUF name, views of the parameters (no copy).

    A quantized slot (``slot.format``) gives its raw blocks; a float slot is written as ``fmt_of(gguf_name,
    shape)`` when that names a format (quantized on write) and in its own dtype otherwise.
    """
    names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    for slot, value in model.slot_tensors():
        name = glmtg_to_gguf(slot.name, slot.shard)
        fmt = getattr(slot, "format", None) or (fmt_of(name, slot.shape) if fmt_of else None)
        if fmt is None:
            if value.dtype not in names:
                raise ValueError(f"tensor {name}: no GGUF type for dtype {value.dtype}")
            fmt = names[value.dtype]
        yield name, fmt, slot.shape, value


def random_mtp_tensors(config: ModelConfig, fmt_of: Callable[[str, tuple[int, ...]], str], *, seed: int,
                       device: torch.device | str = "cpu"
                       ) -> list[tuple[str, str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """``write_gguf``'s tensors for ``config.num_nextn_predict_layers`` MTP blocks of seeded random weights (as
    ``random_model`` draws them: matrices std 0.02, norms 1, a small selection bias), so that a random preset's
    file has the blocks a converted GLM file has. Each tensor is drawn on ``device`` when it is written (one at
    a time: an MTP block is a whole MoE layer), in the format ``fmt_of(gguf_name, shape)``; the optional nextn
    tensors that GLM checkpoints lack (embed_tokens, shared_head_head) are left out."""
    n, extra = config.num_hidden_layers, config.num_nextn_predict_layers
    full = dataclasses.replace(config, num_hidden_layers=n + extra)
    slots = expected_gguf_names(Glm4MoeForCausalLM(full, dtype=torch.float32, device="meta").tensor_slots())
    shapes = {name: tuple(slot.shape) for name, slot in slots.items() if (gguf_block_index(name) or 0) >= n}
    h, v = config.hidden_size, config.vocab_size
    for b in range(n, n + extra):
        for suffix in ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight",
                       "nextn.shared_head_norm.weight"):
            shapes[f"blk.{b}.{suffix}"] = _NEXTN_SHAPES[suffix][0](h, v)
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(name: str, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            if name.endswith("norm.weight"):
                return torch.ones(shape, device=device)
            scale = 0.01 if name.endswith("exp_probs_b.bias") else 0.02
            return torch.randn(shape, generator=gen, device=device) * scale
        return make

    return [(name, fmt_of(name, shape), shape, draw(name, shape)) for name, shape in shapes.items()]
