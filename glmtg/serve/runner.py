"""The model runner of ``glmtg serve``: one forward (and the sampling after it) per scheduler batch.

The scheduler (torch-free) decides which sequences run and which KV pages each owns; the runner owns the
device side: one paged KV pool of ``num_blocks`` pages, enough for ``max_num_seqs`` sequences of
``max_model_len`` tokens, so the block manager may give any page to any sequence. Each ``run`` views the
pool through the batch's rows (``KVCache.rows``: lengths = start positions, page tables = block tables,
padded with page 0), runs the model on them, and samples with ``glmtg.sampling.sample`` from per-row
tensors keyed by each request's (seed, step): a request draws the same tokens whatever row or batch it
sits in. Lengths live on the host (the scheduler's start positions), so nothing is advanced on the device
and every batch is checked on the host before anything is written: a bad batch raises ValueError and
never reaches the cache.

On CUDA the one-token rows of a batch (decode rows) run as a replay of a CUDA graph captured at startup
for the smallest batch size that holds them (glmtg.serve.graphs); the pool then has one page per sequence
more, and its last page is kept back from the block manager as the scratch page the padding rows write to.
Longer rows (prefill chunks) and decode batches larger than every captured size run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import warnings

import torch

from glmtg.config import ModelConfig
from glmtg.engine import decode_graph_blocker, kv_cache_bytes
from glmtg.formats import KV_FORMATS
from glmtg.kv_cache import KVCache
from glmtg.layers.attention import BACKENDS
from glmtg.memory import check_fits
from glmtg.sampling import SamplingParams, sample
from glmtg.serve.graphs import DecodeGraphs, graph_sizes as _graph_sizes
from glmtg.serve.sequence import RunnerBatch, SamplingSpec

__all__ = ["ModelRunner"]


_CHECKED_SPECS = 4096  # sampling specs remembered as checked (one per running request is what matters)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints_in(values: Sequence[object], limit: int) -> bool:
    """Every value a plain int in [0, limit). Type test per value, then one min and one max: every decode step
    checks every row's block table, so this is a few microseconds a row rather than a comparison chain each."""
    return not values or (set(map(type, values)) == {int} and min(values) >= 0 and max(values) < limit)


