"""-sm graph / -sm layer --gpus N on CPU: one command starts N gloo ranks; rank 0 prints what the one-process
command prints (the split changes no result beyond float32 summation order).

The ranks are separate processes writing to the inherited stdout, so capfd (file-descriptor capture) reads
their output. Perplexity: -sm layer is bitwise the same model (the same printed decimals); -sm graph sums
float32 products in another order (~1e-6 relative in the logits), which can move the 4th decimal of a PPL
near 1000 by one (1003.2845 vs 1003.2846 measured with the experts split along their width), so it is
compared within 1e-5 relative (tests/cli/test_split_mode_quant.py's; a lost partial sum moves it by > 1e-3).
"""

from __future__ import annotations

import argparse
import json
import re

import pytest

from glmtg.cli import main, ranks
from glmtg.parallel import TPGroup
from tests.references.cli_ppl import PPL_FLAGS, final_ppl
from glmtg.cli.sweep_bench import HEADER

GRAPH_REL_TOL = 1e-5


@pytest.mark.parametrize("experts", [[], ["--tp-experts", "expert"]])
def test_perplexity_graph_equals_one_process(capfd, text_file, experts) -> None:
    # routed experts split along their width (the default) or by expert
    one = final_ppl(capfd, "perplexity", "-f", str(text_file), *PPL_FLAGS)
    two = final_ppl(capfd, "perplexity", "-f", str(text_file), *PPL_FLAGS, "-sm", "graph", "--gpus", "2", *experts)
    assert abs(float(two) - float(one)) <= GRAPH_REL_TOL * float(one), (one, two)


def test_sweep_bench_graph_width_split_runs(capfd) -> None:
    rc = main(["sweep-bench", "-c", "16", "-ub", "8", "-n", "2", "--no-progress", "--device", "cpu", "--dtype", "f32",
               "--no-warmup", "-sm", "graph", "--gpus", "2", "--tp-experts", "width"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert out.count(HEADER) == 1
    assert [line.split("|")[3].strip() for line in out.splitlines() if re.match(r"\|\s+8 \|", line)] == ["0", "8"]


def test_sweep_bench_layer_split_runs(capfd) -> None:
    rc = main(["sweep-bench", "-c", "16", "-ub", "8", "-n", "2", "--no-progress", "--device", "cpu", "--dtype", "f32",
               "--no-warmup", "-sm", "layer", "--gpus", "2", "-ts", "3,1"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert out.count(HEADER) == 1
    assert [line.split("|")[3].strip() for line in out.splitlines() if re.match(r"\|\s+8 \|", line)] == ["0", "8"]


def test_sweep_bench_graph_split_json_is_rank_zeros(capfd, tmp_path) -> None:
    """-o under -sm: rank 0 alone writes the file (two ranks writing one path interleaved their bytes)."""
    path = tmp_path / "run.json"
    rc = main(["sweep-bench", "-c", "16", "-ub", "8", "-n", "2", "--no-progress", "--device", "cpu", "--dtype", "f32",
               "--no-warmup", "-sm", "graph", "--gpus", "2", "-o", str(path)])
    _, err = capfd.readouterr()
    assert rc == 0, err
    assert [r["n_kv"] for r in json.loads(path.read_text())["rows"]] == [0, 8]
    assert ranks.writes_files(argparse.Namespace(rank_group=TPGroup(0, 2)))
    assert not ranks.writes_files(argparse.Namespace(rank_group=TPGroup(1, 2)))
    assert ranks.writes_files(argparse.Namespace())


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "2"], "--gpus and -ts need -sm"),
    (["-sm", "graph", "--gpus", "3"], "num_key_value_heads (2) must be a multiple"),
    (["-sm", "graph", "--gpus", "2", "-ts", "1,1"], "-ts applies to -sm layer"),
    (["-sm", "layer", "--gpus", "2", "-ts", "1"], "-ts gives 1 ratios for --gpus 2"),
    (["-sm", "layer", "--gpus", "3", "-ts", "1,1,1", "--n-layers", "2"], "3 ranks need at least as many layers"),
    (["-sm", "graph", "--gpus", "2", "--tp-experts", "rows"], "--tp-experts must be one of width, expert, got 'rows'"),
    (["-sm", "layer", "--gpus", "2", "--tp-experts", "width"], "--tp-experts applies to -sm graph"),
    (["--tp-experts", "expert"], "--tp-experts applies to -sm graph"),
])
def test_bad_split_flags(capfd, text_file, flags, message) -> None:
    rc = main(["perplexity", "-f", str(text_file), *PPL_FLAGS, *flags])
    _, err = capfd.readouterr()
    assert rc == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
