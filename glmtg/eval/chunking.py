"""How a token stream is cut into perplexity chunks (llama-perplexity's method).

Each chunk of ``n_ctx`` tokens is evaluated from an empty cache and only its second half is scored:
positions n_ctx/2 .. n_ctx-2 predict the next token, so every scored token sees at least n_ctx/2
tokens of context.
"""

from __future__ import annotations


def first_scored(n_ctx: int) -> int:
    """Position of a chunk's first scored token."""
    return n_ctx // 2


def scored_per_chunk(n_ctx: int) -> int:
    """Tokens scored in one chunk of ``n_ctx`` (the last position predicts nothing inside the chunk)."""
    return n_ctx - 1 - first_scored(n_ctx)
