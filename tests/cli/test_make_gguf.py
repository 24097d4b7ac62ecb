"""``glmtg make-gguf`` end to end on the tiny preset, then the other commands on the file with ``-m FILE.gguf``."""

from __future__ import annotations

import gguf
import pytest
import torch

from glmtg.cli import main
from glmtg.config import ModelConfig
from glmtg.formats.mix import tensor_type
from glmtg.loading.gguf import open_gguf
from glmtg.loading.gguf_model import load_gguf_model
from glmtg.loading.presets import random_model

TINY = ModelConfig.preset("tiny")
FAST = ["--device", "cpu", "--no-warmup"]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    path = tmp_path_factory.mktemp("make") / "tiny-Q8_0.gguf"
    assert main(["make-gguf", "--preset", "tiny", "--type", "Q8_0", "--device", "cpu", "-o", str(path)]) == 0
    return path


def test_file_is_the_random_preset_in_the_mix(made):
    with open_gguf(made) as f:
        assert f.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
        for name, info in f.tensors.items():
            assert info.type_name.lower() == tensor_type("Q8_0", name, info.shape, TINY), name
        assert f.tensors["blk.1.ffn_gate_exps.weight"].type_name == "Q8_0"
        assert f.tensors["blk.1.ffn_gate_inp.weight"].type_name == "F32"
    # the same seeded model sweep-bench --preset tiny --type Q8_0 builds, bit for bit
    want = random_model(TINY, device="cpu", file_type="Q8_0")
    loaded, config = load_gguf_model(made, device="cpu", dtype=torch.bfloat16, progress=False)
    assert config == TINY
    for (slot, value), (slot2, value2) in zip(want.slot_tensors(), loaded.slot_tensors(), strict=True):
        assert slot == slot2 and torch.equal(value, value2), slot.name


def test_commands_run_on_the_file(made, capsys, tmp_path):
    rc, out, err = run(capsys, "sweep-bench", "-m", str(made), "-c", "24", "-ub", "8", "-n", "2", "--no-progress",
                       "-o", str(tmp_path / "s.json"), *FAST)
    assert rc == 0, err
    assert "S_TG t/s" in out
    assert "RANDOM WEIGHTS" not in out + err  # a file is a real model to the CLI
    rc, out, err = run(capsys, "generate", "-m", str(made), "-p", "hello", "--chat", "-n", "3", "-c", "64",
                       "--temp", "0", *FAST)
    assert rc == 0, err
    rc, out, err = run(capsys, "perplexity", "-m", str(made), "-c", "16", "--chunks", "1", *FAST,
                       "-f", str(_text(tmp_path)))
    assert rc == 0, err
    assert "Final estimate: PPL" in out + err


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    return path


def test_k_mix_falls_back_on_narrow_rows(tmp_path, capsys):
    """Q4_K_M on rows of 64 and 32 values: llama.cpp's 32-value fallbacks; the file loads."""
    path = tmp_path / "k.gguf"
    rc, _, err = run(capsys, "make-gguf", "--preset", "tiny", "--n-layers", "2", "--type", "Q4_K_M", "--device",
                     "cpu", "-o", str(path))
    assert rc == 0, err
    with open_gguf(path) as f:
        types = {info.type_name for info in f.tensors.values()}
        assert f.metadata["glm4moe.block_count"] == 2
    assert {"Q5_0", "F32"} <= types and not types & {"Q4_K", "Q6_K"}
    model, config = load_gguf_model(path, device="cpu", dtype=torch.float32, progress=False)
    assert config.num_hidden_layers == 2 and len(model.layers) == 2


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope", "--type", "Q8_0"], "invalid choice: 'nope'"),
    (["--preset", "tiny", "--type", "Q9_9"], "invalid choice: 'Q9_9'"),
    (["--preset", "tiny", "--type", "Q8_0", "--n-layers", "0"], "positive integer"),
    (["--preset", "tiny", "--type", "Q8_0", "--n-layers", "9"], "exceeds the 4 layers"),
    (["--preset", "tiny", "--type", "Q8_0", "-o", "/nonexistent-dir/x.gguf"], "does not exist"),
    (["--preset", "tiny", "--type", "Q8_0", "-o", "."], "is a directory"),
    (["--preset", "tiny", "--type", "Q8_0", "--device", "tpu"], "--device"),
])
def test_bad_input_is_one_error_line(argv, message, capsys, tmp_path):
    if "-o" not in argv:
        argv = [*argv, "-o", str(tmp_path / "x.gguf")]
    rc, _, err = run(capsys, "make-gguf", *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "x.gguf").exists()


def test_bad_gguf_file_is_one_error_line(capsys, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)  # a tensor count running past the end
    rc, _, err = run(capsys, "sweep-bench", "-m", str(path), "-c", "24", "-ub", "8", "-n", "2", *FAST)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "broken.gguf" in lines[0], err


def test_missing_gguf_file_is_named_as_a_file(capsys, tmp_path):
    rc, _, err = run(capsys, "sweep-bench", "-m", str(tmp_path / "absent.gguf"), "--no-progress")
    assert rc == 2
    assert err.strip().splitlines() == [f"error: GGUF file not found: {tmp_path / 'absent.gguf'}"]
