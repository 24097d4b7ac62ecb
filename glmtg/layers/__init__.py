"""Building blocks of the models: each knows shapes and arithmetic, nothing of files, caches' layouts or the CLI.

- linear: the projection seam (dense today; quantized and tensor-parallel shards plug in here), with
  fused projections filled shard by shard at load time.
- norm, rope: RMSNorm and partial NeoX rotary embedding.
- attention: the attention module and its three backends (glmtg kernel, torch SDPA, eager reference).
- mlp: the SwiGLU feed-forward block.
- moe: router, routed experts (with their placement) and the MoE block.
"""
