"""The lm_head split by vocabulary rows under ``-sm graph``: each rank computes V/N logits, one all-gather
joins them.

The head is the largest single matrix a decode token reads (GLM-4.5-Air: 151552 x 4096; ~0.5 GB in q6_k). A
replicated head costs every rank the whole read, which a tensor-parallel step cannot hide; split, each rank
reads 1/N of it and the gathered logits (a few hundred KB) cost one collective. Every rank still ends with
the whole logits, so sampling stays the same on every rank.

The head keeps the whole model's slot (``lm_head.weight``, whole shape): loaders hand every rank the whole
tensor or, through ``kept``, its rows. A vocabulary that N does not divide, or a head tied to the embedding,
stays replicated (``vocab_parallel_head`` returns the head unchanged).
"""

from __future__ import annotations

import torch

from glmtg.config import ModelConfig
from glmtg.layers.linear import Linear
from glmtg.layers.quant_linear import QuantLinear
from glmtg.parallel.group import TPGroup
from glmtg.parallel.linear import ColumnParallelLinear
from glmtg.parallel.quant_linear import QuantColumnParallelLinear


class _GatherVocab:
    """forward: this rank's rows of the logits, then every rank's side by side (rank order = row order)."""

    tp: TPGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last(super().forward(x))  # type: ignore[misc]


class VocabParallelHead(_GatherVocab, ColumnParallelLinear):
    """A float head, rank r holding vocabulary rows [r V/N, (r+1) V/N)."""


class QuantVocabParallelHead(_GatherVocab, QuantColumnParallelLinear):
    """A head in GGUF blocks (rows are whole in any format), rank r holding rows [r V/N, (r+1) V/N)."""


def vocab_parallel_head(head: Linear, config: ModelConfig, tp: TPGroup, dtype: torch.dtype,
                        backend: str = "auto") -> Linear:
    """``head`` (the whole model's, on meta) split by vocabulary rows over ``tp``; ``head`` itself when one
    rank holds everything, the embedding is tied to it, or N does not divide the vocabulary."""
    v = config.vocab_size
    if tp.world_size == 1 or config.tie_word_embeddings or v % tp.world_size:
        return head
    if isinstance(head, QuantLinear):
        return QuantVocabParallelHead(head.in_features, v, cuts={None: tp.part(v, "vocab_size")}, bias=False,
                                      formats=head.formats, dtype=dtype, tp=tp, backend=backend)
    return VocabParallelHead(head.in_features, v, bias=False, dtype=dtype, tp=tp)
