"""The model client over real HTTP against the scripted server, on both of its paths: litellm,
and the direct OpenAI-compatible path. Every behaviour users see must be the same on both."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from rlm_mcp.config import Settings
from rlm_mcp.engine.models import ModelClient, warm_up_litellm
from rlm_mcp.errors import ModelError
from rlm_mcp.testing.model_server import Fault, ScriptedModelServer

PATHS = ["direct", "litellm"]
PROMPT = [{"role": "user", "content": "Find it. The secret code is QX-7. Reply with the code."}]


@pytest.fixture(params=PATHS)
async def client(request, settings: Settings):
    """A model client on one path; the test fails if the other path answered."""
    path = request.param
    client = ModelClient(replace(settings, model_client="auto" if path == "direct" else "litellm"))
    await client.ready()
    assert client.uses_direct_path("openai/needle") == (path == "direct")
    yield client
    await client.aclose()


def retried(settings: Settings, client: ModelClient, retries: int, **changes: Any) -> ModelClient:
    return ModelClient(replace(client.settings, model_retries=retries, **changes))


async def test_a_reply_carries_its_text_and_the_usage_the_provider_reported(client, recording):
    completion = await client.complete("openai/needle", PROMPT)
    assert completion.text == "QX-7"
    chars = len(PROMPT[0]["content"])
    assert (completion.input_tokens, completion.output_tokens) == (chars // 4, 1)
    assert completion.model == "openai/needle" and completion.elapsed_s > 0
    assert recording.stats.calls == 1


async def test_requests_are_not_streamed_and_name_the_model_without_its_prefix(client, recording):
    await client.complete("openai/needle", PROMPT)
    body = recording.stats.requests[0]
    assert body["model"] == "needle" and not body.get("stream")
    assert body["messages"] == PROMPT


async def test_a_priced_model_costs_its_litellm_prices_and_an_unpriced_one_is_null(client):
    info = client.litellm.get_model_info("openai/gpt-4.1-mini")
    priced = await client.complete("openai/gpt-4.1-mini", PROMPT)
    expected = priced.input_tokens * info["input_cost_per_token"] + priced.output_tokens * info["output_cost_per_token"]
    assert priced.cost_usd == pytest.approx(expected, rel=1e-9) and priced.cost_usd > 0
    for _ in range(2):  # the second reply too: an unpriced model is never reported as free
        assert (await client.complete("openai/needle", PROMPT)).cost_usd is None


async def test_an_authentication_error_says_which_key_to_set_and_is_not_retried(client, model_server):
    model_server.reset_stats()
    model_server.script("locked", [Fault(401, "invalid api key")])
    with pytest.raises(ModelError, match="authentication failed.*OPENAI_API_KEY.*RLM_MCP_API_KEY"):
        await client.complete("openai/locked", PROMPT)
    assert model_server.stats.calls == 1


async def test_a_missing_key_is_an_authentication_error_before_any_request(client, model_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    keyless = ModelClient(replace(client.settings, api_key=None))
    model_server.reset_stats()
    with pytest.raises(ModelError, match="authentication failed.*OPENAI_API_KEY"):
        await keyless.complete("openai/needle", PROMPT)
    assert model_server.stats.calls == 0
    await keyless.aclose()


async def test_an_unknown_model_names_the_model_string_format_and_is_not_retried(client, model_server):
    model_server.reset_stats()
    model_server.script("nomodel", [Fault(404, "The model `nomodel` does not exist")])
    with pytest.raises(ModelError, match="does not know this model.*provider prefix"):
        await client.complete("openai/nomodel", PROMPT)
    assert model_server.stats.calls == 1


async def test_a_prompt_over_the_context_window_says_so_and_is_not_retried(client, model_server):
    model_server.reset_stats()
    model_server.script("small", [Fault(400, "This model's maximum context length is 8192 tokens. "
                                             "However, your messages resulted in 9000 tokens.")])
    with pytest.raises(ModelError, match="longer than the model's context window.*8192"):
        await client.complete("openai/small", PROMPT)
    assert model_server.stats.calls == 1


@pytest.mark.parametrize("fault, kind", [(Fault(429, "slow down"), "rate limited by the provider"),
                                         (Fault(500, "upstream exploded"), "provider unavailable"),
                                         (Fault(503, "overloaded"), "provider unavailable")])
async def test_rate_limits_and_server_errors_are_retried_then_succeed(client, model_server, fault, kind, caplog):
    model_server.reset_stats()
    model_server.script("flaky", [fault])
    completion = await retried(client.settings, client, 2).complete("openai/flaky", PROMPT)
    assert completion.text == "QX-7" and model_server.stats.calls == 2
    assert kind in caplog.text and "retry 1/2" in caplog.text


async def test_a_provider_that_keeps_failing_gives_up_after_the_retries(client, model_server):
    model_server.reset_stats()
    model_server.script("broken", [Fault(500, "upstream exploded")] * 3)
    with pytest.raises(ModelError, match=r"provider unavailable.*upstream exploded.*\(after 3 attempts\)"):
        await retried(client.settings, client, 2).complete("openai/broken", PROMPT)
    assert model_server.stats.calls == 3


async def test_a_slow_provider_times_out_with_the_timeout_named(client, model_server):
    model_server.script("slow", [Fault(500, "too late", delay_s=3.0)])
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"no reply within 0.5 s"):
        await retried(client.settings, client, 0, model_timeout_s=0.5).complete("openai/slow", PROMPT)
    assert time.monotonic() - started < 2.5


async def test_an_unreachable_endpoint_is_retried_as_unavailable(client):
    with ScriptedModelServer() as gone:
        api_base = gone.api_base
    dead = ModelClient(replace(client.settings, api_base=api_base, model_retries=1))
    with pytest.raises(ModelError, match=r"provider unavailable.*\(after 2 attempts\)"):
        await dead.complete("openai/needle", PROMPT)
    await dead.aclose()


async def test_retry_after_delays_the_retry_and_lowers_the_provider_limit(client, model_server):
    model_server.reset_stats()
    model_server.script("busy", [Fault(429, "slow down", headers={"Retry-After": "0.4"})])
    patient = retried(client.settings, client, 1)
    started = time.monotonic()
    completion = await patient.complete("openai/busy", PROMPT)
    waited = time.monotonic() - started
    state = patient.limiter("openai/busy").state()
    assert completion.text == "QX-7" and model_server.stats.calls == 2
    assert waited >= 0.4, "the retry went out before the provider's Retry-After"
    assert waited < 3.0, "the retry waited a backoff on top of Retry-After"
    assert (state.decreases, state.overload_signals) == (1, 1)
    assert state.limit == 16 + 1 / 16  # halved by the 429, then one success: +1/limit


async def test_retry_after_is_honoured_with_adaptive_concurrency_off(client, model_server):
    model_server.script("busy", [Fault(429, "slow down", headers={"retry-after-ms": "1500"})])
    fixed = retried(client.settings, client, 1, adaptive_concurrency=False)
    started = time.monotonic()
    assert (await fixed.complete("openai/busy", PROMPT)).text == "QX-7"
    assert time.monotonic() - started >= 1.5
    assert fixed.limiters.states() == {}  # the limiter was not used


async def test_a_provider_refusing_excess_calls_gets_fewer_of_them(client, settings):
    """Overload: the server serves 4 at a time and answers 429 beyond; 64 calls, 32 at once."""
    with ScriptedModelServer(latency_s=0.02, max_in_flight=4,
                             overload=Fault(429, "too many", headers={"Retry-After": "0.05"})) as server:
        adaptive = ModelClient(replace(client.settings, api_base=server.api_base, model_retries=8))
        replies = await asyncio.gather(*(adaptive.complete("openai/needle", PROMPT) for _ in range(64)))
        assert [r.text for r in replies] == ["QX-7"] * 64
        state = adaptive.limiter("openai/needle").state()
        assert state.decreases >= 2 and state.limit < 16
        # 64 calls at 4 per round: a fixed limit of 32 is refused 28 times per round at least.
        assert server.stats.refused < 28 * 3, server.stats.refused
        await adaptive.aclose()


def test_the_model_client_setting_is_checked():
    from rlm_mcp.errors import ConfigError

    assert Settings.from_env({"RLM_MCP_MODEL_CLIENT": "LiteLLM"}).model_client == "litellm"
    assert Settings.from_env({}).model_client == "auto"
    with pytest.raises(ConfigError, match="RLM_MCP_MODEL_CLIENT must be one of auto, litellm"):
        Settings.from_env({"RLM_MCP_MODEL_CLIENT": "httpx"})
    assert Settings.from_env({"RLM_MCP_ADAPTIVE_CONCURRENCY": "false"}).adaptive_concurrency is False


def test_only_openai_models_with_an_api_base_take_the_direct_path(settings):
    client = ModelClient(settings)
    assert client.uses_direct_path("openai/needle")
    assert not client.uses_direct_path("anthropic/claude-sonnet-4-5")
    assert not ModelClient(replace(settings, api_base=None)).uses_direct_path("openai/gpt-4.1-mini")
    assert not ModelClient(replace(settings, model_client="litellm")).uses_direct_path("openai/needle")


# ----- warm-up: never on the event loop -----------------------------------------------------

class GatedLoader:
    """The real warm-up, held until the test opens the gate (a slow import, without sleeping)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.thread: str | None = None

    def __call__(self) -> Any:
        self.thread = threading.current_thread().name
        self.started.set()
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return warm_up_litellm()


