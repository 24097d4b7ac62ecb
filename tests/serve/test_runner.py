"""ModelRunner: paged, chunked, batched runs equal each prompt run alone; seeded draws ignore the row; bad
batches raise before anything is written.

The tiny preset in float32 on CPU, K/V stored as f16 in both the runner and the reference.
Tolerance (logits, absolute 1e-3): the runner and the reference compute the same float32 math in other
shapes (paged against contiguous, batched decode rows against one), so K/V may round to a
neighbouring f16 value; measured, that moved the logits (|logits| ~ 0.5) by <= 1e-5, while the smallest
gap between a step's two best tokens was 8e-3, so a read of a wrong page, position or row shows in both the
tokens and the logits. On CUDA the runner and the reference both use the decode kernel (f16 queries for the
float32 model), so the same bound holds.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from glmtg.kv_cache import KVCache
from glmtg.loading.presets import preset_config, random_model
from glmtg.sampling import sample
from glmtg.serve.runner import ModelRunner
from glmtg.serve.sequence import RunnerBatch, SamplingSpec

GREEDY = SamplingSpec(temperature=0.0)
BLOCK, MAX_SEQS, MAX_LEN = 5, 3, 40  # a pool of 3 * 8 = 24 pages of 5 tokens
ATOL = 1e-3  # module docstring


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@functools.cache
def tiny_on(device: str):
    config = preset_config("tiny")
    return config, random_model(config, dtype=torch.float32, device=device)


@pytest.fixture(scope="module")
def tiny():
    return tiny_on("cpu")


def make_runner(tiny) -> ModelRunner:
    config, model = tiny
    return ModelRunner(model, config, block_size=BLOCK, max_num_seqs=MAX_SEQS, max_model_len=MAX_LEN,
                       k_format="f16", device=model.device)


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in lengths]


class Pages:
    """The pool's pages handed out lazily in a scrambled order, as a block manager would."""

    def __init__(self, num_blocks: int) -> None:
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7)).tolist()
        self.tables: dict[int, list[int]] = {}

    def table(self, seq: int, tokens: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * BLOCK < tokens:
            table.append(self.free.pop())
        return list(table)


def reference(tiny, prompt: list[int], steps: int, chunk: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits before each, from the model on a fresh contiguous cache, prompt alone
    (prefilled in the same chunks, so on CUDA both sides take the same attention path for each query)."""
    config, model = tiny
    cache = KVCache(num_layers=config.num_hidden_layers, batch=1, capacity=MAX_LEN, device=model.device,
                    num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, k_format="f16")
    backend = "glmtg" if model.device.type == "cuda" else "sdpa"  # the runner's default
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    pieces = [prompt[i:i + chunk] for i in range(0, len(prompt), chunk)]
    with torch.no_grad():
        while len(tokens) < steps:
            ids = pieces.pop(0) if pieces else tokens[-1:]
            out = model(torch.tensor([ids], device=model.device), cache, attn_backend=backend, last_only=True)
            cache.lengths += len(ids)
            if not pieces:
                logits.append(out[0, -1])
                tokens.append(int(out[0, -1].argmax()))
    return tokens, logits


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_and_batched_decode_equal_each_prompt_alone(device):
    tiny = tiny_on(device)
    runner = make_runner(tiny)
    # with CUDA graphs (on by default on CUDA) the pool has a page per sequence more, one of them the padding
    # rows' scratch page
    assert runner.num_blocks == (3 * 9 - 1 if runner.graphs is not None else 24)
    assert runner.block_size == BLOCK and runner.max_model_len == MAX_LEN
    texts = prompts([7, 19, 12], seed=1)
    new_tokens, chunk = 8, 7
    pages = Pages(runner.num_blocks)
    done = [0] * len(texts)  # prompt tokens prefilled
    out: list[list[int]] = [[] for _ in texts]
    out_logits: list[list[torch.Tensor]] = [[] for _ in texts]
    widest = 0

    def step(batch: RunnerBatch, seqs: list[int]) -> None:
        expected = runner.logits(batch) if any(batch.sample) else None  # rewrites the same K/V: harmless
        got = runner.run(batch)
        for row, seq in enumerate(seqs):
            if batch.sample[row]:
                out[seq].append(got[row])
                out_logits[seq].append(expected[row])
            else:
                assert got[row] is None

    # The scheduler's pattern: one prefill chunk, then a decode step of every sequence past its prefill.
    while any(len(o) < new_tokens for o in out):
        pending = [s for s, text in enumerate(texts) if done[s] < len(text)]
        if pending:
            s = pending[0]
            ids = texts[s][done[s]:done[s] + chunk]
            last = done[s] + len(ids) == len(texts[s])
            step(RunnerBatch([ids], [done[s]], [pages.table(s, done[s] + len(ids))], [last], [GREEDY], [0]), [s])
            done[s] += len(ids)
        decoding = [s for s in range(len(texts)) if out[s] and len(out[s]) < new_tokens and done[s] == len(texts[s])]
        if decoding:
            starts = [len(texts[s]) + len(out[s]) - 1 for s in decoding]
            step(RunnerBatch([[out[s][-1]] for s in decoding], starts,
                             [pages.table(s, n + 1) for s, n in zip(decoding, starts)],
                             [True] * len(decoding), [GREEDY] * len(decoding), [len(out[s]) for s in decoding]),
                 decoding)
            widest = max(widest, len(decoding))
    assert widest == 3  # rows of different lengths did share a decode forward

    for s, text in enumerate(texts):
        want_tokens, want_logits = reference(tiny, text, new_tokens, chunk)
        assert out[s] == want_tokens, f"prompt {s}"
        torch.testing.assert_close(torch.stack(out_logits[s]), torch.stack(want_logits), rtol=0, atol=ATOL)


def prefill(runner: ModelRunner, pages: Pages, texts: list[list[int]]) -> None:
    for s, text in enumerate(texts):
        runner.run(RunnerBatch([text], [0], [pages.table(s, len(text) + 1)], [False], [GREEDY], [0]))


def test_seeded_draws_do_not_depend_on_the_row(tiny):
    runner = make_runner(tiny)
    pages = Pages(runner.num_blocks)
    texts = prompts([4, 9, 6], seed=2)
    prefill(runner, pages, texts)
    hot = SamplingSpec(temperature=1.5, seed=2**62 + 12345)  # top-k off: a draw over the whole vocabulary
    other_seed = dataclasses.replace(hot, seed=99)
    specs = [hot, GREEDY, SamplingSpec(temperature=0.7, top_k=3, top_p=0.9, min_p=0.01, seed=5)]
    last = [t[-1] for t in texts]

    def decode(order: list[int], spec_of: list[SamplingSpec], step: int) -> dict[int, int]:
        # Every row decodes its prompt's last token again at the same position: rewrites the same K/V.
        batch = RunnerBatch([[last[s]] for s in order], [len(texts[s]) - 1 for s in order],
                            [pages.tables[s] for s in order], [True] * len(order),
                            [spec_of[s] for s in order], [step] * len(order))
        return dict(zip(order, runner.run(batch)))

    drawn, drawn_other = [], []
    alone = runner.logits(RunnerBatch([[last[0]]], [len(texts[0]) - 1], [pages.tables[0]], [True], [hot], [0]))
    for step in range(4):
        first, third = decode([0, 1, 2], specs, step), decode([2, 1, 0], specs, step)
        assert first == third, f"step {step}"
        expect = sample(alone, torch.tensor([1.5]), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]),
                        torch.tensor([hot.seed]), torch.tensor([step]), alone.shape[-1])
        assert first[0] == int(expect[0])  # the request's (seed, step) draw, as if alone
        drawn.append(first[0])
        drawn_other.append(decode([1, 0], [other_seed, GREEDY, specs[2]], step)[0])
    greedy_row = runner.logits(RunnerBatch([[last[1]]], [len(texts[1]) - 1], [pages.tables[1]], [True], [GREEDY], [0]))
    assert first[1] == int(greedy_row.argmax())
    assert len(set(drawn)) > 1 and drawn != drawn_other  # the draw follows the step and the seed
    # A top-k past the vocabulary (or past int64) means "off", as top_k 0 does.
    assert decode([0], [dataclasses.replace(hot, top_k=10**30), GREEDY, GREEDY], 3)[0] == drawn[3]


def bad(**changes) -> RunnerBatch:
    base = dict(token_ids=[[5], [6]], start_positions=[3, 10], block_tables=[[0], [1, 2, 3]], sample=[True, False],
                specs=[GREEDY, GREEDY], steps=[0, 2])
    base.update(changes)
    return RunnerBatch(**base)


@pytest.mark.parametrize("batch, match", [
    (bad(start_positions=[3]), "start_positions has 1 rows"),
    (bad(sample=[True]), "sample has 1 rows"),
    (bad(specs=[GREEDY] * 3), "specs has 3 rows"),
    (RunnerBatch([], [], [], [], [], []), "at least one row"),
    (bad(token_ids=[[5], []]), r"token_ids\[1\]"),
    (bad(token_ids=[[5], [1000]]), r"token_ids\[1\]"),  # the tiny vocabulary is 1000
    (bad(token_ids=[[-1], [6]]), r"token_ids\[0\]"),
    (bad(start_positions=[3, -1]), r"start_positions\[1\]"),
    (bad(start_positions=[3, MAX_LEN], block_tables=[[0], list(range(8))]), "max_model_len"),
    (bad(token_ids=[[5], [6] * 4], start_positions=[3, 37], block_tables=[[0], list(range(8))]), "max_model_len"),
    (bad(block_tables=[[24], [1, 2, 3]]), r"block_tables\[0\]"),  # the pool has pages 0..23
    (bad(block_tables=[[-1], [1, 2, 3]]), r"block_tables\[0\]"),
    (bad(block_tables=[[0], [1, 2]]), "too short"),  # position 10 needs a third page of 5
    (bad(start_positions=[5, 10]), "too short"),
    (bad(block_tables=[[0], list(range(1, 10))]), "more than the 8"),
    (bad(specs=[GREEDY, SamplingSpec(temperature=-1.0)]), r"specs\[1\]"),
    (bad(specs=[GREEDY, SamplingSpec(top_p=1.5)]), r"specs\[1\]"),
    (bad(specs=[GREEDY, SamplingSpec(seed=2**63)]), r"specs\[1\]"),
    (bad(specs=[GREEDY, "greedy"]), r"specs\[1\]"),
    (bad(steps=[0, -1]), r"steps\[1\]"),
    (bad(steps=[0, 2**63]), r"steps\[1\]"),
    (bad(sample=[1, 0]), r"sample\[0\]"),
    ("not a batch", "RunnerBatch"),
])
def test_bad_batches_raise_before_writing(tiny, batch, match):
    runner = make_runner(tiny)
    with pytest.raises(ValueError, match=match):
        runner.run(batch)
    # Nothing reached the pool (it starts zeroed): the checks come before the first write.
    assert not runner.cache.k(0).data.any() and not runner.cache.v(runner.cache.num_layers - 1).data.any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size"),
    (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(max_model_len=-3), "max_model_len"),
    (dict(attn_backend="flash"), "attn_backend"),
    (dict(k_format="q5"), "k_format"),
    (dict(max_num_seqs=1000, max_model_len=10**6), "KV pool"),  # 2 TB of f16 K/V: refused before allocating
])
def test_bad_construction_raises(tiny, kwargs, match):
    config, model = tiny
    args = dict(block_size=BLOCK, max_num_seqs=MAX_SEQS, max_model_len=MAX_LEN, device="cpu") | kwargs
    with pytest.raises(ValueError, match=match):
        ModelRunner(model, config, **args)
