"""``glmtg perplexity``: llama-perplexity's method, and its KL-divergence mode.

Perplexity: tokenize the text, cut it into chunks of n_ctx tokens, evaluate each chunk from an empty
cache and score only the second half of each chunk (positions n_ctx/2 .. n_ctx-2 predict the next
token, so every scored token sees at least n_ctx/2 tokens of context). PPL = exp(mean NLL); its
error is llama.cpp's delta-method one: PPL * sqrt(var(NLL) / (N - 1)). No BOS token is inserted
(GLM's tokenizer adds none).

KL divergence: ``--kl-divergence-base FILE`` (without ``--kl-divergence``) saves, for every scored
token, the base run's top-K log-probabilities and their token ids (K = 32 by default) plus the log-prob
of the true next token, and the tokens themselves, in a safetensors file. ``--kl-divergence`` then
compares this run with it: the distributions are compared over the base's K tokens plus one bucket
holding all the other tokens (mass 1 - sum of the K), i.e. KL(P_base || Q) with the tail merged.
Merging can only lower KL (it is a coarser partition), so this is a lower bound of the full-vocabulary
KLD; with K = 32 the tail rarely holds much mass. A run compared with its own base file gives 0.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmtg.cli import common
from glmtg.engine import Engine

BASE_FORMAT = "glmtg-kld-base/1"
DEFAULT_TOP_K = 32


# ---------------------------------------------------------------- statistics

def perplexity_estimate(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its standard error) from per-token NLLs, as llama-perplexity's final estimate."""
    nll = np.asarray(nll, dtype=np.float64)
    n = nll.size
    if n == 0:
        raise ValueError("no scored tokens")
    mean = nll.mean()
    ppl = math.exp(mean)
    var = (nll * nll).mean() - mean * mean
    err = ppl * math.sqrt(var / (n - 1)) if n > 1 and var > 0 else float("nan")
    return ppl, err


def tail_log_mass(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(top_logp)) per row in float64; -inf when the top-K hold all the mass."""
    mass = torch.exp(top_logp.double()).sum(-1)
    return torch.log(torch.clamp(1.0 - mass, min=0.0))


def kld_and_top1(base_ids: torch.Tensor, base_logp: torch.Tensor, logp: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(P_base || Q) over the base's top-K tokens + the merged tail, and top-1 agreement.

    base_ids int [N, K] (descending base probability), base_logp float [N, K]; logp: this run's
    log-probabilities [N, V]. Returns float64 [N] and bool [N].
    """
    p_top = base_logp.double()
    q_top = logp.gather(1, base_ids.long()).double()
    p_tail, q_tail = tail_log_mass(p_top), tail_log_mass(q_top)
    kld = (p_top.exp() * (p_top - q_top)).sum(-1)
    # The tail term: p log p/q with 0 log 0 = 0; a tail that Q leaves empty while P does not would be
    # infinite, so Q's tail is floored at the smallest mass fp64 can hold (fp rounding makes such ties).
    q_tail = torch.clamp(q_tail, min=math.log(1e-300))
    kld = kld + torch.where(torch.isfinite(p_tail), p_tail.exp() * (p_tail - q_tail), torch.zeros_like(kld))
    # "same top token": the base's top token is also a most likely token here (exact ties count as
    # agreement; bf16 logits tie often enough that argmax's tie-break would add noise)
    same_top = logp.gather(1, base_ids[:, :1].long()).squeeze(1) == logp.max(-1).values
    return kld, same_top


def kld_summary(kld: np.ndarray, same_top: np.ndarray) -> dict[str, float]:
    kld = np.asarray(kld, dtype=np.float64)
    n = kld.size
    p = float(np.mean(same_top))
    out = {
        "mean": float(kld.mean()),
        "mean_err": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "max": float(kld.max()),
        "min": float(kld.min()),
        "same_top_pct": 100.0 * p,
        "same_top_err_pct": 100.0 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan"),
    }
    for q in (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0):
        out[f"p{q:g}"] = float(np.percentile(kld, q))
    return out


# ---------------------------------------------------------------- base file