async def test_ready_waits_for_the_warm_up_in_a_thread_while_the_loop_keeps_serving(settings):
    loader = GatedLoader()
    client = ModelClient(replace(settings, model_client="litellm"), loader=loader)
    client.start_warm_up()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    waiting = asyncio.create_task(client.ready())
    async with asyncio.timeout(10):
        await asyncio.to_thread(loader.started.wait)
        assert not waiting.done() and not client.is_ready
        # Before the warm-up ends only the cheap checks run, and nothing imports.
        assert client.check_model("definitely-not-a-provider/x") == "definitely-not-a-provider/x"
        with pytest.raises(ModelError, match="no model configured"):
            client.check_model("  ")
        before = ticks
        await asyncio.sleep(0.05)
        assert ticks > before + 10, "the event loop stopped while the warm-up ran"
        loader.gate.set()
        await waiting
    ticking.cancel()
    assert loader.thread == "rlm-mcp-litellm-warm-up"
    with pytest.raises(ModelError, match="unknown model"):
        client.check_model("definitely-not-a-provider/x")


async def test_a_failed_warm_up_is_a_clear_model_error(settings):
    def broken() -> Any:
        raise ImportError("No module named 'litellm'")

    client = ModelClient(replace(settings, model_client="litellm"), loader=broken)
    async with asyncio.timeout(10):
        with pytest.raises(ModelError, match="litellm.*failed to load.*reinstall"):
            await client.complete("openai/needle", PROMPT)


