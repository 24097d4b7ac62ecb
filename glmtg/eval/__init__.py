"""Evaluation and measurement on an engine: perplexity, KL divergence, sweep-bench, streaming detokenization.

Library code: the CLI and bench scripts call it; it never prints.
"""
