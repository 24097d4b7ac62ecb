"""``glmtg perplexity``: llama-perplexity's output for ``glmtg.eval.perplexity``, and its KL-divergence mode.

``--kl-divergence-base FILE`` (without ``--kl-divergence``) saves the base run's top-K log-probabilities
(see ``glmtg.eval.kld``); ``--kl-divergence`` then compares this run with it and prints llama.cpp's
KLD statistics.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from glmtg.cli import common, ranks
from glmtg.eval.kld import DEFAULT_TOP_K, KldBase, kld_summary
from glmtg.eval.perplexity import PerplexityResult, evaluate, perplexity_estimate
from glmtg.loading.byte_tokenizer import ByteTokenizer


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "perplexity", help="perplexity of a text, and KL divergence against a base run (llama-perplexity)",
        description="Chunks of -c tokens, each from an empty cache, second half scored; prints [chunk]PPL as it "
                    "goes and 'Final estimate: PPL = X +/- Y'. KL-divergence: first run with "
                    "--kl-divergence-base FILE to save the base logits (top-K compressed), then run the model to "
                    "compare with --kl-divergence --kl-divergence-base FILE (-f may then be omitted).")
    common.add_model_flags(p, ctx_default=None, ctx_help="tokens per chunk (default: 512, or the base file's)")
    p.add_argument("-f", "--file", metavar="TEXT", default=None, help="text file to evaluate")
    p.add_argument("--chunks", type=common.positive_int, default=None, metavar="N",
                   help="evaluate at most N chunks (default: all)")
    p.add_argument("--kl-divergence-base", metavar="FILE", default=None,
                   help="base logits file: written by a plain run, read with --kl-divergence")
    p.add_argument("--kl-divergence", action="store_true", help="compare this run with --kl-divergence-base FILE")
    p.add_argument("--kl-top-k", type=common.positive_int, default=DEFAULT_TOP_K, metavar="K",
                   help="log-probs kept per token in a base file")
    p.set_defaults(run=run)


def _print_kld(result: PerplexityResult) -> None:
    ppl_q, err_q = perplexity_estimate(result.nll)
    ppl_b, err_b = perplexity_estimate(result.base_nll)
    diff = result.nll - result.base_nll
    ratio = float(diff.mean())
    ratio_err = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan")
    s = kld_summary(result.kld, result.same_top)
    print("====== Perplexity statistics ======")
    print(f"Mean PPL(Q)                   : {ppl_q:10.6f} ± {err_q:10.6f}")
    print(f"Mean PPL(base)                : {ppl_b:10.6f} ± {err_b:10.6f}")
    print(f"Mean ln(PPL(Q)/PPL(base))     : {ratio:10.6f} ± {ratio_err:10.6f}")
    print()
    print("====== KL divergence statistics ======")
    print(f"Mean    KLD: {s['mean']:10.6f} ± {s['mean_err']:10.6f}")
    print(f"Maximum KLD: {s['max']:10.6f}")
    for q, label in ((99.9, "99.9%  "), (99.0, "99.0%  "), (95.0, "95.0%  "), (90.0, "90.0%  "), (50.0, "Median "),
                     (10.0, "10.0%  "), (5.0, " 5.0%  "), (1.0, " 1.0%  ")):
        print(f"{label} KLD: {s[f'p{q:g}']:10.6f}")
    print(f"Minimum KLD: {s['min']:10.6f}")
    print()
    print("====== Token probability statistics ======")
    print(f"Same top p: {s['same_top_pct']:6.3f} ± {s['same_top_err_pct']:5.3f} %")


def run(args: argparse.Namespace) -> int:
    compare = args.kl_divergence
    if compare and args.kl_divergence_base is None:
        raise ValueError("--kl-divergence needs --kl-divergence-base FILE (the base run's logits)")
    base = KldBase.load(args.kl_divergence_base) if compare else None
    if base is None and args.file is None:
        raise ValueError("-f TEXT is required (the text to evaluate)")
    saving = args.kl_divergence_base is not None and not compare
    if saving:
        common.check_output_file(args.kl_divergence_base, "--kl-divergence-base")
    text = common.read_text_file(args.file, "text file") if args.file is not None else None
    n_ctx = args.ctx_size or (base.n_ctx if base is not None else 512)
    if n_ctx < 4:
        raise ValueError(f"-c must be >= 4 for perplexity, got {n_ctx}")

    # every check the config allows, before the weights are loaded
    source = common.model_source(args)
    vocab = source.config.vocab_size
    if saving and args.kl_top_k > vocab:
        raise ValueError(f"--kl-top-k {args.kl_top_k} exceeds the vocabulary of {source.name} ({vocab} tokens)")
    if base is not None and base.vocab_size != vocab:
        raise ValueError(f"the base file was made with vocabulary {base.vocab_size}, {source.name} has {vocab}")
    if base is not None and args.ctx_size is not None and base.n_ctx != n_ctx:
        raise ValueError(f"the base file was made with -c {base.n_ctx}, this run uses -c {n_ctx}")

    # tokens counted and compared with the base before any weight is loaded
    tokenizer = common.load_tokenizer(source) if text is not None else None
    if text is not None:
        tokens = tokenizer.encode(text)
        if base is not None and (len(tokens) < base.tokens.size
                                 or not np.array_equal(np.asarray(tokens[:base.tokens.size]), base.tokens)):
            raise ValueError("the text tokenizes differently from the base file's tokens "
                             "(different text or tokenizer); omit -f to use the base file's tokens")
    else:
        tokens = base.tokens.tolist()
    if base is not None:
        tokens = tokens[:base.tokens.size]
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with -c {n_ctx} "
                         f"(the text has {len(tokens)})")
    if max(tokens) >= vocab or min(tokens) < 0:
        raise ValueError(f"the tokenizer gives ids outside the model's vocabulary [0, {vocab}): "
                         f"tokenizer.json does not belong to this model")

    loaded = common.load(args, source, ctx_size=n_ctx, tokenizer=tokenizer)
    common.print_banner(loaded)
    if isinstance(tokenizer, ByteTokenizer):
        print("perplexity: random weights have no tokenizer: one token per UTF-8 byte")
    engine = common.build_engine(args, loaded, ctx_size=n_ctx)
    n_chunks_all = len(tokens) // n_ctx
    n_chunks = min(args.chunks or n_chunks_all, n_chunks_all)
    source_text = "tokenized the text" if text is not None else "tokens of the base file"
    print(f"perplexity: {source_text}: {len(tokens)} tokens; calculating perplexity over {n_chunks} chunks, "
          f"n_ctx={n_ctx}, batch_size={engine.settings.ubatch}, attn={engine.settings.attn_backend}, ctk={engine.settings.k_format}, "
          f"ctv={engine.settings.v_format}")

    def show(i: int, ppl: float) -> None:
        print(f"[{i}]{ppl:.4f},", end="", flush=True)

    result = evaluate(engine, tokens, n_ctx, n_chunks=args.chunks, base=base,
                      save_top_k=args.kl_top_k if saving else None, on_chunk=show, model_name=loaded.name)
    print()
    ppl, err = perplexity_estimate(result.nll)
    print(f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    print(f"perplexity: {result.nll.size} tokens scored in {result.seconds:.2f} s")
    if result.non_finite:
        # NaN/inf logits: a perplexity of nan is no measurement, so the run fails (and writes no base file)
        raise ValueError(f"{result.non_finite} of {result.nll.size} scored tokens have non-finite log-probabilities "
                         f"(the model produced NaN/inf logits): the perplexity is meaningless")
    if result.base is not None and ranks.writes_files(args):
        result.base.save(args.kl_divergence_base)
        print(f"saved the KL-divergence base (top {args.kl_top_k} log-probs per token) to {args.kl_divergence_base}")
    if compare:
        print()
        _print_kld(result)
    return 0
