"""CUDA sources and their prebuilt fatbins (see build.py)."""
