"""CUDA only: the serve engine with decode graphs gives each request the tokens it gets with graphs off.

The tiny preset (8 experts, top-2) in bf16 and as a GGUF Q4_0 mix, concurrent requests of different prompt
lengths and max_tokens, so decode batches of every size from 1 to the widest form and most are padded to the
next captured size. Greedy (and seeded) tokens must be equal: the replayed step is the eager step's kernels
over padded rows, and the expert paths are chosen by the batch size's side of experts/k (a power of two
here, as the bucket sizes are, so a batch and its bucket take the same path). The Q4_0 run keeps batches
<= 4 (8 pairs): above that the eager step loops over dequantized experts while the graph keeps the kernel.
"""

from __future__ import annotations

import functools

import pytest
import torch

from glmtg.loading.presets import preset_config, random_model
from glmtg.serve.llm_engine import LLMEngine, SchedulerConfig
from glmtg.serve.runner import ModelRunner
from glmtg.serve.sequence import RunnerBatch, SamplingSpec
from tests.references.fake_runner import drain

pytestmark = pytest.mark.gpu
GREEDY = SamplingSpec(temperature=0.0)
MAX_LEN, BLOCK = 160, 16


@functools.cache
def model(file_type: str | None):
    config = preset_config("tiny")
    return config, random_model(config, dtype=torch.bfloat16, device="cuda", file_type=file_type)


class Recording:
    """The runner as the engine sees it, noting the width of every decode group it is given."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.block_size, self.num_blocks = runner.block_size, runner.num_blocks
        self.max_model_len = runner.max_model_len
        self.decode_widths: list[int] = []

    def run(self, batch: RunnerBatch) -> list[int | None]:
        self.decode_widths.append(sum(len(t) == 1 for t in batch.token_ids))
        return self.runner.run(batch)


def serve(file_type: str | None, graphs: bool, parallel: int) -> tuple[dict, Recording]:
    config, m = model(file_type)
    runner = Recording(ModelRunner(m, config, block_size=BLOCK, max_num_seqs=parallel, max_model_len=MAX_LEN,
                                   device="cuda", cuda_graphs=graphs))
    engine = LLMEngine(runner, SchedulerConfig(max_num_seqs=parallel, max_prefill_tokens=24, max_model_len=MAX_LEN),
                       eos_token_ids=())
    gen = torch.Generator().manual_seed(5)
    for i in range(parallel + 2):  # two wait for a slot: admitted mid-run
        prompt = torch.randint(3, config.vocab_size, (7 + 13 * i,), generator=gen).tolist()
        spec = SamplingSpec(temperature=0.8, top_k=20, seed=11 + i) if i % 3 == 2 else GREEDY
        engine.add_request(f"r{i}", prompt, spec, max_tokens=20 + 7 * (i % 4))
    return drain(engine), runner


@pytest.mark.parametrize("file_type, parallel", [(None, 7), ("Q4_0", 4)], ids=["bf16", "Q4_0"])
def test_graph_decode_equals_eager(file_type, parallel):
    eager, eager_runner = serve(file_type, False, parallel)
    graphed, graphed_runner = serve(file_type, True, parallel)
    assert eager_runner.runner.graphs is None and eager_runner.runner.graph_replays == 0
    assert graphed_runner.runner.graphs is not None
    # a page per sequence more, one of them the scratch page
    assert graphed_runner.runner.num_blocks == eager_runner.runner.num_blocks + parallel - 1
    assert {k: v["tokens"] for k, v in graphed.items()} == {k: v["tokens"] for k, v in eager.items()}
    widths = [w for w in graphed_runner.decode_widths if w]
    assert graphed_runner.runner.graph_replays == len(widths)  # every decode group replayed
    assert any(w & (w - 1) for w in widths)  # some were padded (not a captured size themselves)
    assert graphed_runner.runner.graphs.sizes == tuple(s for s in (1, 2, 4) if s < parallel) + (parallel,)


def test_replayed_logits_equal_eager_logits_of_a_padded_batch():
    """Three decode rows padded to 4: the replay's logits of each row equal the eager forward's (bf16 model,
    the same kernels on the same rows: tolerance 1e-2 absolute on logits of |x| ~ 1 allows for a batch-shaped
    cuBLAS choice, far below what a wrong row or page changes)."""
    config, m = model(None)
    kwargs = {"block_size": BLOCK, "max_num_seqs": 4, "max_model_len": MAX_LEN, "device": "cuda"}
    graphed, eager = ModelRunner(m, config, **kwargs), ModelRunner(m, config, cuda_graphs=False, **kwargs)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in (5, 21, 34)]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(3)]
    for r in (graphed, eager):
        for p, t in zip(prompts, tables):
            r.run(RunnerBatch([p], [0], [t], [False], [GREEDY], [0]))
    batch = RunnerBatch([[p[-1]] for p in prompts], [len(p) for p in prompts], tables, [True] * 3, [GREEDY] * 3,
                        [0] * 3)
    want = eager.logits(batch)
    got = graphed.logits(batch)
    assert graphed.graph_replays == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
