"""Tokenizer from an HF directory (tokenizer.json and a Jinja chat template) or from a GGUF file's metadata.

The chat template is rendered the way transformers renders it (sandboxed Jinja with trim_blocks and
lstrip_blocks, loopcontrols, a JSON-faithful ``tojson``, ``raise_exception`` and ``strftime_now``), so prompts
match what the model was trained on token for token.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from glmtg.loading.gguf_tokenizer import (
    END_ID_KEYS,
    KEY_TEMPLATE,
    SPECIAL_ID_KEYS,
    build_gguf_tokenizer,
    special_token_ids,
)

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config holds special tokens either as strings or as AddedToken dicts
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ': templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids = tuple(eos_token_ids)
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """tokenizer.json (required), tokenizer_config.json, chat_template.jinja (wins over the config's
        template, as in transformers), generation_config.json / config.json for the EOS ids."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"no tokenizer.json in {root}")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise ValueError(f"cannot read {tok_file}: {e}") from None
        tok_config = _read_json(root / "tokenizer_config.json")

        template_file = root / "chat_template.jinja"
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template
                     if isinstance(t, dict) and isinstance(t.get("name"), str)}
            template = named.get("default")
        if template_file.is_file():
            try:
                template = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{template_file} is not UTF-8 text: {e}") from None

        special = {k: t for k in _SPECIAL_KEYS if (t := _token_text(tok_config.get(k))) is not None}

        # EOS: every id any of the files names, generation_config first (it lists all stop tokens for GLM)
        eos: list[int] = []
        eos += _ids(_read_json(root / "generation_config.json").get("eos_token_id"))
        eos += _ids(_read_json(root / "config.json").get("eos_token_id"))
        if "eos_token" in special and (tid := tok.token_to_id(special["eos_token"])) is not None:
            eos.append(tid)
        return cls(tok, template if isinstance(template, str) else None, special, tuple(dict.fromkeys(eos)))

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> Tokenizer:
        """From the ``tokenizer.ggml.*`` keys and ``tokenizer.chat_template`` of a GGUF file's metadata (as
        ``open_gguf(path).metadata`` gives it). EOS ids are the eos, eot and eom ids, the tokens llama.cpp
        stops on; ValueError naming the key for anything missing or not understood."""
        tok = build_gguf_tokenizer(metadata)
        n = tok.get_vocab_size(with_added_tokens=True)
        ids = special_token_ids(metadata, n)
        special = {name: tok.id_to_token(i) for k, i in ids.items() if (name := SPECIAL_ID_KEYS[k]) is not None}
        eos = tuple(dict.fromkeys(ids[k] for k in END_ID_KEYS if k in ids))
        template = metadata.get(KEY_TEMPLATE)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"GGUF key {KEY_TEMPLATE!r} must be a string, got {type(template).__name__}")
        return cls(tok, template, special, eos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render the conversation to the prompt text (tokenize it with ``encode(text)``: the template already
        holds the special tokens)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
        if self._template is None:
            try:
                self._template = compile_chat_template(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"the chat template does not compile (line {e.lineno}: {e.message})") from None
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except Exception as e:  # noqa: BLE001 - the template is the model's data: any failure in it is bad input
            raise ValueError(f"the chat template failed to render ({type(e).__name__}: {e})") from None
