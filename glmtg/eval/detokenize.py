"""Streaming detokenization: text of a growing token list, one piece per token."""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDecoder:
    """Text of a growing token list, one piece per token, never splitting a multi-byte character.

    Each push decodes a short window (from the last emitted boundary) and emits only what is new,
    holding text back while it ends in U+FFFD (an incomplete UTF-8 sequence so far).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
