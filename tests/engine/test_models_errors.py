"""Each litellm exception maps to a message that says what to set or change, and to whether the
call is worth retrying. The exceptions are litellm's own classes, built as litellm builds them
(nothing in litellm is patched); the end-to-end path (an HTTP 401 becoming the key hint, retries
of 5xx) is tested against the scripted model server in test_engine.py."""

from __future__ import annotations

import httpx
import pytest

from rlm_mcp.config import Settings
from rlm_mcp.engine.failures import KEY_HINT, MODEL_HINT
from rlm_mcp.engine.models import ModelClient

MODEL = "openai/some-model"


@pytest.fixture(scope="module")
def client() -> ModelClient:
    client = ModelClient(Settings(model_timeout_s=42))
    wait_ready = getattr(client, "wait_ready", None)
    if wait_ready is not None:  # litellm loads in a warm-up thread; this waits for it
        wait_ready(120)
    return client


def classify(client: ModelClient, exc: Exception) -> tuple[bool, str]:
    """(retryable, message) from the client's classification."""
    failure = client._classify(MODEL, exc)
    if isinstance(failure, tuple):  # (retryable, message)
        return failure
    return failure.retryable, failure.message


def error(client: ModelClient, name: str, message: str = "the provider said no", **extra):
    cls = getattr(client.litellm.exceptions, name)
    return cls(message=message, llm_provider="openai", model=MODEL, **extra)


def response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("POST", "https://provider.invalid/v1/chat/completions"))


def test_an_authentication_error_names_the_key_variables(client):
    retryable, message = classify(client, error(client, "AuthenticationError", "Incorrect API key provided"))
    assert not retryable
    assert message == f"{MODEL}: authentication failed: {KEY_HINT}"
    for variable in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "RLM_MCP_API_KEY", "RLM_MCP_API_BASE"):
        assert variable in message


def test_any_error_that_mentions_the_api_key_is_an_authentication_error(client):
    exc = error(client, "BadRequestError", "The api_key client option must be set")
    assert classify(client, exc) == (False, f"{MODEL}: authentication failed: {KEY_HINT}")


def test_a_context_window_error_says_the_prompt_is_too_long(client):
    retryable, message = classify(client, error(client, "ContextWindowExceededError", "maximum context length is 8192"))
    assert not retryable
    assert "longer than the model's context window" in message and "8192" in message


def test_a_rate_limit_is_retried(client):
    retryable, message = classify(client, error(client, "RateLimitError", "slow down"))
    assert retryable and message.startswith(f"{MODEL}: rate limited by the provider") and "slow down" in message


def test_a_timeout_is_retried_and_names_the_timeout_setting_value(client):
    retryable, message = classify(client, error(client, "Timeout", "Request timed out"))
    assert (retryable, message) == (True, f"{MODEL}: no reply within 42 s")


@pytest.mark.parametrize("name, extra", [
    ("APIConnectionError", {}),
    ("InternalServerError", {"response": response(500)}),
    ("ServiceUnavailableError", {"response": response(503)}),
    ("BadGatewayError", {"response": response(502)}),
])
def test_an_unavailable_provider_is_retried(client, name, extra):
    retryable, message = classify(client, error(client, name, "upstream down", **extra))
    assert retryable and message.startswith(f"{MODEL}: provider unavailable (") and "upstream down" in message


def test_an_unknown_model_at_the_provider_says_how_to_write_model_strings(client):
    retryable, message = classify(client, error(client, "NotFoundError", "The model does not exist"))
    assert not retryable
    assert "does not know this model" in message and MODEL_HINT in message


def test_a_bad_request_about_the_provider_is_an_unknown_model(client):
    exc = error(client, "BadRequestError", "LLM Provider NOT provided. Pass in the LLM provider you are trying to call")
    assert classify(client, exc) == (False, f"unknown model {MODEL!r}: {MODEL_HINT}")


@pytest.mark.parametrize("status, retryable", [(429, True), (500, True), (529, True), (418, False)])
def test_other_errors_are_retried_by_their_status(client, status, retryable):
    exc = client.litellm.exceptions.APIError(status_code=status, message="odd failure", llm_provider="openai",
                                             model=MODEL)
    got_retryable, message = classify(client, exc)
    assert got_retryable is retryable and "odd failure" in message


def test_an_unrecognised_exception_names_its_type_and_only_the_first_line(client):
    retryable, message = classify(client, ValueError("first line\n" + "secret second line " * 50))
    assert (retryable, message) == (False, f"{MODEL}: ValueError: first line")


def test_a_long_provider_message_is_cut_to_300_characters(client):
    _, message = classify(client, error(client, "RateLimitError", "x" * 5_000))
    detail = message.partition("(")[2].removesuffix(")")
    assert len(detail) == 300 and detail.endswith("x" * 200)  # litellm's own prefix counts too


@pytest.mark.parametrize("model, message", [
    (None, "no model configured: set RLM_MCP_MODEL"),
    ("  ", "no model configured: set RLM_MCP_MODEL"),
    ("nonsense-provider/x", "unknown model 'nonsense-provider/x'"),
])
def test_an_unusable_model_string_is_refused_with_how_to_write_one(client, model, message):
    from rlm_mcp.errors import ModelError
    with pytest.raises(ModelError, match=message) as caught:
        client.check_model(model)
    assert MODEL_HINT in str(caught.value)
