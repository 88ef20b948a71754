"""Errors rlm-mcp raises. Every message is written for the person or model that reads it:
it says what went wrong and what to do next."""

from __future__ import annotations


class RlmError(Exception):
    """Base class: anything the user or host model should see as a plain message."""


class ConfigError(RlmError):
    """A setting, argument or limit is missing, contradictory or out of range."""


class ModelError(RlmError):
    """A model provider call failed (after retries), or the model string is unusable."""


class SandboxError(RlmError):
    """A sandbox could not be started, reached or used."""


class ContextError(RlmError):
    """A context could not be loaded, found or read."""


class RunNotFound(RlmError):
    """No run with that id."""


class LimitExceeded(RlmError):
    """A run limit was hit; ``limit`` names it (e.g. ``max_cost_usd``)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit
