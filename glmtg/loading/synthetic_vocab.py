"""The tokenizer metadata of a GGUF file: from a real tokenizer, or a synthetic one for random-weight presets.

A random-weight model has no tokenizer, but llama.cpp will not load a file without one: it wants a token list,
merges for a "gpt2" (byte-level BPE) model, ids for its special tokens, every byte reachable as a token (its BPE
falls back to single-byte tokens, looked up by their byte-level text) and unique token strings. The synthetic
vocabulary below is the smallest thing that passes: the 256 byte-level tokens, seeded random merges up to the
config's vocab_size, and GLM's control tokens (``<|endoftext|>``, ``[gMASK]``, ``<|user|>`` ...) placed so that
the config's end-of-generation ids are eos, eot and eom, as llama.cpp's converter writes them for GLM.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from glmtg.config import ModelConfig

# gguf.TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# GLM-4.5's first control tokens in id order (151329 ...): eos is the first, eot the 8th, eom the 10th.
GLM_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>")
# A short GLM-4.5-style template: enough for chat and for llama.cpp to render, not GLM's full tool-call one.
CHAT_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MAX_MERGED_CHARS = 12  # long enough to look like words, short enough that merges stay varied


@dataclass(frozen=True)
class GGUFVocab:
    """What goes under ``tokenizer.*``: tokens in id order, their gguf.TokenType, merges ``"left right"`` in rank
    order, the pre-tokenizer name, special ids (``{"bos": id, "eos": id, "eot": ..., "eom": ..., "unknown": ...}``,
    gguf's key spellings) and the chat template."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    chat_template: str | None


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order (byte-level BPE tokens are spelled in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _end_ids(config: ModelConfig) -> dict[str, int]:
    # ModelConfig.from_gguf reads eos, eot, eom in that order: write the config's ids back the same way
    return dict(zip(("eos", "eot", "eom"), config.eos_token_ids))


def synthetic_vocab(config: ModelConfig, seed: int = 0) -> GGUFVocab:
    """A byte-level BPE vocabulary of exactly ``config.vocab_size`` tokens that llama.cpp accepts (see the module
    docstring). Deterministic for a given config and seed."""
    vocab = config.vocab_size
    if vocab < 256 + len(GLM_SPECIALS):
        raise ValueError(f"vocab_size {vocab} is too small for a synthetic vocabulary (needs at least "
                         f"{256 + len(GLM_SPECIALS)}: 256 byte tokens and {len(GLM_SPECIALS)} control tokens)")
    ends = _end_ids(config)
    # GLM's control tokens as one run starting at the eos id (GLM-4.5's own layout), moved down if it would
    # run past the vocabulary; end ids outside the run get a control token of their own.
    base = min(ends.get("eos", vocab - len(GLM_SPECIALS)), vocab - len(GLM_SPECIALS))
    special: dict[int, str] = {base + i: text for i, text in enumerate(GLM_SPECIALS)}
    for tid in ends.values():
        special.setdefault(tid, f"<|end_{tid}|>")

    rng = random.Random(seed)
    alphabet = byte_level_alphabet()
    letters = [c for c in alphabet if c.isalpha() and c.isascii()] + ["Ġ"]  # Ġ: the byte-level space
    normal = list(alphabet)
    seen = set(normal)
    merges: list[str] = []
    n_normal = vocab - len(special)
    while len(normal) < n_normal:
        # left from everything made so far (words grow), right from the letters (merges stay text-like)
        grown = len(normal) > 256 and rng.random() < 0.7
        left = normal[rng.randrange(256, len(normal))] if grown else rng.choice(letters)
        right = rng.choice(letters)
        token = left + right
        if token in seen or len(token) > MAX_MERGED_CHARS:
            continue
        seen.add(token)
        normal.append(token)
        merges.append(f"{left} {right}")

    tokens: list[str] = []
    types: list[int] = []
    it = iter(normal)
    for i in range(vocab):
        if i in special:
            tokens.append(special[i])
            types.append(CONTROL)
        else:
            tokens.append(next(it))
            types.append(NORMAL)
    ids = {t: i for i, t in enumerate(tokens)}
    special_ids = {"bos": ids["[gMASK]"], **ends, "unknown": ids["<|endoftext|>"]}
    return GGUFVocab(tokens, types, merges, "glm4", special_ids, CHAT_TEMPLATE)


def vocab_from_tokenizer(tokenizer: object, config: ModelConfig) -> GGUFVocab:
    """The vocabulary of a ``glmtg.loading.Tokenizer`` as llama.cpp's converter writes GLM's: tokens by id, padded
    with ``[PADn]`` (unused) to ``config.vocab_size`` (the embedding's rows); added special tokens as control,
    other added tokens as user-defined; BPE merges in rank order; bos ``[gMASK]``, eos/eot/eom from the config's
    end ids, unknown ``<|endoftext|>``."""
    tok = getattr(tokenizer, "_tok", tokenizer)  # our Tokenizer wraps a tokenizers.Tokenizer
    try:
        model = json.loads(tok.to_str())["model"]
    except (AttributeError, KeyError, TypeError, json.JSONDecodeError):
        raise ValueError("tokenizer must be a glmtg Tokenizer or a tokenizers.Tokenizer") from None
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model is {model.get('type')!r}; only BPE can be written to GGUF")
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= config.vocab_size:
        raise ValueError(f"tokenizer has token id {max(by_id)}, outside vocab_size {config.vocab_size}")
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special_ids = dict(_end_ids(config))
    for key, text in (("bos", "[gMASK]"), ("unknown", "<|endoftext|>")):
        if (tid := tok.token_to_id(text)) is not None:
            special_ids[key] = tid
    return GGUFVocab(tokens, types, merges, "glm4", special_ids, getattr(tokenizer, "chat_template", None))
