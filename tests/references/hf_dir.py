"""A model written as an HF checkpoint directory (config.json, safetensors, tokenizer.json), for the tests that
load one through ``glmtg.loading.load_model`` or ``glmtg -m DIR``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from glmtg.config import ModelConfig
from glmtg.loading.names import glmtg_tensors_to_hf

# text the letter tokenizer below reads as 52 distinct-enough tokens (one per letter)
LETTERS_TEXT = " ".join("abcdefghijklmnopqrstuvwxyz") * 2


def write_letter_tokenizer(root: Path) -> None:
    """tokenizer.json: a word-level vocabulary of the 26 lowercase letters (and [UNK]), split on whitespace."""
    vocab = {"[UNK]": 0, **{chr(c): i + 1 for i, c in enumerate(range(ord("a"), ord("z") + 1))}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))


def write_hf_dir(root: Path, model: torch.nn.Module, config: ModelConfig, *, dtype: torch.dtype | None = None,
                 shards: int = 1) -> Path:
    """``model``'s tensors (``slot_tensors``) under checkpoint names, in ``dtype`` (default: as they are), in
    ``shards`` safetensors files (more than one: with model.safetensors.index.json), beside config.json and the
    letter tokenizer. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config.to_hf_dict()))
    write_letter_tokenizer(root)
    state = {name: (t if dtype is None else t.to(dtype)).detach().contiguous()
             for name, t in glmtg_tensors_to_hf(model.slot_tensors())}
    if shards == 1:
        save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(root / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root
