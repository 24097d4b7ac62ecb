"""``glmtg serve``: an OpenAI-compatible server with continuous batching (issue 18).

Layers, bottom up: sequence/scheduler/engine (plain Python), the model runner (torch), the async bridge,
the HTTP app. Importing this package imports nothing heavy.
"""