class ModelRunner:
    """Runs ``model`` (glmtg.models.glm4_moe.Glm4MoeForCausalLM) over a paged KV pool for the scheduler.

    ``block_size`` tokens per page; ``k_format``/``v_format`` as KVCache's. ``attn_backend`` defaults to
    the decode kernel ("glmtg") on CUDA, torch SDPA elsewhere. ``cuda_graphs`` (None: on for CUDA) captures
    the decode step for each of ``graph_sizes`` (None: glmtg.serve.graphs.graph_sizes' default, 1, 2, 4 ...
    up to max_num_seqs); a model whose decode cannot be captured (host-placed experts) or a capture that
    fails warns (RuntimeWarning) and runs eagerly. ``graph_replays`` counts the decode forwards replayed.
    """

    def __init__(self, model: torch.nn.Module, config: ModelConfig, *, block_size: int = 16, max_num_seqs: int,
                 max_model_len: int, k_format: str = "bf16", v_format: str | None = None,
                 device: torch.device | str, attn_backend: str | None = None, cuda_graphs: bool | None = None,
                 graph_sizes: Sequence[int] | None = None) -> None:
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_model_len", max_model_len)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        sizes = _graph_sizes(max_num_seqs, graph_sizes)  # checked even when graphs end up off
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device}")
        if attn_backend is None:
            attn_backend = "glmtg" if self.device.type == "cuda" else "sdpa"
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        self.model = model
        self.config = config
        self.attn_backend = attn_backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        blocker = decode_graph_blocker(model) if cuda_graphs else None
        if blocker is not None:
            warnings.warn(blocker, RuntimeWarning, stacklevel=2)
            cuda_graphs = False
        # With graphs, each sequence's share of the pool is one page longer: one page of them all is the
        # padding rows' scratch page, so the block manager still has max_num_seqs full sequences' pages.
        capacity = max_model_len + (block_size if cuda_graphs else 0)
        pages = max_num_seqs * -(-capacity // block_size)
        v_fmt = k_format if v_format is None else v_format
        if k_format in KV_FORMATS and v_fmt in KV_FORMATS:  # else KVCache names the bad one
            # refused with a readable error (GB needed vs available) rather than an allocation failure
            check_fits(f"the KV pool for {max_num_seqs} sequences of max_model_len {max_model_len} "
                       f"(k_format {k_format}, v_format {v_fmt})",
                       kv_cache_bytes(config, pages * block_size, 1, k_format, v_fmt), self.device,
                       "lower max_model_len or the number of parallel sequences, or use a smaller cache format")
        # batch * ceil(capacity / page_size) pages: the pool KVCache allocates for max_num_seqs full sequences.
        # Its own page table and lengths are never used; every forward brings its rows' (``rows``).
        self.cache = KVCache(num_layers=config.num_hidden_layers, batch=max_num_seqs, capacity=capacity,
                             num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                             k_format=k_format, v_format=v_format, page_size=block_size, device=self.device)
        self.num_blocks = self.cache.num_pages
        self.max_pages = self.cache.max_pages
        self._checked_specs: set[tuple] = set()
        self._spec_columns: dict[tuple, dict[str, torch.Tensor]] = {}  # sampling columns per batch of specs
        # Called with every batch once it passed the host checks, before its forward: under -sm, rank 0 sends
        # the step to the follower ranks there (glmtg.serve.split); None in one process.
        self.before_forward: Callable[[RunnerBatch], None] | None = None
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            self._capture(sizes)

    def _capture(self, sizes: tuple[int, ...]) -> None:
        """Capture the decode graphs, the pool's last page as the scratch page; a failure warns and stays eager."""
        scratch = self.cache.num_pages - 1
        graphs = DecodeGraphs(self.model, self.cache, sizes, scratch, self.attn_backend)
        try:
            graphs.capture()
        except Exception as e:  # noqa: BLE001 - any capture failure: warn, then decode eagerly
            torch.cuda.synchronize(self.device)
            warnings.warn(f"CUDA graph capture of the serve decode step failed ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}); decoding eagerly", RuntimeWarning, stacklevel=3)
            return
        self.graphs = graphs
        self.num_blocks = scratch  # pages [0, scratch) go to the block manager; the scratch page never does

    @property
    def graph_replays(self) -> int:
        """Decode forwards run by graph replay so far (0 when graphs are off)."""
        return 0 if self.graphs is None else self.graphs.replays

    # ---------------------------------------------------------------- checks

    def _check(self, batch: RunnerBatch) -> None:
        """ValueError naming the field for anything that would write outside a row's pages or the pool."""
        if not isinstance(batch, RunnerBatch):
            raise ValueError(f"batch must be a RunnerBatch, got {type(batch).__name__}")
        rows = len(batch.token_ids)
        if rows < 1:
            raise ValueError("token_ids must hold at least one row")
        for name in ("start_positions", "block_tables", "sample", "specs", "steps"):
            if len(getattr(batch, name)) != rows:
                raise ValueError(f"{name} has {len(getattr(batch, name))} rows but token_ids has {rows}")
        vocab = self.config.vocab_size
        for i in range(rows):
            tokens, start, table = batch.token_ids[i], batch.start_positions[i], batch.block_tables[i]
            if len(tokens) < 1 or not _ints_in(tokens, vocab):
                raise ValueError(f"token_ids[{i}] must be a non-empty list of ints in [0, {vocab}), got {tokens!r}")
            if not _is_int(start) or start < 0:
                raise ValueError(f"start_positions[{i}] must be an int >= 0, got {start!r}")
            end = start + len(tokens)
            if end > self.max_model_len:
                raise ValueError(f"start_positions[{i}] {start} + {len(tokens)} tokens exceeds max_model_len "
                                 f"{self.max_model_len}")
            if not _ints_in(table, self.num_blocks):
                raise ValueError(f"block_tables[{i}] must hold block ids in [0, {self.num_blocks}), got {table!r}")
            if len(table) * self.block_size < end:
                raise ValueError(f"block_tables[{i}] has {len(table)} blocks of {self.block_size}: too short for "
                                 f"positions up to {end}")
            if len(table) > self.max_pages:
                raise ValueError(f"block_tables[{i}] has {len(table)} blocks, more than the {self.max_pages} "
                                 f"of a max_model_len sequence")
            if not isinstance(batch.sample[i], bool):
                raise ValueError(f"sample[{i}] must be a bool, got {batch.sample[i]!r}")
            if not _is_int(batch.steps[i]) or not 0 <= batch.steps[i] < 2**63:
                raise ValueError(f"steps[{i}] must be an int in [0, 2**63), got {batch.steps[i]!r}")
            spec = batch.specs[i]
            if not isinstance(spec, SamplingSpec):
                raise ValueError(f"specs[{i}] must be a SamplingSpec, got {type(spec).__name__}")
            # A request's spec comes every step: checked once (the key has the field types, so True never
            # passes as an already checked 1).
            key = (spec, type(spec.temperature), type(spec.top_k), type(spec.top_p), type(spec.min_p),
                   type(spec.seed))
            if key in self._checked_specs:
                continue
            try:  # the sampler's own range checks; the seed must be concrete here
                SamplingParams(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                               min_p=spec.min_p, seed=spec.seed)
            except (ValueError, TypeError) as e:
                raise ValueError(f"specs[{i}]: {e}") from None
            if not _is_int(spec.seed):
                raise ValueError(f"specs[{i}].seed must be an int, got {spec.seed!r}")
            if len(self._checked_specs) >= _CHECKED_SPECS:
                self._checked_specs.clear()
            self._checked_specs.add(key)

    # ---------------------------------------------------------------- forward and sampling

    @torch.no_grad()
    def logits(self, batch: RunnerBatch) -> torch.Tensor:
        """Write every row's tokens into its pages; fp32 logits [rows, vocab] after each row's last token.

        Rows with the same token count run as one forward ([B, 1] for decode rows, [1, S] for a prefill
        chunk), so a batch costs one forward per distinct chunk length.
        """
        self._check(batch)
        if self.before_forward is not None:
            self.before_forward(batch)
        return self.forward_rows(batch.token_ids, batch.start_positions, batch.block_tables)

    @torch.no_grad()
    def forward_rows(self, token_ids: Sequence[Sequence[int]], starts: Sequence[int],
                     tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """``logits`` without the checks (rows that passed them, e.g. on rank 0 of a split server): the same
        forwards in the same order for the same rows, whichever rank runs them."""
        groups: dict[int, list[int]] = {}
        for i, tokens in enumerate(token_ids):
            groups.setdefault(len(tokens), []).append(i)
        out = None
        for width, members in groups.items():
            got = None
            if width == 1 and self.graphs is not None:
                got = self.graphs.run([token_ids[i][0] for i in members], [starts[i] for i in members],
                                      [tables[i] for i in members])
                if got is not None and len(groups) == 1:
                    return got.clone()  # every row, in order; a copy, as the graph's output is reused
            if got is None:
                ids = torch.tensor([token_ids[i] for i in members], dtype=torch.long).to(self.device)
                lengths = torch.tensor([starts[i] for i in members], dtype=torch.int32)
                table = torch.zeros(len(members), self.max_pages, dtype=torch.int32)  # page 0 pads: never read
                for r, i in enumerate(members):
                    blocks = tables[i]
                    table[r, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
                view = self.cache.rows(lengths.to(self.device), table.to(self.device))
                # Positions and pages were checked on the host (``logits``, on rank 0 under -sm): the model need
                # not read lengths back.
                got = self.model(ids, view, attn_backend=self.attn_backend, last_only=True, validate=False)[:, -1]
                if len(groups) == 1:
                    return got  # every row, in order: the forward's own output
            if out is None:  # rows of several chunk lengths: scattered into one [rows, vocab]
                out = torch.empty(len(token_ids), self.config.vocab_size, dtype=torch.float32, device=self.device)
            out[torch.tensor(members, device=self.device)] = got
        return out

    def run(self, batch: RunnerBatch) -> list[int | None]:
        """One forward of ``batch``; the sampled next token of each row with ``sample`` True, else None."""
        logits = self.logits(batch)
        chosen = [i for i, s in enumerate(batch.sample) if s]
        if not chosen:
            return [None] * len(batch.sample)
        rows = logits if len(chosen) == len(batch.sample) else logits[chosen]  # all rows: no gather
        tokens = self._sample(rows, [batch.specs[i] for i in chosen], [batch.steps[i] for i in chosen])
        result: list[int | None] = [None] * len(batch.sample)
        for i, token in zip(chosen, tokens):
            result[i] = token
        return result

    @torch.no_grad()
    def _sample(self, logits: torch.Tensor, specs: Sequence[SamplingSpec], steps: Sequence[int]) -> list[int]:
        """glmtg.sampling.sample with one row of parameters per spec; the draw depends only on (seed, step)."""
        vocab = logits.shape[-1]
        candidates = _num_candidates(specs, vocab)
        if candidates is None:  # every row greedy: no parameters to send
            return logits.argmax(dim=-1).tolist()

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device)

        # A decode batch sends the same specs step after step: their columns are made once (a host-to-device
        # copy each) and reused; only the steps change.
        key = tuple(specs)
        static = self._spec_columns.get(key)
        if static is None:
            if len(self._spec_columns) >= _CHECKED_SPECS:
                self._spec_columns.clear()
            static = self._spec_columns[key] = dict(
                temperature=column([float(s.temperature) for s in specs], torch.float32),
                top_k=column([_top_k(s, vocab) for s in specs], torch.int64),
                top_p=column([float(s.top_p) for s in specs], torch.float32),
                min_p=column([float(s.min_p) for s in specs], torch.float32),
                seed=column([s.seed for s in specs], torch.int64))
        tokens = sample(logits, **static, step=column(list(steps), torch.int64), num_candidates=candidates)
        return tokens.tolist()


def _num_candidates(specs: Sequence[SamplingSpec], vocab: int) -> int | None:
    """What ``sample`` needs to cover every row: None when all are greedy, the full vocabulary when a
    sampled row has top-k off, else the largest top-k. A row's draw does not depend on it (candidates past
    its own top-k are filtered out), so a request's tokens do not depend on its batch mates."""
    live = [s for s in specs if s.temperature > 0]
    if not live:
        return None
    if any(_top_k(s, vocab) == 0 for s in live):
        return vocab
    return max(_top_k(s, vocab) for s in live)


def _top_k(spec: SamplingSpec, vocab: int) -> int:
    """top-k in [0, vocab], 0 = off: any top-k the API lets through fits an int64 and means the same."""
    return max(0, min(spec.top_k, vocab))

