"""Model calls through litellm: the only module that imports it.

litellm costs ~4 s and ~180 MB to import, so it is imported on first use, never on the
server's start-up path. Its exceptions are mapped here to :class:`ModelError` with a message
that says what to set or change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

from rlm_mcp.config import Settings
from rlm_mcp.errors import ModelError

log = logging.getLogger(__name__)

KEY_HINT = ("set the provider's API key in the server's environment (e.g. OPENAI_API_KEY, "
            "ANTHROPIC_API_KEY, OPENROUTER_API_KEY), or RLM_MCP_API_KEY for an OpenAI-compatible "
            "server at RLM_MCP_API_BASE")
MODEL_HINT = ("use a litellm model string with its provider prefix, e.g. 'openai/gpt-4.1-mini', "
              "'anthropic/claude-sonnet-4-5', 'ollama/llama3.1', or 'openai/<name>' with "
              "RLM_MCP_API_BASE for any OpenAI-compatible server")


@dataclass(frozen=True)
class Completion:
    """One model reply with what it cost."""

    model: str
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    elapsed_s: float


class Models(Protocol):
    """What the engine needs of a model client: :class:`ModelClient` (litellm), or the scripted
    ``rlm_mcp.testing.fake_models.FakeModelClient`` in tests of the loop."""

    def check_model(self, model: str | None) -> str: ...

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion: ...


def _load_litellm() -> Any:
    # The cost map would otherwise be fetched from the network at import; ours is offline.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    # litellm logs every call at INFO on its own handler; keep stderr for our progress.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


class ModelClient:
    """Async completions for any litellm provider, with retries and error mapping."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._litellm: Any = None
        self._unpriced: set[str] = set()

    @property
    def litellm(self) -> Any:
        if self._litellm is None:
            self._litellm = _load_litellm()
        return self._litellm

    def check_model(self, model: str | None) -> str:
        """Return the model string if litellm can route it, else raise ModelError."""
        if not model or not model.strip():
            raise ModelError("no model configured: set RLM_MCP_MODEL (or pass model=...); " + MODEL_HINT)
        try:
            self.litellm.get_llm_provider(model=model, api_base=self.settings.api_base)
        except Exception as exc:  # litellm raises BadRequestError for unknown providers
            raise ModelError(f"unknown model {model!r}: {MODEL_HINT}") from exc
        return model

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
        """One chat completion; retries 429, 5xx, timeouts and connection errors with backoff."""
        litellm = self.litellm
        kwargs: dict[str, Any] = {"timeout": self.settings.model_timeout_s, "num_retries": 0}
        if self.settings.api_base:
            kwargs["api_base"] = self.settings.api_base
        if self.settings.api_key:
            kwargs["api_key"] = self.settings.api_key
        attempts = self.settings.model_retries + 1
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            try:
                response = await litellm.acompletion(model=model, messages=messages, **kwargs)
            except Exception as exc:
                retryable, message = self._classify(model, exc)
                if not retryable or attempt == attempts:
                    suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
                    raise ModelError(message + suffix) from exc
                delay = min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
                log.warning("model call failed (%s); retry %d/%d in %.1fs", message, attempt,
                            attempts - 1, delay)
                await asyncio.sleep(delay)
                continue
            return self._to_completion(model, response, time.perf_counter() - started)
        raise AssertionError("unreachable")

    def _to_completion(self, model: str, response: Any, elapsed: float) -> Completion:
        try:
            text = response.choices[0].message.content
        except (AttributeError, IndexError) as exc:
            raise ModelError(f"{model} returned a reply with no message: {str(response)[:200]}") from exc
        if text is None:
            raise ModelError(f"{model} returned an empty reply (no text content)")
        usage = getattr(response, "usage", None)
        input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        return Completion(model, str(text), input_tokens, output_tokens, self._cost(model, response), elapsed)

    def _cost(self, model: str, response: Any) -> float | None:
        """USD for one reply, from litellm's price tables; None when it has no price."""
        hidden = getattr(response, "_hidden_params", None) or {}
        if isinstance(hidden.get("response_cost"), (int, float)):
            return float(hidden["response_cost"])  # litellm priced it already while logging
        if model in self._unpriced:
            return None  # pricing is ~3 ms of CPU per call: do not retry a known miss
        try:
            return float(self.litellm.completion_cost(completion_response=response))
        except Exception:
            self._unpriced.add(model)
            return None

    def _classify(self, model: str, exc: Exception) -> tuple[bool, str]:
        """(retryable?, message for the user) for a litellm exception."""
        errors = self.litellm.exceptions
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if isinstance(exc, errors.AuthenticationError) or "api_key" in str(exc).lower():
            return False, f"{model}: authentication failed: {KEY_HINT}"
        if isinstance(exc, errors.ContextWindowExceededError):
            return False, f"{model}: the prompt is longer than the model's context window ({detail})"
        if isinstance(exc, errors.RateLimitError):
            return True, f"{model}: rate limited by the provider ({detail})"
        if isinstance(exc, errors.Timeout):
            return True, f"{model}: no reply within {self.settings.model_timeout_s:g} s"
        if isinstance(exc, (errors.APIConnectionError, errors.InternalServerError,
                            errors.ServiceUnavailableError, errors.BadGatewayError)):
            return True, f"{model}: provider unavailable ({detail})"
        if isinstance(exc, errors.NotFoundError):
            return False, f"{model}: the provider does not know this model ({detail}); {MODEL_HINT}"
        if isinstance(exc, errors.BadRequestError) and "provider" in str(exc).lower():
            return False, f"unknown model {model!r}: {MODEL_HINT}"
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and (status == 429 or status >= 500):
            return True, f"{model}: provider error {status} ({detail})"
        return False, f"{model}: {type(exc).__name__}: {detail}"
