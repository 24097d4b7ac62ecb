"""The glmtg CLI run in-process on the tiny preset (random weights, CPU), with tiny sizes."""

import json
import os
import re

import pytest

from glmtg.cli import main
from glmtg.cli.sweep_bench import HEADER, SEPARATOR

FAST = ["--no-warmup"]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def sweep_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "run.json"
    rc = main(["sweep-bench", "-c", "24", "-ub", "8", "-n", "2", "--no-progress", "-o", str(path), *FAST])
    assert rc == 0
    return path


def test_sweep_bench_table_and_json(capsys, tmp_path):
    path = tmp_path / "r.json"
    rc, out, err = run(capsys, "sweep-bench", "-c", "24", "-ub", "8", "-n", "2", "-o", str(path), *FAST)
    assert rc == 0, err
    lines = out.splitlines()
    assert "RANDOM WEIGHTS" in lines[0]
    i = lines.index(HEADER)
    assert HEADER == "|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |"
    assert lines[i + 1] == SEPARATOR == "|-------|--------|--------|----------|----------|----------|----------|"
    rows = [line for line in lines[i + 2:] if line.startswith("|")]
    assert [int(r.split("|")[3]) for r in rows] == [0, 8, 16]
    row_format = r"\|\s+8 \|\s+2 \|\s+\d+ \|\s+[\d.]+ \|\s+[\d.]+ \|\s+[\d.]+ \|\s+[\d.]+ \|"
    assert all(re.fullmatch(row_format, r) for r in rows)
    doc = json.loads(path.read_text())
    assert [r["n_kv"] for r in doc["rows"]] == [0, 8, 16]
    assert {"pp", "tg", "t_pp", "speed_pp", "t_tg", "speed_tg", "tg_gbps"} <= set(doc["rows"][0])
    env = doc["environment"]
    for key in ("device", "torch", "triton", "date", "attn", "ctk", "ctv", "preset", "random_weights"):
        assert key in env
    assert env["preset"] == "tiny" and env["random_weights"] is True
    assert path.with_suffix(".png").stat().st_size > 1000


def test_plot_overlays_runs(capsys, sweep_json, tmp_path):
    out_png = tmp_path / "cmp.png"
    rc, _, err = run(capsys, "plot", str(sweep_json), str(sweep_json), "-o", str(out_png))
    assert rc == 0, err
    assert out_png.stat().st_size > 1000


