"""CPU checks of benchmark report code that needs no GPU (the numbers themselves come from the H100)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # the scripts import bench/common.py as a sibling
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_stream_floor_report_from_json(tmp_path, monkeypatch):
    """--from-json rewrites the table and chart: best plain read per case, then both two-kernel floors."""
    floor = _load("stream_floor")
    run = tmp_path / "floor.json"
    shutil.copy(BENCH / "results" / "stream_floor_2026-11-25.json", run)
    monkeypatch.setattr(sys, "argv", ["stream_floor.py", "--from-json", str(run)])
    assert floor.main() == 0
    lines = run.with_suffix(".md").read_text().splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "---" not in line][1:]
    payload = json.loads(run.read_text())
    assert [r[0].strip() for r in rows] == list(dict.fromkeys(r["case"] for r in payload["results"]))
    for row in rows:
        case = row[0].strip()
        reads = [r["us"] for r in payload["results"] if r["case"] == case and "empty" not in r["trial"]]
        assert float(row[3]) == pytest.approx(min(reads), abs=0.006)
        # An extra kernel after the read can only cost time.
        assert float(row[6].split()[0]) > float(row[3]) and float(row[7].split()[0]) > float(row[3])
    assert run.with_suffix(".png").stat().st_size > 1000


def test_stream_floor_rejects_unknown_cases(monkeypatch, capsys):
    floor = _load("stream_floor")
    monkeypatch.setattr(sys, "argv", ["stream_floor.py", "--cases", "7/1 1k bf16"])
    with pytest.raises(SystemExit) as exc:
        floor.main()
    assert exc.value.code == 2 and "unknown case" in capsys.readouterr().err
