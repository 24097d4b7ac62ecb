"""``glmtg serve``: an OpenAI-compatible server with continuous batching.

Layers, bottom up: sequence / block_manager / scheduler / llm_engine (plain Python, no torch), the model
runner (torch, owns the KV page pool), the async bridge (one engine thread), the HTTP app (FastAPI), and
the GLM-specific chat rendering and output parsing. Nothing is imported here, so the torch-free core can
be imported without pulling in torch or the HTTP stack.
"""
