import pytest

from tests.references.cli_ppl import TEXT


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A short text for `glmtg perplexity -f` (the split-mode tests)."""
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT)
    return path