def test_the_model_library_is_never_used_before_it_is_ready(settings):
    with pytest.raises(RuntimeError, match="await ModelClient.ready"):
        ModelClient(settings, loader=GatedLoader()).litellm


def never_imported() -> Any:
    raise AssertionError("litellm was loaded for a model on the direct path")


async def test_the_direct_path_never_waits_for_litellm_and_prices_from_its_shipped_table(settings, recording):
    client = ModelClient(settings, loader=never_imported)
    client.start_warm_up()  # the configured models take the direct path: nothing to import
    assert client.check_model("openai/gpt-4.1-mini") == "openai/gpt-4.1-mini"
    async with asyncio.timeout(10):
        await client.ready("openai/gpt-4.1-mini", "openai/needle")
        priced = await client.complete("openai/gpt-4.1-mini", PROMPT)
        unpriced = await client.complete("openai/needle", PROMPT)
    assert not client.is_ready
    # The same prices and window litellm itself reports (litellm is loaded in this test process).
    reference = ModelClient(replace(settings, model_client="litellm"))
    await reference.ready()
    info = reference.litellm.get_model_info("openai/gpt-4.1-mini")
    assert priced.cost_usd == pytest.approx(priced.input_tokens * info["input_cost_per_token"]
                                            + priced.output_tokens * info["output_cost_per_token"], rel=1e-9)
    assert unpriced.cost_usd is None
    assert client.context_window("openai/gpt-4.1-mini") == info["max_input_tokens"]
    assert client.context_window("openai/needle") is None
    await client.aclose()


async def test_a_model_outside_the_direct_path_waits_for_litellm_off_the_loop(settings):
    loader = GatedLoader()
    client = ModelClient(settings, loader=loader)
    client.start_warm_up()
    assert not loader.started.is_set()  # configured models are direct: no import at start
    call = asyncio.create_task(client.ready("anthropic/claude-sonnet-4-5"))
    async with asyncio.timeout(10):
        await asyncio.to_thread(loader.started.wait)
        assert not call.done()
        loader.gate.set()
        await call
    assert client.is_ready
