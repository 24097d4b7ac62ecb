"""ModelConfig from a GGUF file, with the embedding and output head checked against it."""

from __future__ import annotations

import os

from glmtg.config import ModelConfig
from glmtg.loading.gguf import GGUFFile, open_gguf


def gguf_config(source: str | os.PathLike | GGUFFile) -> ModelConfig:
    """The config of a GGUF file (a path, opened and closed here, or an open ``GGUFFile``).

    Beyond ``ModelConfig.from_gguf`` it checks the shapes that tie the metadata to the weights: the token
    embedding and (when present) the output head must be ``[vocab_size, hidden_size]``, so that a token
    list that disagrees with the embedding fails here rather than as an out-of-range row later.
    """
    if isinstance(source, GGUFFile):
        return _checked(source)
    with open_gguf(source) as f:
        return _checked(f)


def _checked(f: GGUFFile) -> ModelConfig:
    config = ModelConfig.from_gguf(f.metadata, f.tensors.keys())
    want = (config.vocab_size, config.hidden_size)
    for name in ("token_embd.weight", "output.weight"):
        info = f.tensors.get(name)
        if info is None and name == "output.weight":
            continue  # tied head: the embedding serves as the output
        if info is None:
            raise ValueError(f"{f.paths[0]}: tensor {name!r} is missing")
        if info.shape != want:
            raise ValueError(f"{f.paths[0]}: tensor {name!r} has shape {list(info.shape)}, expected "
                             f"[vocab_size, hidden_size] = {list(want)}")
    return config
