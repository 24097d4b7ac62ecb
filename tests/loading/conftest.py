"""Fixtures of the loading tests."""

import importlib

import pytest


@pytest.fixture(scope="session")
def hf_helpers():
    """The transformers reference model and checkpoint helpers of tests/model (their one home), as a fixture
    so that test modules import no other test module."""
    return importlib.import_module("tests.model.helpers")
