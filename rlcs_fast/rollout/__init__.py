"""Rollout engines: one protocol (``RolloutEngine``), a transformers engine and a vLLM engine."""
