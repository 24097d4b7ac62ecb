"""`glmtg perplexity` run through the CLI's main on a CPU, for the split-mode tests: one process against
several ranks must print the same final estimate."""

from __future__ import annotations

import re

from glmtg.cli import main

# a short float32 run on the CPU: two chunks of 32 tokens, f16 cache, no warm-up
PPL_FLAGS = ["-c", "32", "-ub", "32", "--chunks", "2", "--device", "cpu", "--dtype", "f32", "-ctk", "f16",
             "--no-warmup"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def final_ppl(capfd, *argv: str) -> str:
    """The printed final PPL of ``glmtg perplexity ARGV`` (asserting it ran and printed it once: rank 0 alone)."""
    rc = main(list(argv))
    out, err = capfd.readouterr()
    assert rc == 0, err
    found = re.findall(r"Final estimate: PPL = ([\d.]+)", out)
    assert len(found) == 1, out
    return found[0]
