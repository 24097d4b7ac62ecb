"""--save-expert-counts, --gpu-experts and --gpu-experts-budget on the glmtg commands (tiny preset in GGUF
blocks; CPU: the "GPU" the experts go back to is the CPU device, so a budget is required)."""

from __future__ import annotations

import json

import pytest

from glmtg.cpu.expert_counts import ExpertCounts
from glmtg.cpu.gpu_experts import choose_device_experts, expert_bytes
from glmtg.loading.presets import mix_tensor_bytes, preset_config
from glmtg.cli import main
from tests.references.cli_run import one_error_line, run

TEXT = "glmtg puts the experts a text selects most on the GPU. " * 12
BASE = ["--type", "Q8_0", "--device", "cpu", "--no-warmup"]


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    """Calibration counts from perplexity over a text, as a user gathers them."""
    d = tmp_path_factory.mktemp("counts")
    (d / "calib.txt").write_text(TEXT)
    out = d / "counts.json"
    assert main(["perplexity", *BASE, "--cpu-moe", "-f", str(d / "calib.txt"), "-c", "32", "--chunks", "2",
                 "--save-expert-counts", str(out)]) == 0
    return out


def test_perplexity_saves_counts(counts_file):
    config = preset_config("tiny", None)
    counts = ExpertCounts.load(counts_file, config)
    k = config.num_experts_per_tok
    assert sorted(counts.counts) == [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    assert all(sum(row) == 2 * 32 * k for row in counts.counts.values())  # 2 chunks of 32 tokens, no warm-up


def test_sweep_bench_gpu_experts_from_counts(capsys, tmp_path, counts_file):
    out = tmp_path / "run.json"
    counts = ExpertCounts.load(counts_file)
    rc, _, err = run(capsys, "sweep-bench", *BASE, "--cpu-moe", "--gpu-experts", f"auto:{counts_file}",
                     "--gpu-experts-budget", "20KB", "-c", "16", "-ub", "8", "-n", "2", "--no-progress", "-o", str(out))
    assert rc == 0, err
    config = preset_config("tiny", None)
    per_expert = expert_bytes(mix_tensor_bytes(config, "Q8_0"), [1, 2, 3], config.n_routed_experts)
    want = choose_device_experts(per_expert, config.n_routed_experts, 20_000, counts)
    n = sum(map(len, want.values()))
    assert 0 < n < 3 * config.n_routed_experts  # some experts, not all: a real split
    line = next(x for x in err.splitlines() if x.startswith("gpu-experts: "))
    assert line.startswith(f"gpu-experts: {n} of {3 * config.n_routed_experts} host-placed experts on cpu (")
    assert f"of a 20.0 kB budget): 0 layer(s) wholly, {len(want)} split" in line
    assert json.loads(out.read_text())["environment"]["host_expert_layers"] == [1, 2, 3]


def test_uniform_fill_warns_and_moves_whole_layers(capsys, tmp_path):
    rc, _, err = run(capsys, "sweep-bench", *BASE, "--cpu-moe", "--gpu-experts", "auto", "--gpu-experts-budget",
                     "1GB", "-c", "16", "-ub", "8", "-n", "2", "--no-progress", "-o", str(tmp_path / "r.json"))
    assert rc == 0, err
    assert any(x.startswith("warning: --gpu-experts auto without counts") for x in err.splitlines())
    assert "3 layer(s) wholly, 0 split" in err
    assert json.loads((tmp_path / "r.json").read_text())["environment"]["host_expert_layers"] == []


@pytest.mark.parametrize("flags, message", [
    (["--cpu-moe", "--gpu-experts", "bogus"], "argument --gpu-experts: wants auto or auto:COUNTS.json"),
    (["--cpu-moe", "--gpu-experts", "auto", "--gpu-experts-budget", "2XB"], "--gpu-experts-budget: wants a size"),
    (["--gpu-experts", "auto", "--gpu-experts-budget", "1GB"], "add --cpu-moe"),
    (["--cpu-moe", "--gpu-experts", "auto"], "give --gpu-experts-budget SIZE"),
    (["--cpu-moe", "--gpu-experts-budget", "1GB"], "--gpu-experts-budget applies to --gpu-experts"),
    (["--cpu-moe", "--gpu-experts", "auto:missing.json", "--gpu-experts-budget", "1GB"],
     "expert counts file not found: missing.json"),
])
def test_bad_flags(capsys, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "sweep-bench", *BASE, "-c", "16", *flags)
    assert rc == 2 and one_error_line(err) and message in err, err


def test_counts_of_another_model(capsys, counts_file):
    rc, _, err = run(capsys, "sweep-bench", "--preset", "glm-4.5-air", "--n-layers", "2", "--type", "Q4_0",
                     "--device", "cpu", "-c", "16", "--cpu-moe", "--gpu-experts", f"auto:{counts_file}",
                     "--gpu-experts-budget", "1GB")
    assert rc == 2 and one_error_line(err)
    assert f"expert counts file {counts_file} holds expert counts of another model" in err


def test_save_counts_to_a_directory(capsys, tmp_path):
    rc, _, err = run(capsys, "sweep-bench", *BASE, "-c", "16", "--save-expert-counts", str(tmp_path))
    assert rc == 2 and one_error_line(err) and "--save-expert-counts" in err
