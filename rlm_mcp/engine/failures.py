"""How a failed model call is described, the same on both paths (litellm and the direct HTTP
path): the message users see (what to set or change) and whether to try again."""

from __future__ import annotations

from dataclasses import dataclass

KEY_HINT = ("set the provider's API key in the server's environment (e.g. OPENAI_API_KEY, "
            "ANTHROPIC_API_KEY, OPENROUTER_API_KEY), or RLM_MCP_API_KEY for an OpenAI-compatible "
            "server at RLM_MCP_API_BASE")
MODEL_HINT = ("use a litellm model string with its provider prefix, e.g. 'openai/gpt-4.1-mini', "
              "'anthropic/claude-sonnet-4-5', 'ollama/llama3.1', or 'openai/<name>' with "
              "RLM_MCP_API_BASE for any OpenAI-compatible server")
OVERLOAD_STATUSES = frozenset({429, 503, 529})  # the provider says "fewer calls, please"


@dataclass(eq=False)
class Failure(Exception):
    """One failed attempt, classified: the message users see, and whether to try again."""

    message: str
    retryable: bool
    overloaded: bool = False  # 429/503/529: the limiter backs off
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return self.message


# The messages users see, shared by both paths (litellm and direct).

def auth_failure(model: str) -> Failure:
    return Failure(f"{model}: authentication failed: {KEY_HINT}", retryable=False)


def context_failure(model: str, detail: str) -> Failure:
    return Failure(f"{model}: the prompt is longer than the model's context window ({detail})", retryable=False)


def rate_limited(model: str, detail: str, wait: float | None) -> Failure:
    return Failure(f"{model}: rate limited by the provider ({detail})", retryable=True, overloaded=True,
                   retry_after_s=wait)


def timeout_failure(model: str, timeout_s: float) -> Failure:
    return Failure(f"{model}: no reply within {timeout_s:g} s", retryable=True)


def unavailable(model: str, detail: str, status: int | None, wait: float | None) -> Failure:
    return Failure(f"{model}: provider unavailable ({detail})", retryable=True,
                   overloaded=status in OVERLOAD_STATUSES, retry_after_s=wait)


def not_found(model: str, detail: str) -> Failure:
    return Failure(f"{model}: the provider does not know this model ({detail}); {MODEL_HINT}", retryable=False)
