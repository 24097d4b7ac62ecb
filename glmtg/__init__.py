"""glmtg: fast long-context inference for GLM4-MoE models."""

__version__ = "0.1.0"
