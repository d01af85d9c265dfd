"""Serving a Quiet-STaR model: continuous batching on a worker thread that owns the model (batcher.py) behind an
OpenAI-compatible HTTP API (openai_api.py), started by `qstar serve`."""
