"""The fake model client: scripted root replies, the server's policies after them, sub-call
answers, usage like the scripted server's, errors raised, requests recorded."""

from __future__ import annotations

import asyncio

import pytest

from rlm_mcp.engine.prompts import ContextShape, system_prompt
from rlm_mcp.errors import ModelError
from rlm_mcp.testing.fake_models import FakeModelClient, ModelRequest
from rlm_mcp.testing.model_server import PROBE, secret_needle

ROOT = [{"role": "system", "content": system_prompt(ContextShape("text", 10))}, {"role": "user", "content": "q"}]


def sub(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def test_scripted_replies_answer_root_calls_in_order_then_the_named_policy():
    models = FakeModelClient(["first", "second"])
    texts = [(await models.complete("openai/needle", ROOT)).text for _ in range(3)]
    assert texts == ["first", "second", PROBE]  # the needle policy's first step


async def test_sub_calls_do_not_consume_the_script_and_answer_with_the_secret_code():
    models = FakeModelClient(["root reply"])
    found = await models.complete("openai/needle", sub("text" + secret_needle("AB-1") + "text"))
    missing = await models.complete("openai/needle", sub("nothing here"))
    assert (found.text, missing.text) == ("AB-1", "NONE")
    assert (await models.complete("openai/needle", ROOT)).text == "root reply"


async def test_a_subcall_responder_replaces_the_default_answer():
    models = FakeModelClient(subcalls=lambda request: request.last_user_message.upper())
    assert (await models.complete("m", sub("shout"))).text == "SHOUT"


async def test_usage_counts_a_quarter_of_the_characters_and_cost_only_when_priced():
    unpriced = await FakeModelClient(["y" * 40]).complete("m", ROOT)
    assert (unpriced.input_tokens, unpriced.output_tokens, unpriced.cost_usd) == (
        sum(len(m["content"]) for m in ROOT) // 4, 10, None)
    priced = await FakeModelClient(["y" * 40], cost_per_token_usd=0.5).complete("m", ROOT)
    assert priced.cost_usd == pytest.approx((priced.input_tokens + priced.output_tokens) * 0.5)


async def test_a_scripted_exception_is_raised_from_complete():
    models = FakeModelClient([ModelError("provider down"), "after"])
    with pytest.raises(ModelError, match="provider down"):
        await models.complete("m", ROOT)
    assert (await models.complete("m", ROOT)).text == "after"


async def test_an_async_reply_holds_the_call_until_its_gate_opens():
    gate = asyncio.Event()

    async def gated(request: ModelRequest) -> str:
        await gate.wait()
        return "released"

    models = FakeModelClient([gated])
    call = asyncio.create_task(models.complete("m", ROOT))
    async with asyncio.timeout(10):
        while models.in_flight == 0:
            await asyncio.sleep(0)
    assert not call.done()
    gate.set()
    async with asyncio.timeout(10):
        assert (await call).text == "released"
    assert (models.in_flight, models.max_in_flight) == (0, 1)


async def test_requests_are_recorded_per_model():
    models = FakeModelClient(["a", "b"])
    await models.complete("openai/x", ROOT)
    await models.complete("openai/y", [*ROOT[:1], {"role": "user", "content": "other"}])
    assert [r.model for r in models.requests] == ["openai/x", "openai/y"]
    assert models.user_messages("openai/y") == ["other"] and models.requests[0].root
    assert models.calls_by_model == {"openai/x": 1, "openai/y": 1}


@pytest.mark.parametrize("model", [None, "", "   "])
def test_an_empty_model_string_is_refused_like_the_real_client(model):
    with pytest.raises(ModelError, match="no model configured: set RLM_MCP_MODEL"):
        FakeModelClient().check_model(model)
