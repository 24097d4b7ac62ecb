"""Decode attention: the Triton kernel (kernel.py) and merge (merge.py), the launch planner with its
per-architecture table (plan.py), the CUDA loop for deep quantized caches (cuda_loop.py, cuda/), and the
checked launcher (launch.py). Prefill attention: the causal chunk kernel (prefill.py) and its launcher
(prefill_launch.py), which reuse the decode kernel's tile step."""

from glmtg.formats import KV_FORMATS  # the formats the launcher reads (glmtg.formats is their home)
from glmtg.kernels.attention.launch import MAX_GROUP, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, decode_attention
from glmtg.kernels.attention.plan import (
    ARCH_PLANS,
    ArchPlan,
    DecodeLaunch,
    Target,
    cuda_loop_launch,
    plan_format,
    plan_launch,
)
from glmtg.kernels.attention.prefill_launch import PREFILL_HEAD_DIMS, PrefillLaunch, plan_prefill, prefill_attention

__all__ = ["ARCH_PLANS", "KV_FORMATS", "MAX_GROUP", "PREFILL_HEAD_DIMS", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS",
           "ArchPlan", "DecodeLaunch", "PrefillLaunch", "Target", "cuda_loop_launch", "decode_attention", "plan_format",
           "plan_launch", "plan_prefill", "prefill_attention"]
