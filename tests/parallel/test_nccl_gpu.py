"""-sm graph on two GPUs through NCCL and peer memory (skipped without two CUDA devices).

- The peer-memory sum (glmtg/parallel/peer_sum.py) inside a CUDA graph: 12 sums of alternating parity per
  replay, each of a fresh input, replayed with new inputs; every element must equal the exact sum (small
  integers in float32 and bf16: exact in both). A buffer reused while a peer still reads it would show
  here as a wrong element.
- The CLI end to end on the GPUs: greedy `generate` (decode steps replayed from CUDA graphs, the sums
  inside them) prints the one-GPU text, and `perplexity` the one-GPU estimate within 1e-4 relative (float32
  activations; the sums add the ranks' partial products in another order, and the f16 cache rounds K/V
  that differ in their last bits to neighbouring halves: ~1e-6 on the CPU; a lost partial sum or a mis-cut
  vocabulary slice moves it by far more).
"""

from __future__ import annotations

import re

import pytest
import torch

from glmtg.cli import main
from glmtg.parallel import TPGroup
from glmtg.parallel.launch import spawn
from tests.references.cli_ppl import TEXT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA GPUs")]

SUMS, REPLAYS = 12, 4
COMMON = ["--preset", "tiny", "--type", "Q8_0", "--dtype", "f32", "--device", "cuda", "-c", "128"]


def _inputs(rank: int, replay: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * replay + rank)
    return torch.randint(-8, 9, (SUMS, *shape), generator=g).to(dtype)


def _peer_sum_worker(tp: TPGroup) -> None:
    device = torch.device("cuda", tp.rank)
    for dtype, shape in ((torch.float32, (1, 4096)), (torch.bfloat16, (3, 5120))):
        src = _inputs(tp.rank, 0, dtype, shape).to(device)
        out = torch.full_like(src, float("nan"))
        tp.all_reduce(src[0].clone())  # the peer buffers are made outside the capture

        def step() -> None:
            for k in range(SUMS):
                y = src[k].clone()
                tp.all_reduce(y, parity=k % 2)
                out[k].copy_(y)

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for replay in range(REPLAYS):
            src.copy_(_inputs(tp.rank, replay, dtype, shape))
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize(device)
            want = sum(_inputs(r, replay, dtype, shape).double() for r in range(tp.world_size))
            assert torch.equal(out.double().cpu(), want), f"rank {tp.rank} {dtype} replay {replay}"


def test_peer_sum_in_a_graph_is_exact() -> None:
    spawn(_peer_sum_worker, 2, backend="nccl")


def _stdout(capfd, argv: list[str]) -> str:
    rc = main(argv)
    out, err = capfd.readouterr()
    assert rc == 0, err
    return out


def test_generate_graph_split_prints_the_one_gpu_text(capfd) -> None:
    argv = ["generate", *COMMON, "-p", "a b c", "-n", "24", "--temp", "0", "--ignore-eos"]
    one = _stdout(capfd, argv)
    two = _stdout(capfd, [*argv, "-sm", "graph", "--gpus", "2"])
    assert one.strip() and two == one


def test_perplexity_graph_split_matches_one_gpu(capfd, tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    argv = ["perplexity", *COMMON, "-f", str(text), "-ub", "32", "--chunks", "2", "-ctk", "f16", "--no-warmup"]
    argv[argv.index("-c") + 1] = "32"
    ppl = [float(re.findall(r"Final estimate: PPL = ([\d.]+)", _stdout(capfd, a))[0])
           for a in (argv, [*argv, "-sm", "graph", "--gpus", "2"])]
    assert abs(ppl[1] - ppl[0]) <= 1e-4 * ppl[0], ppl
