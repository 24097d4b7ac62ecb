"""``glmtg generate``: stream a completion of -p/-f (optionally through the chat template)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tqdm import tqdm

from glmtg.cli import common
from glmtg.eval.detokenize import IncrementalDecoder

# Prompts at least this long get a progress bar (shorter ones finish before a bar is worth drawing).
PROGRESS_MIN_TOKENS = 4096


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
    prompt = common.read_text_file(args.file, "prompt file") if args.file is not None else args.prompt
    sampling = common.sampling_params(args)
    source = common.model_source(args)
    # the prompt is ready (template rendered, tokens counted) before any weight is loaded
    tok = common.load_tokenizer(source)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True) \
        if args.chat else prompt
    ids = tok.encode(text)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    bad = [t for t in ids if not 0 <= t < source.config.vocab_size]
    if bad:
        raise ValueError(f"the tokenizer gives ids {bad[:3]} outside the model's vocabulary "
                         f"[0, {source.config.vocab_size}): tokenizer.json does not belong to this model")
    n = args.n_predict if args.n_predict >= 0 else args.ctx_size - len(ids)
    if len(ids) + n > args.ctx_size:
        raise ValueError(f"prompt ({len(ids)} tokens) + -n {n} exceed the context size -c {args.ctx_size}")
    loaded = common.load(args, source, ctx_size=args.ctx_size, tokenizer=tok)
    engine = common.build_engine(args, loaded)
    common.print_banner(loaded, file=sys.stderr)
    if not args.no_warmup:
        engine.warmup(sampling, prefill_tokens=min(len(ids), engine.settings.ubatch))

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

    show_progress = len(ids) >= PROGRESS_MIN_TOKENS and len(ids) > engine.settings.ubatch
    with tqdm(total=len(ids), unit="tok", desc="prefill", disable=not show_progress, leave=False,
              file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        result = engine.generate(ids, n, sampling, stop_on_eos=not args.ignore_eos, eos_token_ids=eos,
                                 on_token=stream, on_prefill_progress=progress if show_progress else None)
    out.write(decoder.flush() + "\n")
    out.flush()
    print(f"\nsampler seed: {result.seed}; stopped by {result.stop_reason}", file=sys.stderr)
    print(f"prompt eval: {result.prompt_tokens} tokens in {result.prompt_seconds:.3f} s = "
          f"{result.prompt_tokens_per_second:.2f} t/s (includes the first token)", file=sys.stderr)
    print(f"generation:  {result.decode_steps} tokens in {result.decode_seconds:.3f} s = "
          f"{result.decode_tokens_per_second:.2f} t/s "
          f"({'CUDA graph' if engine.uses_cuda_graph else 'eager'} decode, attn {engine.settings.attn_backend})",
          file=sys.stderr)
    return 0
