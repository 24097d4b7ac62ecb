"""Several processes, one model: tensor parallelism (``-sm graph``: every layer split over N processes
that sum their parts) and the layer split (``-sm layer``: each process a range of layers).

- ``group``: ``TPGroup``, this process's rank, the world size and the torch.distributed group the sums run
  through (gloo on CPU, NCCL on GPUs).
- ``linear``: ``ColumnParallelLinear`` (a slice of every named shard's output rows) and
  ``RowParallelLinear`` (a slice of the input features; partial outputs summed across ranks); both take the
  whole checkpoint tensor (``load_shard``) or only the part they keep (``kept`` / ``load_kept``: what the
  safetensors loader reads with ``get_slice``).
- ``quant_linear``: the same two over GGUF blocks (``QuantColumnParallelLinear``: raw rows;
  ``QuantRowParallelLinear``: whole blocks of the input, ``block_partition`` for widths that do not split
  evenly).
- ``model``: ``build_tp_model`` (the GLM4-MoE layout of one rank; GGUF blocks with ``weight_formats``, built
  by ``quant_model``) and ``load_from_full`` (its weights cut out of a whole model's tensors through
  ``load_tensor``, so every loader stays the same).
- ``experts``: how a rank holds the routed experts (``experts_split``): ``"width"`` (all E experts, each cut
  along its inner width, ``WidthExperts`` / ``QuantWidthExperts``) or ``"expert"`` (a range of whole ones).
- ``layer_split``: ``LayerSplitModel`` (one rank's range of layers, float or GGUF blocks with
  ``weight_formats``, activations handed on with send/recv) and ``layer_ranges`` (layers by ``-ts`` ratios).
"""

from glmtg.parallel.experts import DEFAULT_EXPERTS_SPLIT, EXPERT_SPLITS
from glmtg.parallel.group import TPGroup
from glmtg.parallel.layer_split import LayerSplitModel, layer_ranges, load_split_from_full
from glmtg.parallel.linear import ColumnParallelLinear, RowParallelLinear
from glmtg.parallel.model import ParallelMoE, build_tp_model, load_from_full, local_kv_heads
from glmtg.parallel.quant_linear import QuantColumnParallelLinear, QuantRowParallelLinear, block_partition

__all__ = ["DEFAULT_EXPERTS_SPLIT", "EXPERT_SPLITS", "ColumnParallelLinear", "LayerSplitModel", "ParallelMoE",
           "QuantColumnParallelLinear", "QuantRowParallelLinear", "RowParallelLinear", "TPGroup", "block_partition",
           "build_tp_model", "layer_ranges", "load_from_full", "load_split_from_full", "local_kv_heads"]
