"""The tokenizer of models without tokenizer files (random-weight presets): one token per UTF-8 byte."""

from __future__ import annotations


class ByteTokenizer:
    """One token per UTF-8 byte: the documented fallback when there is no tokenizer.json.

    encode: byte b -> id ``b % vocab_size``; decode: id -> byte ``id % 256`` (invalid UTF-8 shows
    as U+FFFD). Deterministic, so perplexity/KLD runs on a preset are comparable with each other.
    """

    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A plain GLM-like layout (``<|role|>\\ncontent``), enough to exercise --chat without a template."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")
