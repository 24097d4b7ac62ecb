"""The parts of the serve runner's CUDA-graph decode that run without CUDA: the sizes captured, the bucket a
batch replays in, the padded inputs, the static buffers, and the captured step itself run eagerly over them.

The tiny preset in float32 on CPU, K/V f16. The step over padded buffers is compared with the runner's eager
forward of the same rows at absolute 1e-3 on the logits: the same float32 math in another batch shape (K/V
may round to a neighbouring f16 value; tests/serve/test_runner.py measured <= 1e-5 for that) while a wrong
row, page or position moves them by far more than that (|logits| ~ 0.5).
"""

from __future__ import annotations

import functools

import pytest
import torch

from glmtg.loading.presets import preset_config, random_model
from glmtg.serve.graphs import DEFAULT_GRAPH_SIZES, DecodeBuffers, DecodeGraphs, bucket_for, decode_inputs, graph_sizes
from glmtg.serve.runner import ModelRunner
from glmtg.serve.sequence import RunnerBatch, SamplingSpec

GREEDY = SamplingSpec(temperature=0.0)
BLOCK, MAX_SEQS, MAX_LEN = 5, 3, 40  # a pool of 3 * 8 = 24 pages of 5 tokens; page 23 is the scratch page
SCRATCH = 23
ATOL = 1e-3  # module docstring