@dataclass
class KldBase:
    """A base run's logits, top-K compressed (see the module doc)."""

    tokens: np.ndarray  # int32 [n_chunks * n_ctx]
    n_ctx: int
    vocab_size: int
    top_ids: np.ndarray  # int32 [N, K]
    top_logp: np.ndarray  # float32 [N, K]
    target_logp: np.ndarray  # float32 [N], log-prob of the true next token
    model: str = ""

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        save_file({"tokens": self.tokens.astype(np.int32), "top_ids": self.top_ids.astype(np.int32),
                   "top_logp": self.top_logp.astype(np.float32), "target_logp": self.target_logp.astype(np.float32)},
                  str(path), metadata={"format": BASE_FORMAT, "n_ctx": str(self.n_ctx),
                                       "vocab_size": str(self.vocab_size), "model": self.model})

    @classmethod
    def load(cls, path: str | Path) -> KldBase:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"KL-divergence base file not found: {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type on a bad header
            raise ValueError(f"cannot read KL-divergence base file {path}: {e}") from None
        if meta.get("format") != BASE_FORMAT or set(tensors) != {"tokens", "top_ids", "top_logp", "target_logp"}:
            raise ValueError(f"{path} is not a glmtg KL-divergence base file ({BASE_FORMAT})")
        try:
            n_ctx, vocab = int(meta["n_ctx"]), int(meta["vocab_size"])
        except (KeyError, ValueError):
            raise ValueError(f"{path}: bad n_ctx / vocab_size metadata") from None
        base = cls(tensors["tokens"], n_ctx, vocab, tensors["top_ids"], tensors["top_logp"], tensors["target_logp"],
                   meta.get("model", ""))
        n_chunks = base.tokens.size // max(n_ctx, 1)
        rows = n_chunks * scored_per_chunk(n_ctx)
        if (n_ctx < 4 or base.tokens.size % n_ctx or base.top_ids.shape != base.top_logp.shape
                or base.top_ids.ndim != 2 or base.top_ids.shape[0] != rows or base.target_logp.shape != (rows,)):
            raise ValueError(f"{path}: inconsistent shapes (tokens {base.tokens.shape}, top_ids {base.top_ids.shape}, "
                             f"n_ctx {n_ctx})")
        return base


# ---------------------------------------------------------------- evaluation

def scored_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


@dataclass
class PerplexityResult:
    nll: np.ndarray  # float64 [N], per scored token
    running_ppl: list[float]  # after each chunk
    base: KldBase | None = None  # the base this run recorded (save mode)
    kld: np.ndarray | None = None  # compare mode
    same_top: np.ndarray | None = None
    base_nll: np.ndarray | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate(
    engine: Engine,
    tokens: list[int] | np.ndarray,
    n_ctx: int,
    *,
    n_chunks: int | None = None,
    save_top_k: int | None = None,
    base: KldBase | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
    model_name: str = "",
) -> PerplexityResult:
    """Perplexity of ``tokens`` in chunks of ``n_ctx``; optionally record (``save_top_k``) or compare
    with (``base``) a KL-divergence base. ``on_chunk(i, running_ppl)`` after each chunk."""
    if n_ctx < 4:
        raise ValueError(f"-c must be >= 4 for perplexity, got {n_ctx}")
    if engine.ctx_size < n_ctx:
        raise ValueError(f"the engine's context ({engine.ctx_size}) is shorter than -c {n_ctx}")
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of {n_ctx} "
                         f"(the text has {tokens.size})")
    available = tokens.size // n_ctx
    n_chunks = available if n_chunks is None else min(n_chunks, available)
    vocab = engine.config.vocab_size
    if tokens.max() >= vocab or tokens.min() < 0:
        raise ValueError(f"token ids must be in [0, {vocab})")
    first = n_ctx // 2
    per_chunk = scored_per_chunk(n_ctx)
    if base is not None:
        if base.vocab_size != vocab:
            raise ValueError(f"the base file was made with vocabulary {base.vocab_size}, this model has {vocab}")
        if base.n_ctx != n_ctx:
            raise ValueError(f"the base file was made with -c {base.n_ctx}, this run uses -c {n_ctx}")
        if base.top_ids.shape[0] < n_chunks * per_chunk:
            raise ValueError(f"the base file holds {base.top_ids.shape[0] // per_chunk} chunks, fewer than {n_chunks}")

    nll: list[np.ndarray] = []
    klds: list[np.ndarray] = []
    same: list[np.ndarray] = []
    tops: list[tuple[np.ndarray, np.ndarray]] = []
    running: list[float] = []
    total = 0.0
    count = 0
    t0 = time.perf_counter()
    for c in range(n_chunks):
        chunk = torch.from_numpy(tokens[c * n_ctx:(c + 1) * n_ctx]).to(engine.device)
        row0 = c * per_chunk  # this chunk's first row in the base arrays

        def score(start: int, logits: torch.Tensor, chunk: torch.Tensor = chunk, row0: int = row0) -> None:
            lo, hi = max(start, first), min(start + logits.shape[1], n_ctx - 1)
            if lo >= hi:
                return
            logp = torch.log_softmax(logits[0, lo - start:hi - start].float(), dim=-1)  # [n, V]
            target = logp.gather(1, chunk[lo + 1:hi + 1, None]).squeeze(1)
            nll.append((-target).double().cpu().numpy())
            if save_top_k:
                values, ids = logp.topk(save_top_k, dim=-1)
                tops.append((ids.int().cpu().numpy(), values.cpu().numpy()))
            if base is not None:
                r0, r1 = row0 + lo - first, row0 + hi - first
                ids = torch.from_numpy(base.top_ids[r0:r1]).to(engine.device)
                values = torch.from_numpy(base.top_logp[r0:r1]).to(engine.device)
                k, s = kld_and_top1(ids, values, logp)
                klds.append(k.cpu().numpy())
                same.append(s.cpu().numpy())

        parts_before = len(nll)
        engine.reset()
        engine.prefill(chunk, on_logits=score, progress=False)
        chunk_nll = np.concatenate(nll[parts_before:])
        total += float(chunk_nll.sum())
        count += chunk_nll.size
        running.append(math.exp(total / count))
        if on_chunk is not None:
            on_chunk(c + 1, running[-1])
    engine.reset()

    all_nll = np.concatenate(nll)
    result = PerplexityResult(nll=all_nll, running_ppl=running, seconds=time.perf_counter() - t0)
    if save_top_k:
        result.base = KldBase(tokens=tokens[:n_chunks * n_ctx].astype(np.int32), n_ctx=n_ctx, vocab_size=vocab,
                              top_ids=np.concatenate([t[0] for t in tops]),
                              top_logp=np.concatenate([t[1] for t in tops]),
                              target_logp=(-all_nll).astype(np.float32), model=model_name)
    if base is not None:
        result.kld = np.concatenate(klds)
        result.same_top = np.concatenate(same)
        result.base_nll = -base.target_logp[:n_chunks * per_chunk].astype(np.float64)
    return result


