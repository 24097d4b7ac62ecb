import pytest

from tests.references.fake_serve import live_server


@pytest.fixture(scope="module")
def server():
    """One live server (url, fake engine, async engine) shared by a test module's happy-path tests."""
    with live_server({"step_delay": 0.002}) as s:  # 2 ms steps: aborts arrive before the end
        yield s
