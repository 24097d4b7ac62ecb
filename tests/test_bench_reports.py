"""CPU checks of the benchmark scripts (the numbers themselves come from a GPU).

The scripts run as subprocesses, as a user runs them; no test imports a bench script. Every script
with an argparse command line must answer ``--help`` without a GPU. Not run here: bench/common.py (a
module of helpers, no command line) and bench/flashinfer_warmup.py (no command line; it imports
FlashInfer and launches CUDA kernels as soon as it runs). No script with a command line needs CUDA
merely to import, so none is skipped for that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CLI_SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "ArgumentParser" in p.read_text())


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _floor_payload() -> dict:
    """A small stream_floor run: two cases with both two-kernel rows, one from before the PDL row existed.

    The "empty" rows are timed calls of a read plus an empty kernel; one decoy "empty" row is made
    faster than every plain read so that a report counting it as a plain read would show.
    """
    env = {"device": "test GPU", "copy_bandwidth_tbps": 3.0, "torch": "t", "triton": "tr", "date": "2026-01-01 00:00 UTC"}
    results = []

    def row(case: str, nbytes: int, trial: str, us: float) -> None:
        results.append(dict(case=case, bytes=nbytes, trial=trial, us=us, tbps=nbytes / us / 1e6,
                            frac_copy=nbytes / us / 1e6 / 3.0))

    for case, nbytes, reads in (("12/1 64k bf16", 33_554_432, {"tiles 16 KB": 13.61, "loop, 132": 17.1,
                                                                 "torch.sum": 15.2}),
                                ("96/8 4k bf16", 16_777_216, {"loop, 2112": 7.93, "tiles 8 KB": 7.64,
                                                              "torch.sum": 9.9}),
                                ("96/8 64k q4_0", 75_497_472, {"tiles 32 KB": 28.2, "torch.sum": 30.0})):
        for trial, us in reads.items():
            row(case, nbytes, trial, us)
        best = min((us, trial) for trial, us in reads.items() if trial != "torch.sum")
        row(case, nbytes, f"{best[1]} + empty second kernel", best[0] + 1.5)
        if case != "96/8 64k q4_0":
            row(case, nbytes, f"{best[1]} + empty second kernel (PDL)", best[0] + 0.7)
    row("96/8 4k bf16", 16_777_216, "empty kernel alone", 1.0)  # the decoy
    return {"environment": env, "method": "test", "results": results}


def test_stream_floor_report_from_json(tmp_path):
    """--from-json rewrites the table and chart: best plain read per case, then both two-kernel floors."""
    run = tmp_path / "floor.json"
    payload = _floor_payload()
    run.write_text(json.dumps(payload))
    done = _run("stream_floor.py", "--from-json", str(run))
    assert done.returncode == 0, done.stderr
    lines = run.with_suffix(".md").read_text().splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r[0].strip() for r in rows] == list(dict.fromkeys(r["case"] for r in payload["results"]))
    for row in rows:
        case = row[0].strip()
        mine = [r for r in payload["results"] if r["case"] == case]
        reads = [r for r in mine if "empty" not in r["trial"]]
        best = min(reads, key=lambda r: r["us"])
        assert row[2].strip() == best["trial"]
        assert float(row[3]) == pytest.approx(best["us"], abs=0.006)  # printed with two decimals
        for cell, end in ((row[6], "kernel"), (row[7], "(PDL)")):
            want = next((r for r in mine if r["trial"].endswith(end)), None)
            if want is None:
                assert cell.strip() == "—"
            else:
                assert float(cell.split()[0]) == pytest.approx(want["us"], abs=0.006)
                # An extra kernel after the read can only cost time.
                assert float(cell.split()[0]) > float(row[3])
    assert run.with_suffix(".png").stat().st_size > 1000


def _table_payload() -> dict:
    """A small decode_attention run: two batch-1 cases, one peer that could not run, quantized rows."""
    env = {"device": "test GPU", "copy_bandwidth_tbps": 3.0, "torch": "t", "triton": "tr",
           "flashinfer": "unavailable", "date": "2026-01-01 00:00 UTC"}
    rows = []
    for (hq, hkv, ctx), times in {(96, 8, 4096): {"glmtg": 12.9, "sdpa cudnn": 14.4, "sdpa flash": None,
                                                   "glmtg q8_0": 13.9, "glmtg q4_0": 12.9, "glmtg fp8": 11.6},
                                  (12, 1, 65536): {"glmtg": 19.0, "sdpa cudnn": 21.0, "sdpa flash": 23.5,
                                                   "glmtg q8_0": 18.5, "glmtg q4_0": 17.4, "glmtg fp8": 16.0}}.items():
        for impl, us in times.items():
            tbps = None if us is None else 1.0 + us / 100
            rows.append(dict(hq=hq, hkv=hkv, batch=1, ctx=ctx, impl=impl, us=us, tbps=tbps,
                             frac_copy=None if us is None else tbps / 3.0, max_abs_diff=None,
                             note="RuntimeError: no kernel" if us is None else ""))
    accuracy = [dict(data=kind, format=fmt, rel_error=err, hq=96, hkv=8, ctx=4096)
                for kind, errs in (("random", (3.6e-3, 3.7e-2)), ("outlier channels", (9.8e-3, 7.0e-2)))
                for fmt, err in zip(("bf16", "fp8"), errs)]
    return {"environment": env, "method": "test", "rows": rows, "accuracy": accuracy}


def test_decode_attention_report_from_json(tmp_path):
    """--from-json rewrites the table (speed-up over the best peer that ran), the formats table, the
    accuracy table and the chart."""
    run = tmp_path / "table.json"
    payload = _table_payload()
    run.write_text(json.dumps(payload))
    done = _run("decode_attention.py", "--from-json", str(run))
    assert done.returncode == 0, done.stderr
    text = run.with_suffix(".md").read_text()
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells and cells[0] in ("96/8", "12/1"):
            table.setdefault(cells[0], []).append(cells)
    for heads, ctx in (("96/8", 4096), ("12/1", 65536)):
        mine = {r["impl"]: r["us"] for r in payload["rows"] if f"{r['hq']}/{r['hkv']}" == heads}
        peers = [us for impl, us in mine.items() if not impl.startswith("glmtg") and us is not None]
        main, formats = table[heads]  # the peers' table first, then the formats table
        assert main[2] == f"{ctx // 1024}k"
        assert main[-1] == f"{min(peers) / mine['glmtg']:.2f}×"
        assert formats[3].startswith(f"{min(peers):.1f} (sdpa cudnn)")
        for cell, impl in zip(formats[4:], ("glmtg", "glmtg q8_0", "glmtg q4_0", "glmtg fp8")):
            assert cell.startswith(f"{mine[impl]:.1f} (") and cell.endswith(f"{min(peers) / mine[impl]:.2f}×)")
    assert table["96/8"][0][5] == "—"  # sdpa flash did not run there, and says why below
    assert "- sdpa flash: RuntimeError: no kernel (1 cases, e.g. 96/8 B1 4096)" in text
    assert "| random | 3.60e-03 | 3.70e-02 |" in text and "| outlier channels | 9.80e-03 | 7.00e-02 |" in text
    assert run.with_suffix(".png").stat().st_size > 1000


def test_stream_floor_rejects_unknown_cases():
    done = _run("stream_floor.py", "--cases", "7/1 1k bf16")
    assert done.returncode == 2 and "unknown case" in done.stderr


def test_stream_floor_rejects_missing_json(tmp_path):
    done = _run("stream_floor.py", "--from-json", str(tmp_path / "absent.json"))
    assert done.returncode == 2 and "no file" in done.stderr


@pytest.mark.parametrize("script", CLI_SCRIPTS)
def test_bench_script_answers_help_without_gpu(script):
    done = _run(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: " + script)


def test_every_cli_script_is_covered():
    """The scripts with a command line are the ones the --help test runs (a new script joins by itself)."""
    assert {"decode_attention.py", "stream_floor.py", "quant_tune.py", "sweep_bench_compare.py"} <= set(CLI_SCRIPTS)
