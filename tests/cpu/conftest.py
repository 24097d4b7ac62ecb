"""Shared by the CPU-expert tests: the C kernels they build go to a temporary cache, not the user's."""

import pytest


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Kernels built for these tests go to a temporary cache, not the user's."""
    monkeypatch.setenv("GLMTG_CACHE", str(tmp_path_factory.getbasetemp() / "glmtg-cache"))
