"""Fixtures shared by the kernel tests (test modules import no other test module)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def compile_report():
    """``run(script, timeout)``: run a compile-for-sm_90 test file as a script, outside the Triton interpreter
    (it compiles, it does not run), assert it exited 0, and return (stdout, the cells of every markdown
    table row it printed)."""

    def run(script: str, timeout: int) -> tuple[str, list[list[str]]]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=timeout)
        assert done.returncode == 0, f"a kernel failed to compile for sm_90:\n{done.stdout}\n{done.stderr[-3000:]}"
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
                if line.startswith("|")]
        return done.stdout, rows

    return run
