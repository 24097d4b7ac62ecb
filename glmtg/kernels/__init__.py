"""Triton kernels, one op per module. Import the module you need; nothing is imported eagerly."""
