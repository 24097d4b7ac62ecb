"""--cpu-moe, --n-cpu-moe and -ot on the glmtg commands (tiny preset in GGUF blocks, or a GGUF file; CPU)."""

from __future__ import annotations

import json
import re

import pytest

from glmtg.cli.sweep_bench import HEADER
from glmtg.config import ModelConfig
from tests.references.cli_run import one_error_line, run

FAST = ["--no-warmup"]
TEXT = "glmtg places routed experts in host memory, as llama.cpp does."


def sweep(capsys, tmp_path, *flags):
    path = tmp_path / "run.json"
    rc, out, err = run(capsys, "sweep-bench", "-c", "16", "-ub", "8", "-n", "2", "--no-progress", "-o", str(path),
                       *FAST, *flags)
    assert rc == 0, err
    assert HEADER in out.splitlines()
    return json.loads(path.read_text())["environment"]


@pytest.mark.parametrize("flags, layers", [
    (("--type", "Q4_0", "--cpu-moe"), [1, 2, 3]),
    (("--type", "Q4_K_M", "--n-cpu-moe", "3"), [1, 2]),
    (("--type", "Q8_0", "-ot", r"blk\.3\.ffn_.*_exps=CPU", "-ot", "exps=CUDA0"), [3]),
    (("--type", "Q8_0", "-ot", r"blk\.2\.=CUDA0", "-cmoe"), [1, 3]),  # first match wins
    (("--type", "Q4_0",), []),
])
def test_sweep_bench_places_experts(capsys, tmp_path, flags, layers):
    assert sweep(capsys, tmp_path, *flags)["host_expert_layers"] == layers


def test_gguf_file_with_cpu_moe(capsys, tmp_path):
    path = tmp_path / "tiny.gguf"
    rc, _, err = run(capsys, "make-gguf", "--preset", "tiny", "--type", "Q4_K_M", "--device", "cpu", "-o", str(path))
    assert rc == 0, err
    assert sweep(capsys, tmp_path, "-m", str(path), "--cpu-moe")["host_expert_layers"] == [1, 2, 3]


def test_perplexity_kld_of_cpu_moe_against_the_device_run(capsys, tmp_path):
    text, base = tmp_path / "t.txt", tmp_path / "base.kld"
    text.write_text(TEXT)
    common = ("-c", "16", "-ub", "8", "--type", "Q8_0", *FAST)
    rc, out, err = run(capsys, "perplexity", "-f", str(text), "--kl-divergence-base", str(base), *common)
    assert rc == 0, err
    rc, out, err = run(capsys, "perplexity", "--kl-divergence", "--kl-divergence-base", str(base), "--cpu-moe",
                       *common)
    assert rc == 0, err
    kld = re.search(r"Mean    KLD: +(\d+\.\d+)", out)
    # The same weights; only the int8 rounding of the host experts' activations differs. Random weights give
    # near-uniform distributions, so every KLD here is small: Q4_0 against this Q8_0 base measures 1.7e-5
    # (top token agreeing 86%), this run 0.000000 with the same top token everywhere.
    assert kld and float(kld.group(1)) <= 1e-6, out
    assert "Same top p: 100.000" in out, out


def test_generate_with_n_cpu_moe(capsys):
    rc, _, err = run(capsys, "generate", "-p", "Hi", "-n", "3", "--temp", "0", "-c", "16", "--type", "Q4_0",
                     "--n-cpu-moe", "2", *FAST)
    assert rc == 0, err
    assert re.search(r"generation:  2 tokens in [\d.]+ s", err)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """An HF model directory (config.json only: the placement check comes before any weight is read)."""
    path = tmp_path_factory.mktemp("hf")
    (path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf_dict()))
    return path


@pytest.mark.parametrize("command", ["sweep-bench", "perplexity", "generate", "serve"])
@pytest.mark.parametrize("flags, message", [
    (("--cpu-moe",), "need GGUF block weights: -m FILE.gguf, or --type T"),
    (("--type", "Q4_0", "--n-cpu-moe", "-1"), "--n-cpu-moe must be an integer >= 0"),
    (("--type", "Q4_0", "--n-cpu-moe", "x"), "--n-cpu-moe must be an integer >= 0"),
    (("--type", "Q4_0", "-ot", "exps"), "-ot wants REGEX=DEVICE"),
    (("--type", "Q4_0", "-ot", "exps(=CPU"), "bad regex"),
    (("--type", "Q4_0", "-ot", "exps=TPU0"), "unknown device 'TPU0'"),
    (("--type", "Q4_0", "-ot", "attn=CPU"), "only routed-expert tensors"),
    (("--type", "Q4_0", "-ot", r"blk\.1\.ffn_down_exps=CPU"), "must be placed together"),
])
def test_bad_placement_is_one_error_line(capsys, tmp_path, command, flags, message):
    (tmp_path / "t.txt").write_text(TEXT)
    extra = {"perplexity": ("-f", str(tmp_path / "t.txt")), "generate": ("-p", "Hi")}.get(command, ())
    rc, _, err = run(capsys, command, *extra, *flags)
    assert rc == 2 and one_error_line(err) and message in err, err


@pytest.mark.parametrize("command", ["sweep-bench", "generate"])
def test_hf_model_with_placement_is_refused(capsys, hf_dir, command):
    extra = ("-p", "Hi") if command == "generate" else ()
    rc, _, err = run(capsys, command, "-m", str(hf_dir), *extra, "-ot", "exps=CPU")
    assert rc == 2 and one_error_line(err) and "not a bf16/HF model" in err, err