def test_compare_combines_runs_against_a_reference(sweep_json, tmp_path):
    """bench/sweep_bench_compare.py --combine, run as a program: existing runs side by side, ratios."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "sweep_bench_compare.py"
    doc = json.loads(sweep_json.read_text())
    slower = tmp_path / "slower.json"
    doc["environment"]["ctk"] = "q8_0"
    for row in doc["rows"]:
        row["speed_tg"] /= 2
    slower.write_text(json.dumps(doc))
    out = tmp_path / "both"

    root = str(script.parents[1])  # this checkout's glmtg, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}

    def compare(*argv):
        return subprocess.run([sys.executable, str(script), "--out", str(out), *argv], capture_output=True,
                              text=True, timeout=300, env=env)

    ok = compare("--reference", "slow", "--combine", f"fast={sweep_json}", f"slow={slower}")
    assert ok.returncode == 0, ok.stderr
    bad = compare("--reference", "nope", "--combine", f"fast={sweep_json}")
    assert bad.returncode == 2 and "'nope' is not one of the labels" in bad.stderr
    lines = out.with_suffix(".md").read_text().splitlines()
    assert "caches fast: bf16/bf16, slow: q8_0/bf16" in lines[2]
    assert "fast / slow" in lines[4]
    rows = [line.split("|") for line in lines[6:] if line.startswith("| ")]
    assert len(rows) == 3 and all(r[4].strip() == "2.00×" for r in rows)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_perplexity_and_kld_against_itself(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("glmtg computes perplexity like llama.cpp.")  # 41 bytes: 2 chunks of 16
    base = tmp_path / "base.kld"
    rc, out, err = run(capsys, "perplexity", "-f", str(text), "-c", "16", "-ub", "8",
                       "--kl-divergence-base", str(base), *FAST)
    assert rc == 0, err
    assert "RANDOM WEIGHTS" in out and "one token per UTF-8 byte" in out
    assert re.search(r"\[1\]\d+\.\d{4},\[2\]\d+\.\d{4},", out)
    ppl = re.search(r"Final estimate: PPL = (\d+\.\d{4}) \+/- \d+\.\d{5}", out)
    assert ppl and base.is_file()
    # same settings (bf16 sums depend on -ub), tokens and n_ctx taken from the base file
    rc, out, err = run(capsys, "perplexity", "--kl-divergence", "--kl-divergence-base", str(base), "-ub", "8", *FAST)
    assert rc == 0, err
    assert f"PPL = {ppl.group(1)}" in out
    assert re.search(r"Mean    KLD:\s+0\.000000 ±", out)
    assert re.search(r"99\.0%   KLD:\s+0\.000000", out) and re.search(r"Median  KLD:\s+0\.000000", out)
    assert "Same top p: 100.000 ± 0.000 %" in out


def test_generate_streams_and_reports_speed(capsys):
    rc, _, err = run(capsys, "generate", "-p", "Hi", "-n", "4", "--temp", "0", "-c", "16", *FAST)
    assert rc == 0, err
    assert "RANDOM WEIGHTS" in err
    assert re.search(r"prompt eval: 2 tokens in [\d.]+ s = [\d.]+ t/s", err)
    assert re.search(r"generation:  3 tokens in [\d.]+ s = [\d.]+ t/s", err)


def _one_error_line(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ")


@pytest.mark.parametrize("argv", [
    ["sweep-bench", "-c", "abc"],
    ["sweep-bench", "-c", "0"],
    ["sweep-bench", "-ctk", "q5_1"],
    ["sweep-bench", "--attn", "flash"],
    ["generate", "-p", "x", "--top-p", "2"],
    ["generate", "-p", "x", "--temp", "-1"],
    ["generate"],
    ["sweep-bench", "-c", "4", "-ub", "8"],
    ["perplexity", "-f", "/nonexistent/text.txt"],
    ["perplexity"],
    ["perplexity", "--kl-divergence"],
    ["generate", "-m", "/nonexistent/model", "-p", "x"],
    ["plot", "/nonexistent.json", "-o", "x.png"],
    ["--device", "cuda:7", "sweep-bench"],
    [],
])
def test_errors_are_one_line_and_exit_2(capsys, argv):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and _one_error_line(err), err


def test_model_dir_errors(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    rc, _, err = run(capsys, "sweep-bench", "-m", str(tmp_path), "-c", "16", "-ub", "8")
    assert rc == 2 and _one_error_line(err) and "model_type" in err
    from glmtg.config import ModelConfig

    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf_dict()))
    rc, _, err = run(capsys, "generate", "-m", str(tmp_path), "-p", "x")
    assert rc == 2 and _one_error_line(err) and "tokenizer" in err
    (tmp_path / "config.json").write_text("{not json")
    rc, _, err = run(capsys, "sweep-bench", "-m", str(tmp_path), "-c", "16", "-ub", "8")
    assert rc == 2 and _one_error_line(err)


def test_corrupt_inputs(capsys, tmp_path):
    bad = tmp_path / "bad.kld"
    bad.write_bytes(b"not a safetensors file")
    rc, _, err = run(capsys, "perplexity", "--kl-divergence", "--kl-divergence-base", str(bad))
    assert rc == 2 and _one_error_line(err)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2]")
    rc, _, err = run(capsys, "plot", str(bad_json), "-o", str(tmp_path / "x.png"))
    assert rc == 2 and _one_error_line(err)


def test_request_beyond_the_context_fails_before_work(capsys):
    rc, out, err = run(capsys, "generate", "-p", "hello", "-n", "100", "-c", "16", *FAST)
    assert rc == 2 and _one_error_line(err) and "-c 16" in err
    assert out == ""


def test_help_shows_defaults(capsys):
    rc, out, _ = run(capsys, "sweep-bench", "--help")
    out = " ".join(out.split())
    # -c's default printed; -ub's is the device's (4096 / 2048 / 512), said in words
    assert rc == 0 and "(default: 4096)" in out and "512 on a CPU, never above -c" in out


def test_nan_perplexity_is_an_error_not_a_result(capsys, tmp_path, monkeypatch):
    """A model that computes NaN logits must not end with "PPL = nan" and exit 0."""
    from glmtg.cli import common

    random_model = common.random_model

    def nan_model(config, **kw):
        model = random_model(config, **kw)
        model.norm.weight.data.fill_(float("nan"))  # every logit becomes NaN
        return model

    monkeypatch.setattr(common, "random_model", nan_model)
    text = tmp_path / "t.txt"
    text.write_text("glmtg computes perplexity like llama.cpp.")
    base = tmp_path / "base.kld"
    rc, out, err = run(capsys, "perplexity", "-f", str(text), "-c", "16", "--kl-divergence-base", str(base), *FAST)
    assert rc == 2 and _one_error_line(err) and "non-finite log-probabilities" in err
    assert "PPL = nan" in out and not base.exists()  # no base file recorded from a broken run


def test_python_dash_m_glmtg_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "glmtg", "sweep-bench", "-c", "0"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: argument -c/--ctx-size")
    done = subprocess.run([sys.executable, "-m", "glmtg", "--help"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and "sweep-bench" in done.stdout
