"""-sm graph / -sm layer with -m HF_DIR (a safetensors directory) from the CLI, on CPU with 2 gloo ranks:
perplexity in graph mode gives the one-process estimate, generate in layer mode runs, and a split the
checkpoint's widths cannot make is one error line (exit 2) before any rank starts.

Tolerance, -sm graph: the printed PPL within 1e-5 relative (tests/cli/test_split_mode_quant.py's: float32
sums in another order, then the f16 KV cache rounding K/V that differ in their last bits, ~1e-6 measured; a
mis-cut slice or a lost partial sum moves it by > 1e-3). The rank weights themselves are checked bitwise in
tests/parallel/test_hf_split_gloo.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from glmtg.cli import main
from glmtg.config import ModelConfig
from glmtg.loading.presets import random_model
from tests.references.cli_ppl import PPL_FLAGS, final_ppl
from tests.references.hf_dir import LETTERS_TEXT, write_hf_dir

REL_TOL = 1e-5
CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_split")
    model = write_hf_dir(d / "tiny", random_model(CONFIG, dtype=torch.float32), CONFIG, dtype=torch.bfloat16)
    text = d / "letters.txt"
    text.write_text(" ".join([LETTERS_TEXT] * 2))  # 104 letter tokens: two chunks of 32 and more
    return model, text


def test_perplexity_graph_equals_one_process(capfd, files) -> None:
    model, text = files
    one = final_ppl(capfd, "perplexity", "-m", str(model), "-f", str(text), *PPL_FLAGS)
    two = final_ppl(capfd, "perplexity", "-m", str(model), "-f", str(text), *PPL_FLAGS, "-sm", "graph", "--gpus", "2")
    assert abs(float(two) - float(one)) <= REL_TOL * float(one), (one, two)


def test_generate_layer_split_runs(capfd, files) -> None:
    model, _ = files
    rc = main(["generate", "-m", str(model), "-p", "a b c", "-n", "3", "--temp", "0", "--ignore-eos", "-c", "16",
               "--device", "cpu", "--dtype", "f32", "--no-warmup", "-sm", "layer", "--gpus", "2", "-ts", "1,2"])
    _, err = capfd.readouterr()
    assert rc == 0, err
    assert err.count("generation:") == 1, err  # rank 0 alone reports


@pytest.mark.parametrize("changes, flags, message", [
    # the shared expert's 33 columns do not split in two
    ({"moe_intermediate_size": 33}, ["-sm", "graph", "--gpus", "2"], "the shared expert's width"),
    ({}, ["-sm", "graph", "--gpus", "3"], "num_key_value_heads (2) must be a multiple"),
    ({}, ["-sm", "layer", "--gpus", "4"], "4 ranks need at least as many layers, the model has 3"),
])
def test_bad_split_of_a_model_directory(capfd, files, tmp_path, changes, flags, message) -> None:
    model, text = files
    if changes:  # only config.json is read before the ranks would start
        model = tmp_path / "changed"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({**CONFIG.to_hf_dict(), **changes}))
    rc = main(["perplexity", "-m", str(model), "-f", str(text), *PPL_FLAGS, *flags])
    _, err = capfd.readouterr()
    assert rc == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
