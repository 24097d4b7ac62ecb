"""``glmtg generate``: stream a completion of -p/-f (optionally through the chat template)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glmtg.cli import common


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


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt, streaming tokens",
                              description="Stream a completion of the prompt, then print prompt and generation "
                                          "speed (t/s) on stderr.")
    common.add_model_flags(p, ctx_default=4096)
    p.add_argument("-p", "--prompt", default=None, help="prompt text")
    p.add_argument("-f", "--file", metavar="FILE", default=None, help="read the prompt from a file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("-n", "--n-predict", type=common.int_at_least_minus_one, default=128, metavar="N",
                   help="tokens to generate; -1 = until EOS or a full context")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS tokens")
    common.add_sampling_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.file is None):
        raise ValueError("give the prompt with exactly one of -p PROMPT or -f FILE")
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompt = path.read_text(encoding="utf-8", errors="replace")
    else:
        prompt = args.prompt
    sampling = common.sampling_params(args)
    loaded = common.load(args, need_tokenizer=True)
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True) \
        if args.chat else prompt
    ids = tok.encode(text)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    n = args.n_predict if args.n_predict >= 0 else args.ctx_size - len(ids)
    if len(ids) + n > args.ctx_size:
        raise ValueError(f"prompt ({len(ids)} tokens) + -n {n} exceed the context size -c {args.ctx_size}")
    engine = common.build_engine(args, loaded)
    common.print_banner(engine, file=sys.stderr)
    if not args.no_warmup:
        engine.warmup(sampling, prefill_tokens=min(len(ids), engine.ubatch))

    eos = tok.eos_token_ids or loaded.config.eos_token_ids
    decoder = IncrementalDecoder(tok.decode)
    out = sys.stdout

    def stream(token: int) -> None:
        if token in eos and not args.ignore_eos:
            return  # the stop token is not part of the text
        piece = decoder.push(token)
        if piece:
            out.write(piece)
            out.flush()

    result = engine.generate(ids, n, sampling, stop_on_eos=not args.ignore_eos, eos_token_ids=eos, on_token=stream)
    out.write(decoder.flush() + "\n")
    out.flush()
    print(f"\nsampler seed: {result.seed}; stopped by {result.stop_reason}", file=sys.stderr)
    print(f"prompt eval: {result.prompt_tokens} tokens in {result.prompt_seconds:.3f} s = "
          f"{result.prompt_tokens_per_second:.2f} t/s (includes the first token)", file=sys.stderr)
    print(f"generation:  {result.decode_steps} tokens in {result.decode_seconds:.3f} s = "
          f"{result.decode_tokens_per_second:.2f} t/s "
          f"({'CUDA graph' if engine.uses_cuda_graph else 'eager'} decode, attn {engine.attn_backend})",
          file=sys.stderr)
    return 0
