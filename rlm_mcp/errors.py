"""Errors rlm-mcp raises. Every message is written for the person or model that reads it:
it says what went wrong and what to do next."""

from __future__ import annotations

import errno


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


QUOTE_CHARS = 80


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of a user-supplied value for an error message or log line, cut to ``limit``
    characters with the full length noted: messages echo inputs, and an input can be 10 MB."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    shown = repr(text[:limit]) if isinstance(value, str) else text[:limit]
    return f"{shown}... ({len(text):,} characters)"


def describe_os_error(exc: OSError, doing: str, where: object | None = None) -> str:
    """A message for an OSError met while ``doing`` something (e.g. "storing the context"),
    with what to do about it. ``where`` names the directory involved; the exception's own
    file name is not echoed whole (it may be an input)."""
    place = f" in {where}" if where is not None else ""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"{doing} failed: no space left on the disk{place} (the server's data directory). Free space "
                "there, or delete contexts no longer needed with rlm_delete_context, then retry")
    if exc.errno == errno.ENAMETOOLONG:
        return f"{doing} failed: a file name is too long ({quoted(exc.filename)}): use a shorter path"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"{doing} failed: permission denied{place}: the user running the rlm-mcp server must be "
                "able to read and write there")
    if exc.errno == errno.EROFS:
        return f"{doing} failed: the file system{place} is read-only: point RLM_MCP_HOME at a writable directory"
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return f"{doing} failed: the server has too many files open: retry shortly, with fewer runs at once"
    return f"{doing} failed: {reason}{place}: check {'that directory' if where else 'the path'}, then retry"
