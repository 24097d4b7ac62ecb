"""Paths a user names: one check that a file is there and is a file, with an error that says which."""

from __future__ import annotations

import os
from pathlib import Path


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path once it names an existing regular file.

    ``what`` names the file in the error ("KL-divergence base file", "sweep-bench JSON"): a directory or
    a device is a ValueError, a missing path a FileNotFoundError, each naming the path.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file")
    return path
