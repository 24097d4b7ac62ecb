"""Routed experts computed on the CPU from GGUF blocks in system RAM (issue 21's CPU expert kernel).

``cpu_moe`` (glmtg/cpu/experts.py) is the one fused call per MoE layer; ``CPU_FORMATS`` the block formats
it reads; ``physical_cores`` its default thread count; ``kernel_isa`` which code path the build uses. The C kernel is built at first use
(glmtg/cpu/build.py); without a compiler a slower torch path runs, with one RuntimeWarning saying so.

``glmtg.cpu.placement`` parses llama.cpp's --cpu-moe / --n-cpu-moe / -ot into the layers whose experts live
in host memory; ``glmtg.cpu.host_experts.HostExperts`` holds such a layer's blocks in one host arena and
runs them with ``cpu_moe`` (imported from there: they depend on glmtg.layers); with CUDA inputs as CUDA host
nodes queued on the stream (``glmtg.cpu.host_node``), so that the decode step stays one CUDA graph.
"""

from glmtg.cpu.build import kernel_isa
from glmtg.cpu.experts import CPU_FORMATS, cpu_moe, physical_cores

__all__ = ["CPU_FORMATS", "cpu_moe", "kernel_isa", "physical_cores"]
