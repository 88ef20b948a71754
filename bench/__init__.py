"""Benchmarks for rlm-mcp, side by side with the reference RLM implementation: ``python -m bench``."""
