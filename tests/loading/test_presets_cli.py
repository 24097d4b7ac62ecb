"""``--type`` on the commands that build a random preset: the model holds the mix, bad values are one error line."""

from __future__ import annotations

import json
import re

import pytest

from glmtg.cli import main


def test_generate_with_a_quant_mix(capsys):
    rc = main(["generate", "-p", "Hi", "-n", "3", "--temp", "0", "-c", "16", "--no-warmup", "--type", "Q4_K_M"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert "RANDOM WEIGHTS (preset tiny, Q4_K_M)" in err
    assert re.search(r"generation:  2 tokens", err)


def test_sweep_bench_records_the_type(capsys, tmp_path):
    path = tmp_path / "run.json"
    rc = main(["sweep-bench", "-c", "16", "-ub", "8", "-n", "2", "--no-progress", "--no-warmup", "--type", "Q8_0",
               "-o", str(path)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(path.read_text())["environment"]["type"] == "Q8_0"


@pytest.mark.parametrize("argv,match", [
    (["--type", "Q4_K"], "--type"),  # not a llama.cpp file type (argparse's choices)
    (["--type", "IQ3_XXS"], "--type IQ3_XXS uses iq3_xxs, which glmtg cannot quantize yet"),
    (["-m", "{dir}", "--type", "Q4_0"], "--type applies to random weights only"),
])
def test_bad_type_is_one_error_line(capsys, tmp_path, argv, match):
    rc = main(["generate", "-p", "Hi", "-n", "1", *[a.format(dir=tmp_path) for a in argv]])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
