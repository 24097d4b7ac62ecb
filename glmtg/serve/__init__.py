"""glmtg serve: an OpenAI-compatible server with continuous batching (issue 18).

Nothing is imported here so that the torch-free core (sequence, block_manager, scheduler,
llm_engine) can be imported without pulling in torch or the HTTP stack.
"""
