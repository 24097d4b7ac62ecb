"""Kernels that read GGUF weight blocks in place (llama.cpp's block formats), never a dequantized copy.

Three families (for decode, ``dispatch.py`` picks float decode or integer dot products per format):

- float decode: ``decode.py`` (+ ``decode_kquants.py``, ``decode_iq.py``) holds one Triton block decoder per
  GGUF type behind one dispatcher (``decode_blocks``, values bit-exact with ``gguf``); ``dequant.py`` (whole
  rows, for prefill), ``gemv.py`` and ``moe.py`` (decode) call it, so a type added there is read by all.
- prefill (many tokens): ``mmq.py`` (dense) and ``mmq_moe.py`` (experts grouped by expert) decode tiles of
  blocks in registers with the same decoders and feed them to tensor-core dots (``tl.dot``).
- integer dot products: ``mmvq.py`` and ``mmvq_moe.py`` round x to int8 per 32 values and multiply packed
  weight codes with dp4a (``words*.py`` build the code words per type): about 2 instructions a weight value
  instead of 7-13, the decode path for every format they read (bench/DECISIONS.md H).
"""
