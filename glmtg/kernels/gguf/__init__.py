"""Kernels that read GGUF weight blocks in place (llama.cpp's block formats), never a dequantized copy.

``decode.py`` holds one Triton block decoder per GGUF type behind one dispatcher (``decode_blocks``);
every kernel here (``dequant.py`` for whole rows, the GEMV and the fused MoE decode) calls it, so a type
added there is read by all of them.
"""
