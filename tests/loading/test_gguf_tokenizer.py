"""Tokenizer.from_gguf: a small byte-level BPE trained here with the GLM-4 pre-tokenizer is written into a
GGUF the way llama.cpp's converter writes it (get_vocab_base + _set_vocab_glm + SpecialVocab), read back
with open_gguf, and must encode and decode exactly as the original tokenizer on seeded random text."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from glmtg.loading.gguf import open_gguf
from glmtg.loading.gguf_tokenizer import build_gguf_tokenizer
from glmtg.loading.tokenizer import Tokenizer

# The split regex as llama.cpp's llama-vocab.cpp spells it for LLAMA_VOCAB_PRE_TYPE_CHATGLM4 (contractions
# spelled out instead of (?i:)): the reference tokenizer uses this form, the code under test GLM's own.
LLAMA_CPP_GLM4_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<think>", "</think>"]
USER_DEFINED = ["<tool_hint>"]  # an added token that is not special: type 4
PAD_TO = 7  # the converter pads the list to config.json's vocab_size with [PADn] (type 5)
TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CORPUS = [
    "def f(x):\n    return x ** 2 + 31415926  # square it\n\n\tif x != 0: print(f'{x:>8}')\r\n",
    "The quick brown fox jumps over the lazy dog. It's 12:45; we'll see, they've gone, I'd say I'M OK.",
    "Ünïcödé téxt: naïve café, Straße, Ελληνικά, русский текст, 中文分词测试，日本語のテキスト。",
    "emoji 😀🚀✨ and symbols ∑∫√ ≤ ≥ → ← ©®™ ¥€£ 0x1F600 1,234,567.89 -42 +3e-7",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}   trailing   spaces   \n\n\n  indented\n",
    "SELECT * FROM users WHERE id = 1000 AND name LIKE '%smith%'; -- sql\n<div class=\"x\">html</div>",
]
ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
            + list(" \t\n\r  ") + list(".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`") + list("éüßЖж中文日本ΩπΣ😀🚀∑→€")
            + ["'s", "'LL", "'Re", "  ", "\n\n", "\r\n", "1234567", "    "])
PIECES = SPECIALS + USER_DEFINED + ["<|user", "gMASK", "<sop", "[PAD3]"]  # wholes and near misses


def reference_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA_CPP_GLM4_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    return tok


def converter_metadata(tok: HFTokenizer) -> dict[str, Any]:
    """What the converter derives from the HF tokenizer: tokens in id order with their types, merges as
    'left right' strings, the special ids and the chat template."""
    added = tok.get_added_tokens_decoder()
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok.id_to_token(i))
            types.append(gguf.TokenType.NORMAL)
    for i in range(PAD_TO):
        tokens.append(f"[PAD{n + i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    return {"tokens": tokens, "types": types, "merges": merges,
            "ids": {"bos": ids["[gMASK]"], "eos": ids["<|endoftext|>"], "eot": ids["<|user|>"],
                    "unknown": ids["<|endoftext|>"], "eom": ids["<|observation|>"], "padding": ids["<|endoftext|>"]}}


def write_gguf(path: Path, meta: dict[str, Any], *, model: str = "gpt2", pre: str = "glm4",
               skip: tuple[str, ...] = ()) -> Path:
    w = gguf.GGUFWriter(str(path), "glm4moe")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    if "tokens" not in skip:
        w.add_token_list(meta["tokens"])
    if "types" not in skip:
        w.add_token_types(meta["types"])
    if "merges" not in skip:
        w.add_token_merges(meta["merges"])
    ids = meta["ids"]
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_eot_token_id(ids["eot"])
    w.add_eom_token_id(ids["eom"])
    w.add_unk_token_id(ids["unknown"])
    w.add_pad_token_id(ids["padding"])
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read(path: Path) -> dict[str, Any]:
    with open_gguf(path) as f:
        return f.metadata


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[HFTokenizer, dict[str, Any], Tokenizer]:
    ref = reference_tokenizer()
    meta = converter_metadata(ref)
    path = write_gguf(tmp_path_factory.mktemp("gguf_tok") / "tok.gguf", meta)
    return ref, meta, Tokenizer.from_gguf(read(path))


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 40)):
        r = rng.random()
        if r < 0.1:
            parts.append(rng.choice(PIECES))
        elif r < 0.3:
            parts.append(rng.choice(CORPUS)[rng.randint(0, 40):][:rng.randint(1, 30)])
        else:
            parts.append(rng.choice(ALPHABET))
    return "".join(parts)


def test_encode_decode_equal_reference_on_random_text(built: Any) -> None:
    ref, _, tok = built
    rng = random.Random(1234)
    n_special = 0
    for _ in range(600):
        text = random_text(rng)
        want = ref.encode(text, add_special_tokens=False).ids
        got = tok.encode(text)
        assert got == want, text
        assert tok.decode(got) == ref.decode(want, skip_special_tokens=False) == text
        assert tok.decode(got, skip_special=True) == ref.decode(want, skip_special_tokens=True)
        n_special += any(s in text for s in SPECIALS)
    assert n_special > 50  # the special-token paths were exercised


def test_glm4_pretokenization(built: Any) -> None:
    _, _, tok = built
    pieces = [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str("year 12345 it's\n\n  x")]
    # digits in runs of three, the contraction split off, newlines grouped; Ġ/Ċ are byte-level space/newline
    assert pieces == ["year", "Ġ", "123", "45", "Ġit", "'s", "ĊĊ", "Ġ", "Ġx"]


def test_special_and_user_defined_tokens(built: Any) -> None:
    ref, meta, tok = built
    assert tok.vocab_size == len(meta["tokens"])
    for t in SPECIALS + USER_DEFINED:
        assert tok.token_to_id(t) == ref.token_to_id(t)
        assert tok.encode(f"a{t}b")[1] == ref.token_to_id(t)
    pad = f"[PAD{len(meta['tokens']) - 1}]"
    assert tok.token_to_id(pad) == len(meta["tokens"]) - 1
    assert tok.encode(pad) == ref.encode(pad).ids  # unused padding is never produced from text
    assert tok.decode([tok.token_to_id("<tool_hint>")], skip_special=True) == "<tool_hint>"
    assert tok.decode([tok.token_to_id("<|user|>")], skip_special=True) == ""
    ids = meta["ids"]
    assert tok.eos_token_ids == (ids["eos"], ids["eot"], ids["eom"])
    assert tok.special_tokens == {"bos_token": "[gMASK]", "eos_token": "<|endoftext|>",
                                  "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def test_chat_template_round_trips(built: Any) -> None:
    ref, _, tok = built
    assert tok.chat_template == TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "2+2 is 4, isn't it?"}])
    assert text == "[gMASK]<sop><|user|>\n2+2 is 4, isn't it?<|assistant|>"
    ids = tok.encode(text)
    assert ids == ref.encode(text).ids
    assert ids[:3] == [ref.token_to_id("[gMASK]"), ref.token_to_id("<sop>"), ref.token_to_id("<|user|>")]


def test_no_template_is_none(built: Any, tmp_path: Path) -> None:
    _, meta, _ = built
    md = dict(read(write_gguf(tmp_path / "t.gguf", meta)))
    del md["tokenizer.chat_template"]
    tok = Tokenizer.from_gguf(md)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def good_md(built: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return read(write_gguf(tmp_path_factory.mktemp("good") / "t.gguf", built[1]))


def _edit(md: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(md)
    for k, v in changes.items():
        key = k.replace("__", ".")
        if v is None:
            out.pop(key, None)
        else:
            out[key] = v
    return out


@pytest.mark.parametrize("changes,match", [
    ({"tokenizer__ggml__tokens": None}, "no 'tokenizer.ggml.tokens'"),
    ({"tokenizer__ggml__merges": None}, "no 'tokenizer.ggml.merges'"),
    ({"tokenizer__ggml__model": None}, "no 'tokenizer.ggml.model'"),
    ({"tokenizer__ggml__pre": None}, "no 'tokenizer.ggml.pre'"),
    ({"tokenizer__ggml__model": "llama"}, "'tokenizer.ggml.model' is 'llama'"),
    ({"tokenizer__ggml__pre": "qwen2"}, "'tokenizer.ggml.pre' is 'qwen2'"),
    ({"tokenizer__ggml__tokens": []}, "'tokenizer.ggml.tokens' is empty"),
    ({"tokenizer__ggml__tokens": np.arange(3)}, "'tokenizer.ggml.tokens' must be an array of strings"),
    ({"tokenizer__ggml__merges": ["Ġ t", "zzzq xq"]}, r"merge 1 \('zzzq xq'\) uses 'zzzq'"),
    ({"tokenizer__ggml__merges": ["Ġt"]}, r"merge 0 \('Ġt'\) is not 'left right'"),
    ({"tokenizer__ggml__token_type": np.ones(5, dtype=np.int32)}, "has 5 entries"),
    ({"tokenizer__ggml__token_type": ["1"]}, "must be an integer array"),
    ({"tokenizer__ggml__eos_token_id": 10**6}, "'tokenizer.ggml.eos_token_id' must be a token id"),
    ({"tokenizer__chat_template": 3}, "'tokenizer.chat_template' must be a string"),
])
def test_bad_metadata(good_md: dict[str, Any], changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_gguf(_edit(good_md, **changes))


def test_unknown_token_type_and_duplicates(good_md: dict[str, Any]) -> None:
    types = good_md["tokenizer.ggml.token_type"].copy()
    types[9] = 7
    with pytest.raises(ValueError, match="token 9 has unknown type 7"):
        build_gguf_tokenizer(_edit(good_md, tokenizer__ggml__token_type=types))
    tokens = list(good_md["tokenizer.ggml.tokens"])
    tokens[20] = tokens[19]
    with pytest.raises(ValueError, match="token 20 .* repeats token 19"):
        build_gguf_tokenizer(_edit(good_md, tokenizer__ggml__tokens=tokens))


def test_merge_result_must_be_a_token(good_md: dict[str, Any]) -> None:
    merges = list(good_md["tokenizer.ggml.merges"])
    merges.append("Ġ Ġ")  # both halves are tokens but 'ĠĠ' need not be
    tokens = list(good_md["tokenizer.ggml.tokens"])
    if "ĠĠ" in tokens:
        tokens[tokens.index("ĠĠ")] = "not-a-merge-result"
    with pytest.raises(ValueError, match=r"uses 'ĠĠ'"):
        build_gguf_tokenizer(_edit(good_md, tokenizer__ggml__tokens=tokens, tokenizer__ggml__merges=merges))


def test_types_optional(good_md: dict[str, Any]) -> None:
    # without token types every token is normal: control tokens are then split like text
    tok = build_gguf_tokenizer(_edit(good_md, tokenizer__ggml__token_type=None))
    assert tok.token_to_id("<|user|>") is not None
    assert len(tok.encode("<|user|>").ids) > 1
