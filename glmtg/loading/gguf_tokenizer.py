"""A ``tokenizers.Tokenizer`` rebuilt from the ``tokenizer.ggml.*`` keys of a llama.cpp GGUF file.

llama.cpp's converter stores a byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``) as the token
strings in id order, one type per token (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused padding,
6 byte), the merges as ``"left right"`` strings in rank order, the name of the pre-tokenizer
(``tokenizer.ggml.pre``) and the ids of the special tokens. Control and user-defined tokens are the
tokenizer's added tokens and are written as their plain text, so they are added back here as added
tokens matched whole in the input; control tokens are the special ones (dropped by
``decode(skip_special_tokens=True)``).

Pre-tokenizer "glm4" (and its older name "chatglm-bpe") is llama.cpp's LLAMA_VOCAB_PRE_TYPE_CHATGLM4: one
split regex (below, as GLM-4's tokenizer.json writes it; llama.cpp spells the case-insensitive
contractions out as ``'[sS]|'[tT]|...`` because its regex engine lacks ``(?i:)``), then the GPT-2 byte to
unicode mapping without a prefix space. Digits go in runs of at most three.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

GLM4_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_MODELS = ("gpt2",)
GLM4_PRE_NAMES = ("glm4", "chatglm-bpe")

KEY_MODEL = "tokenizer.ggml.model"
KEY_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_TYPES = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_TEMPLATE = "tokenizer.chat_template"

# llama_token_type values (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# tokenizer.ggml.<name>_token_id names (gguf's spelling, "seperator" included) -> the names transformers
# gives those tokens, which chat templates use; eot/eom have none
SPECIAL_ID_KEYS = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token",
                   "seperator": "sep_token", "mask": "mask_token", "eot": None, "eom": None}
# tokens that end a turn: llama.cpp stops on eos, eot (end of turn) and eom (end of message)
END_ID_KEYS = ("eos", "eot", "eom")


def _str_list(metadata: dict[str, Any], key: str) -> list[str]:
    if key not in metadata:
        raise ValueError(f"GGUF metadata has no {key!r}")
    value = metadata[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"GGUF key {key!r} must be an array of strings, got {type(value).__name__}")
    return value


def _str(metadata: dict[str, Any], key: str) -> str:
    if key not in metadata:
        raise ValueError(f"GGUF metadata has no {key!r}")
    value = metadata[key]
    if not isinstance(value, str):
        raise ValueError(f"GGUF key {key!r} must be a string, got {type(value).__name__}")
    return value


def _token_types(metadata: dict[str, Any], n_tokens: int) -> np.ndarray:
    if KEY_TYPES not in metadata:  # optional in llama.cpp: every token is then normal
        return np.full(n_tokens, NORMAL, dtype=np.int64)
    value = metadata[KEY_TYPES]
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        raise ValueError(f"GGUF key {KEY_TYPES!r} must be an integer array")
    if len(value) != n_tokens:
        raise ValueError(f"GGUF key {KEY_TYPES!r} has {len(value)} entries for {n_tokens} tokens")
    bad = np.flatnonzero((value < NORMAL) | (value > BYTE))
    if len(bad):
        raise ValueError(f"GGUF key {KEY_TYPES!r}: token {int(bad[0])} has unknown type {int(value[bad[0]])}")
    return value.astype(np.int64)


def _merges(metadata: dict[str, Any], vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for rank, line in enumerate(_str_list(metadata, KEY_MERGES)):
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"GGUF key {KEY_MERGES!r}: merge {rank} ({line!r}) is not 'left right'")
        for piece in (parts[0], parts[1], parts[0] + parts[1]):
            if piece not in vocab:
                raise ValueError(f"GGUF key {KEY_MERGES!r}: merge {rank} ({line!r}) uses {piece!r}, "
                                 f"which is not in {KEY_TOKENS!r}")
        merges.append((parts[0], parts[1]))
    return merges


def special_token_ids(metadata: dict[str, Any], n_tokens: int) -> dict[str, int]:
    """``{"bos": id, "eos": id, ...}`` for every ``tokenizer.ggml.<name>_token_id`` key present."""
    ids: dict[str, int] = {}
    for name in SPECIAL_ID_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        if key not in metadata:
            continue
        value = metadata[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_tokens:
            raise ValueError(f"GGUF key {key!r} must be a token id below {n_tokens}, got {value!r}")
        ids[name] = value
    return ids


def build_gguf_tokenizer(metadata: dict[str, Any]) -> _HFTokenizer:
    """The byte-level BPE tokenizer the metadata describes; ValueError naming the key for anything
    missing, inconsistent or not understood (another tokenizer model or pre-tokenizer)."""
    model = _str(metadata, KEY_MODEL)
    if model not in KNOWN_MODELS:
        raise ValueError(f"GGUF key {KEY_MODEL!r} is {model!r}; only {KNOWN_MODELS} (byte-level BPE) is supported")
    pre = _str(metadata, KEY_PRE)
    if pre not in GLM4_PRE_NAMES:
        raise ValueError(f"GGUF key {KEY_PRE!r} is {pre!r}; only {GLM4_PRE_NAMES} is supported")
    tokens = _str_list(metadata, KEY_TOKENS)
    if not tokens:
        raise ValueError(f"GGUF key {KEY_TOKENS!r} is empty")
    types = _token_types(metadata, len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"GGUF key {KEY_TOKENS!r}: token {i} ({t!r}) repeats token {vocab[t]}")
        vocab[t] = i
    merges = _merges(metadata, vocab)

    # Every token, added ones included, goes into the BPE vocab at its file id: the added-token table then
    # reuses those ids instead of appending new ones.
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                                  byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(tokens[i], special=True, normalized=False) for i in np.flatnonzero(types == CONTROL)]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i in np.flatnonzero(types == USER_DEFINED)]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok
