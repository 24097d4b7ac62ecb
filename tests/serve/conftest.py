import pytest


@pytest.fixture(scope="module")
def server():
    """One live server (url, fake engine, async engine) shared by a test module's happy-path tests."""
    # imported here: the GPU tests of this folder (graphs, runner) run where uvicorn is not installed
    from tests.references.fake_serve import live_server

    with live_server({"step_delay": 0.002}) as s:  # 2 ms steps: aborts arrive before the end
        yield s
