"""The direct path to OpenAI-compatible endpoints (``openai/<name>`` with ``RLM_MCP_API_BASE``):
one POST per call over a kept-alive aiohttp session. The only module that imports aiohttp.

Why: litellm spends ~2.5 ms of CPU per call on work a sub-call does not need (a logging object,
its own cost calculation, the OpenAI SDK's request building, a pydantic response); this path
spends ~0.1 ms (measured with ``python -m bench.subcall_cost``). It is chosen over httpx by the
same measurement (httpx: ~2.3 ms per call). Everything users see is the same as through litellm:
the failures map to the same :class:`~rlm_mcp.engine.failures.Failure` messages, usage comes
from the reply, cost from litellm's price table (priced once per model, in ``models``).
``RLM_MCP_MODEL_CLIENT=litellm`` turns this path off.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import aiohttp

from rlm_mcp.config import Settings
from rlm_mcp.engine.failures import (Failure, auth_failure, context_failure, not_found, rate_limited,
                                     timeout_failure, unavailable)
from rlm_mcp.engine.limiter import retry_after_s
from rlm_mcp.errors import ModelError

CONTEXT_MARKERS = ("context_length_exceeded", "context length", "context window", "maximum context",
                   "too many tokens", "prompt is too long")


class DirectClient:
    """Chat completions against ``settings.api_base``; one session per event loop."""

    def __init__(self, settings: Settings) -> None:
        assert settings.api_base
        self.settings = settings
        self.url = settings.api_base.rstrip("/") + "/chat/completions"
        # The key litellm would send on this route: RLM_MCP_API_KEY, else the OpenAI variable
        # litellm itself reads from the environment (provider keys are litellm's, not config's).
        key = settings.api_key or os.environ.get("OPENAI_API_KEY")
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self._has_key = bool(key)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            # A session belongs to the loop that made it (tests run one loop each).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),  # the adaptive limiter bounds concurrency
                timeout=aiohttp.ClientTimeout(total=self.settings.model_timeout_s))
            self._loop = loop
        return self._session

    async def complete(self, model: str, messages: list[dict[str, str]]) -> tuple[str, int, int]:
        """(text, input tokens, output tokens), or raise Failure / ModelError."""
        if not self._has_key:  # litellm (the OpenAI SDK) refuses this route without a key too
            raise auth_failure(model)
        name = model.split("/", 1)[1]
        body = json.dumps({"model": name, "messages": messages}).encode()
        session = self._session_for_loop()
        try:
            async with session.post(self.url, data=body, headers=self.headers) as response:
                raw = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError as exc:
            raise timeout_failure(model, self.settings.model_timeout_s) from exc
        except aiohttp.ClientError as exc:
            raise unavailable(model, f"{type(exc).__name__}: {exc}"[:300], None, None) from exc
        if status != 200:
            raise _failure(model, status, raw, headers)
        return _read_reply(model, raw)

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def _error_detail(status: int, raw: bytes) -> str:
    try:
        error = json.loads(raw).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = raw[:300].decode("utf-8", "replace")
    text = str(message or "").splitlines()[0][:300] if message else ""
    return f"status {status}: {text}" if text else f"status {status}"


def _failure(model: str, status: int, raw: bytes, headers: Any) -> Failure:
    detail = _error_detail(status, raw)
    wait = retry_after_s(headers)
    if status in (401, 403):
        return auth_failure(model)
    if status == 404:
        return not_found(model, detail)
    if status == 429:
        return rate_limited(model, detail, wait)
    if status == 408:  # litellm maps it to Timeout as well
        return Failure(f"{model}: the provider timed out ({detail})", retryable=True)
    if status >= 500:
        return unavailable(model, detail, status, wait)
    if status in (400, 413, 422) and any(marker in detail.lower() for marker in CONTEXT_MARKERS):
        return context_failure(model, detail)
    if status == 400:
        return Failure(f"{model}: BadRequestError: {detail}", retryable=False)
    return Failure(f"{model}: provider error {status} ({detail})", retryable=False)


def _read_reply(model: str, raw: bytes) -> tuple[str, int, int]:
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"{model} returned a reply that is not JSON: {raw[:200]!r}") from exc
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ModelError(f"{model} returned a reply with no message: {str(reply)[:200]}") from exc
    if text is None:
        raise ModelError(f"{model} returned an empty reply (no text content)")
    usage = reply.get("usage") if isinstance(reply, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    return str(text), _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0