# ---------------------------------------------------------------- CLI

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
    if args.kl_divergence_base is not None and not compare:
        out_dir = Path(args.kl_divergence_base).resolve().parent
        if not out_dir.is_dir():
            raise FileNotFoundError(f"directory for the base file does not exist: {out_dir}")
    text = None
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        text = path.read_text(encoding="utf-8", errors="replace")
    n_ctx = args.ctx_size or (base.n_ctx if base is not None else 512)

    loaded = common.load(args, need_tokenizer=text is not None)
    engine = common.build_engine(args, loaded, ctx_size=n_ctx)
    common.print_banner(engine)
    if text is not None:
        tokens = loaded.tokenizer.encode(text)
        if base is not None and (len(tokens) < base.tokens.size
                                 or not np.array_equal(np.asarray(tokens[:base.tokens.size]), base.tokens)):
            raise ValueError("the text tokenizes differently from the base file's tokens "
                             "(different text or tokenizer); omit -f to use the base file's tokens")
        if isinstance(loaded.tokenizer, common.ByteTokenizer):
            print("perplexity: random weights have no tokenizer: one token per UTF-8 byte")
    else:
        tokens = base.tokens.tolist()
    if base is not None:
        tokens = tokens[:base.tokens.size]
    n_chunks_all = len(tokens) // n_ctx
    n_chunks = min(args.chunks or n_chunks_all, n_chunks_all)
    source = "tokenized the text" if text is not None else "tokens of the base file"
    print(f"perplexity: {source}: {len(tokens)} tokens; calculating perplexity over {n_chunks} chunks, "
          f"n_ctx={n_ctx}, batch_size={engine.ubatch}, attn={engine.attn_backend}, ctk={engine.settings.k_format}, "
          f"ctv={engine.settings.v_format}")

    def show(i: int, ppl: float) -> None:
        print(f"[{i}]{ppl:.4f},", end="", flush=True)

    result = evaluate(engine, tokens, n_ctx, n_chunks=args.chunks, base=base,
                      save_top_k=args.kl_top_k if (args.kl_divergence_base and not compare) else None,
                      on_chunk=show, model_name=loaded.name)
    print()
    ppl, err = perplexity_estimate(result.nll)
    print(f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    print(f"perplexity: {result.nll.size} tokens scored in {result.seconds:.2f} s")
    if result.base is not None:
        result.base.save(args.kl_divergence_base)
        print(f"saved the KL-divergence base (top {args.kl_top_k} log-probs per token) to {args.kl_divergence_base}")
    if compare:
        print()
        _print_kld(result)
    return 0
