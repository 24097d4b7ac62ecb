"""Building blocks of the models: each knows shapes and arithmetic, nothing of files, caches' layouts or the CLI.

- linear: the projection seam (dense; tensor-parallel shards plug in here), with fused projections
  filled shard by shard at load time.
- quant_linear, quant_experts: the same seams over GGUF blocks kept as they are (QuantLinear,
  QuantEmbedding, QuantExperts), read by glmtg/kernels/gguf at decode and dequantized a matrix at a time
  for prefill.
- norm, rope: RMSNorm and partial NeoX rotary embedding.
- attention: the attention module and its three backends (glmtg kernel, torch SDPA, eager reference).
- mlp: the SwiGLU feed-forward block.
- moe: router, routed experts (with their placement) and the MoE block.
"""
