"""Tokenizer.from_dir on a tiny byte-level BPE tokenizer.json built here; chat templates rendered as
transformers renders them (checked against transformers itself on the same directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from glmtg.loading.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# GLM-style: a fixed prefix, role tags, trim/lstrip-sensitive whitespace, tojson of tools, raise_exception.
TEMPLATE = """[gMASK]<sop>
{%- if tools %}
<|system|>
Tools: {{ tools | tojson }}
{%- endif %}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m.role) }}
    {% endif %}
<|{{ m.role }}|>
{{ m.content }}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""
OTHER_TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there, <world> & friends"},
    {"role": "assistant", "content": "hi!"},
    {"role": "user", "content": "what is 2+2?"},
]


def build_dir(root: Path, template_in_config: str | None, template_file: str | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello there world friends", "what is two plus two", "be brief hi"] * 20, trainer)
    tok.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "model_max_length": 128}
    if template_in_config is not None:
        config["chat_template"] = template_in_config
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (root / "chat_template.jinja").write_text(template_file)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    (root / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]}))
    (root / "config.json").write_text(json.dumps({"model_type": "glm4_moe", "eos_token_id": ids["<|user|>"]}))
    return root


def transformers_render(root: Path, messages, **kwargs) -> str:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(root)).apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("where", ["tokenizer_config", "jinja_file"])
def test_chat_template_renders_as_transformers(tmp_path, where):
    root = build_dir(tmp_path / where, TEMPLATE if where == "tokenizer_config" else None,
                     TEMPLATE if where == "jinja_file" else None)
    tok = Tokenizer.from_dir(root)
    tools = [{"name": "calc", "description": "adds <a> & <b>"}]
    for gen_prompt in (True, False):
        for kw in ({}, {"tools": tools}):
            got = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt, **kw)
            assert got == transformers_render(root, MESSAGES, add_generation_prompt=gen_prompt, **kw)
    text = tok.apply_chat_template(MESSAGES[:2])
    assert text == ("[gMASK]<sop><|system|>\nBe brief.\n<|user|>\nhello there, <world> & friends\n"
                    "<|assistant|>")
    assert '"adds <a> & <b>"' in tok.apply_chat_template(MESSAGES[:2], tools=tools)  # tojson: no HTML escaping
    with pytest.raises(ValueError, match="chat template failed to render .*unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_jinja_file_wins_and_special_tokens_visible(tmp_path):
    root = build_dir(tmp_path / "both", TEMPLATE, OTHER_TEMPLATE)
    tok = Tokenizer.from_dir(root)
    assert tok.apply_chat_template(MESSAGES[1:3]) == "[user]hello there, <world> & friends<|endoftext|>[assistant]hi!<|endoftext|>"
    assert tok.apply_chat_template(MESSAGES[1:3]) == transformers_render(root, MESSAGES[1:3], add_generation_prompt=True)


def test_encode_decode_and_eos(tmp_path):
    root = build_dir(tmp_path / "t", TEMPLATE, None)
    tok = Tokenizer.from_dir(root)
    text = "[gMASK]<sop><|user|>\nhello there world<|assistant|>"
    ids = tok.encode(text)
    assert ids[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]  # specials are single tokens
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("what is two plus two?")) == "what is two plus two?"
    # generation_config's three, then config.json's (a duplicate), then tokenizer_config's eos_token (also one)
    want = (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|user|>"), tok.token_to_id("<|observation|>"))
    assert tok.eos_token_ids == want


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    root = build_dir(tmp_path / "plain", None, None)
    tok = Tokenizer.from_dir(root)
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template(MESSAGES)
    (root / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read"):
        Tokenizer.from_dir(root)


@pytest.mark.parametrize("template, match", [
    ("{% for x in %}{{ x }}{% endfor %}", r"does not compile \(line 1: "),
    ("{% if messages %}", "does not compile"),
    ("{{ messages[0].content + 1 }}", r"failed to render \(TypeError"),
    ("{{ raise_exception('no system prompt allowed') }}", "no system prompt allowed"),
    ("{{ messages.__class__.__mro__ }}", "failed to render"),  # the sandbox refuses it
])
def test_broken_chat_template_is_one_value_error(tmp_path, template, match):
    tok = Tokenizer.from_dir(build_dir(tmp_path / "t", None, template))
    with pytest.raises(ValueError, match=match) as info:
        tok.apply_chat_template(MESSAGES)
    assert "\n" not in str(info.value) or "line" in str(info.value)


def test_chat_template_file_that_is_not_text(tmp_path):
    root = build_dir(tmp_path / "t", None, None)
    (root / "chat_template.jinja").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="chat_template.jinja is not UTF-8"):
        Tokenizer.from_dir(root)
