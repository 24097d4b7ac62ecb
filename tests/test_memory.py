"""Available memory and the up-front fit check."""

import pytest
import torch

from glmtg import memory


def test_host_memory_is_reported():
    free = memory.available_bytes("cpu")
    assert 0 < free < 2**60


def test_check_fits_names_the_request_and_sizes(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 3 * 10**9)
    memory.check_fits("the thing", 3 * 10**9, "cpu")  # exactly what is there fits
    with pytest.raises(ValueError, match=r"^the thing needs 3\.50 GB but only 3\.00 GB of host \(CPU\) memory is "
                                         r"available; try less$"):
        memory.check_fits("the thing", 3_500_000_000, "cpu", "try less")


def test_meta_device_has_no_memory():
    with pytest.raises(ValueError, match="meta"):
        memory.available_bytes(torch.device("meta"))
