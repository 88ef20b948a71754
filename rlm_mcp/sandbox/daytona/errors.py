"""Daytona SDK failures as messages that say what to do, and the loss of a worker's channel."""

from __future__ import annotations

import asyncio

from daytona.common.errors import (
    DaytonaAuthenticationError,
    DaytonaConnectionError,
    DaytonaForbiddenError,
    DaytonaRateLimitError,
    DaytonaTimeoutError,
)

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.channel import WorkerGone

class ChannelLost(WorkerGone, SandboxError):
    """The session channel to the worker failed: a worker loss to the REPL, a clear run error
    to whoever called ``execute``."""


def describe_error(exc: BaseException, doing: str, settings: Settings) -> str:
    """An actionable message for a Daytona SDK or transport failure while ``doing`` something."""
    detail = str(exc).strip() or type(exc).__name__
    url = settings.daytona_api_url or "https://app.daytona.io/api"
    if isinstance(exc, DaytonaAuthenticationError):
        return (f"Daytona rejected the API key while {doing} ({detail}): check DAYTONA_API_KEY "
                f"(and DAYTONA_API_URL, now {url}).")
    if isinstance(exc, DaytonaForbiddenError):
        return f"Daytona refused the request while {doing} ({detail}): the API key lacks the permission."
    if isinstance(exc, DaytonaRateLimitError):
        return (f"Daytona rate-limited the request while {doing} ({detail}): wait a minute and "
                "retry, or run fewer runs at once (RLM_MCP_MAX_RUNS).")
    if isinstance(exc, (DaytonaTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return (f"the Daytona API did not answer in time while {doing} ({detail}); check Daytona's "
                f"status and the network path to {url}, then retry.")
    if isinstance(exc, DaytonaConnectionError):
        return f"cannot reach the Daytona API at {url} while {doing} ({detail}): check DAYTONA_API_URL and the network."
    return f"Daytona API error while {doing}: {detail}"
