"""glmtg/kernels/pdl.py on a CPU: never enabled off CUDA, modes checked, ``mode()`` restores the previous one."""

from __future__ import annotations

import pytest
import torch

from glmtg.kernels import pdl


def test_never_enabled_off_cuda():
    for m in pdl.MODES:
        with pdl.mode(m):
            assert not pdl.enabled(torch.device("cpu"))
            assert pdl.launch_kwargs(torch.device("cpu")) == {}


def test_mode_restores_and_rejects_unknown():
    before = pdl._switch.value
    with pytest.raises(ValueError, match="the PDL mode.* must be one of"):
        pdl.set_mode("sometimes")
    with pdl.mode("off"):
        assert pdl._switch.value == "off"
        with pytest.raises(ValueError, match="sometimes"):
            with pdl.mode("sometimes"):
                pass
        assert pdl._switch.value == "off"
    assert pdl._switch.value == before