@functools.cache
def tiny():
    config = preset_config("tiny")
    return config, random_model(config, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("max_num_seqs, want", [
    (1, (1,)), (2, (1, 2)), (5, (1, 2, 4, 5)), (12, (1, 2, 4, 8, 12)), (64, DEFAULT_GRAPH_SIZES),
    (100, DEFAULT_GRAPH_SIZES + (100,)),
])
def test_default_sizes_cover_every_batch_up_to_max_num_seqs(max_num_seqs, want):
    assert graph_sizes(max_num_seqs) == want


def test_given_sizes_are_sorted_deduplicated_and_capped():
    assert graph_sizes(16, [8, 3, 8, 40, 1]) == (1, 3, 8)


@pytest.mark.parametrize("max_num_seqs, sizes, match", [
    (8, [0, 2], "graph_sizes"), (8, [2.0], "graph_sizes"), (8, [True], "graph_sizes"), (8, "12", "graph_sizes"),
    (4, [8, 16], "no size <= max_num_seqs 4"), (0, None, "max_num_seqs"),
])
def test_bad_sizes_name_the_argument(max_num_seqs, sizes, match):
    with pytest.raises(ValueError, match=match):
        graph_sizes(max_num_seqs, sizes)


def test_bucket_is_the_smallest_size_that_holds_the_batch():
    sizes = (1, 2, 4, 8, 12)
    got = {rows: bucket_for(rows, sizes) for rows in range(1, 14)}
    assert got == {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8, 9: 12, 10: 12, 11: 12, 12: 12, 13: None}


def test_padded_inputs_keep_real_rows_and_point_padding_at_the_scratch_page():
    ids, lengths, table = decode_inputs([11, 22, 33], [7, 0, 12], [[4, 9], [3], [5, 6, 1]], size=5, max_pages=4,
                                        scratch_page=SCRATCH)
    assert ids.dtype == torch.long and lengths.dtype == torch.int32 and table.dtype == torch.int32
    assert ids.tolist() == [11, 22, 33, 0, 0]
    assert lengths.tolist() == [7, 0, 12, 0, 0]  # padding: one token at position 0 of the scratch page
    assert table.tolist() == [[4, 9, SCRATCH, SCRATCH], [3, SCRATCH, SCRATCH, SCRATCH], [5, 6, 1, SCRATCH],
                              [SCRATCH] * 4, [SCRATCH] * 4]


@pytest.mark.parametrize("rows, size", [(0, 4), (5, 4)])
def test_padded_inputs_refuse_a_batch_that_does_not_fit(rows, size):
    with pytest.raises(ValueError, match="does not fit"):
        decode_inputs([1] * rows, [0] * rows, [[0]] * rows, size=size, max_pages=4, scratch_page=SCRATCH)


def runner() -> ModelRunner:
    config, model = tiny()
    return ModelRunner(model, config, block_size=BLOCK, max_num_seqs=MAX_SEQS, max_model_len=MAX_LEN,
                       k_format="f16", device="cpu")


def test_buffers_are_static_and_a_smaller_batch_resets_stale_rows():
    r = runner()
    buffers = DecodeBuffers(r.cache, max_size=4, scratch_page=SCRATCH)
    ids4, view4 = buffers.view(4)
    addresses = (ids4.data_ptr(), view4.lengths.data_ptr(), view4.page_table.data_ptr())
    assert view4.lengths.tolist() == [0] * 4 and view4.page_table.unique().tolist() == [SCRATCH]  # padding at start
    buffers.load([5, 6, 7, 8], [3, 9, 14, 1], [[0], [1, 2], [3, 4, 5], [6]], 4)
    assert ids4[:, 0].tolist() == [5, 6, 7, 8] and view4.lengths.tolist() == [3, 9, 14, 1]
    buffers.load([9], [2], [[10]], 2)  # rows 2.. of size 4 are not this graph's: only [:2] is rewritten
    ids2, view2 = buffers.view(2)
    assert ids2[:, 0].tolist() == [9, 0] and view2.lengths.tolist() == [2, 0]
    assert view2.page_table.tolist() == [[10] + [SCRATCH] * 7, [SCRATCH] * 8]  # the stale row 1 is padding now
    assert buffers.view(4)[1] is view4  # one view per size: a graph captured over it sees every later load
    assert (ids4.data_ptr(), view4.lengths.data_ptr(), view4.page_table.data_ptr()) == addresses


def test_bad_scratch_page():
    with pytest.raises(ValueError, match="scratch_page"):
        DecodeBuffers(runner().cache, max_size=2, scratch_page=24)


def test_padded_step_equals_the_eager_rows_and_writes_only_their_slots_and_the_scratch_page():
    """The captured step, run eagerly over padded buffers, gives the runner's eager logits for the real rows,
    and leaves every page but the real rows' written slots and the scratch page as it was."""
    config, model = tiny()
    r = runner()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random, never zero, K/V in the whole pool, so any write shows
        r.cache._k_data.copy_(torch.randn(r.cache._k_data.shape, generator=gen))
        r.cache._v_data.copy_(torch.randn(r.cache._v_data.shape, generator=gen))
    tokens, starts, tables = [17, 401, 9], [6, 13, 0], [[4, 11], [2, 19, 7], [8]]
    batch = RunnerBatch([[t] for t in tokens], starts, tables, [True] * 3, [GREEDY] * 3, [0] * 3)
    before_k, before_v = r.cache._k_data.clone(), r.cache._v_data.clone()
    eager = r.logits(batch)  # rewrites the real rows' slots with the same values the step writes
    after_k = r.cache._k_data.clone()
    graphs = DecodeGraphs(model, r.cache, sizes=(1, 2, 4, 8), scratch_page=SCRATCH, attn_backend=r.attn_backend)
    graphs.buffers.load(tokens, starts, tables, 8)  # 3 real rows, 5 padding rows
    with torch.no_grad():
        padded = graphs.forward(8)
    assert padded.shape == (8, 1, config.vocab_size)
    torch.testing.assert_close(padded[:3, 0], eager, rtol=0, atol=ATOL)
    written = {(page, pos % BLOCK) for page_list, pos in zip(tables, starts) for page in [page_list[pos // BLOCK]]}
    for page in range(r.cache.num_pages):
        for slot in range(BLOCK):
            same_k = torch.equal(r.cache._k_data[:, page, :, slot], before_k[:, page, :, slot])
            same_v = torch.equal(r.cache._v_data[:, page, :, slot], before_v[:, page, :, slot])
            if (page, slot) in written:
                assert not same_k  # the real row's token was written there (by both paths)
                torch.testing.assert_close(r.cache._k_data[:, page, :, slot], after_k[:, page, :, slot],
                                           rtol=0, atol=ATOL)
            elif page == SCRATCH and slot == 0:
                assert not (same_k and same_v)  # the padding rows' token 0 at position 0
            else:
                assert same_k and same_v, f"page {page} slot {slot} changed"


def test_cpu_runner_has_no_graphs_and_refuses_them():
    r = runner()
    assert r.graphs is None and r.graph_replays == 0 and r.num_blocks == 24
    config, model = tiny()
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        ModelRunner(model, config, max_num_seqs=2, max_model_len=16, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        ModelRunner(model, config, max_num_seqs=2, max_model_len=16, device="cpu", cuda_graphs=1)
    with pytest.raises(ValueError, match="graph_sizes"):
        ModelRunner(model, config, max_num_seqs=2, max_model_len=16, device="cpu", graph_sizes=[0])


class EagerGraphs(DecodeGraphs):
    """DecodeGraphs whose replay runs the captured step eagerly: the runner's graph path on a CPU."""

    def capture(self) -> None:
        pass

    def _replay(self, size: int) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(size)


def test_runner_graph_path_equals_eager_on_mixed_and_padded_batches():
    """Decode rows go through the graph path (padded to 4 or 8, also beside a prefill chunk in one batch);
    every row's logits equal the eager runner's, and the scratch page is outside what a batch may name."""
    config, model = tiny()
    eager, graphed = runner(), runner()
    graphed.graphs = EagerGraphs(model, graphed.cache, sizes=(1, 2, 4), scratch_page=SCRATCH,
                                 attn_backend=graphed.attn_backend)
    graphed.num_blocks = SCRATCH  # as ModelRunner does once its graphs are captured
    gen = torch.Generator().manual_seed(4)
    texts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in (6, 11, 3, 8)]
    tables = [[0, 5], [9, 2, 14], [20, 17], [7, 1]]
    for r in (eager, graphed):
        for text, table in zip(texts[:3], tables[:3]):
            r.run(RunnerBatch([text], [0], [table], [False], [GREEDY], [0]))
    # a prefill chunk of the fourth text beside three decode rows, then a decode batch of four (no padding)
    # and one of three (padded to 4)
    mixed = RunnerBatch([texts[3][:5]] + [[t[-1]] for t in texts[:3]], [0] + [len(t) for t in texts[:3]],
                        [tables[3]] + tables[:3], [False, True, True, True], [GREEDY] * 4, [0] * 4)
    four = RunnerBatch([[t[-2]] for t in texts], [len(texts[0]) + 1, len(texts[1]) + 1, len(texts[2]) + 1, 5],
                       tables, [True] * 4, [GREEDY] * 4, [1, 1, 1, 0])
    three = RunnerBatch([[t[0]] for t in texts[1:]], [len(texts[1]) + 2, len(texts[2]) + 2, 6], tables[1:],
                        [True] * 3, [GREEDY] * 3, [2, 2, 1])
    for n, batch in enumerate((mixed, four, three), start=1):
        torch.testing.assert_close(graphed.logits(batch), eager.logits(batch), rtol=0, atol=ATOL)
        assert graphed.graph_replays == n  # one replay per batch: its decode rows
    assert eager.graph_replays == 0
    with pytest.raises(ValueError, match=r"block_tables\[0\]"):
        graphed.run(RunnerBatch([[5]], [0], [[SCRATCH]], [True], [GREEDY], [0]))
    # five decode rows: more than the largest size (4) holds, so they run eagerly
    five = RunnerBatch([[3], [4], [5], [6], [7]], [2, 3, 1, 4, 0], [[3], [4], [6], [8], [10]], [True] * 5,
                       [GREEDY] * 5, [0] * 5)
    torch.testing.assert_close(graphed.logits(five), eager.logits(five), rtol=0, atol=ATOL)
    assert graphed.graph_replays == 3
