"""continue_from, system_prompt, max_errors and partial answers through the real MCP client:
what a host reads is the structured content, so every new field must be there."""

from __future__ import annotations

from dataclasses import replace

from rlm_mcp.server import Services
from tests.engine.test_engine import repl
from tests.server.test_server import call, connect, error_of


async def test_a_follow_up_over_mcp_reuses_the_repl_and_the_structured_content_says_so(settings, recording):
    services = Services.create(settings)
    recording.script("mcp-follow", [repl("total = 40 + 2"), "FINAL(stored)", repl("FINAL(str(total))")])
    try:
        async with connect(services) as client:
            first = await call(client, "rlm_complete", query="Store the total.", context="some lines",
                               model="openai/mcp-follow")
            follow = await call(client, "rlm_complete", query="What was the total?", continue_from=first["run_id"])
            again = await call(client, "rlm_get_result", run_id=follow["run_id"])
    finally:
        await services.aclose()
    assert (first["status"], first["partial"], first["continued_from"]) == ("completed", False, None)
    assert (follow["status"], follow["answer"], follow["continued_from"]) == ("completed", "42", first["run_id"])
    assert follow["notes"] == [] and follow["compactions"] == 0 and again["answer"] == "42"


async def test_resuming_over_mcp_after_max_iterations_and_a_partial_answer(settings, recording):
    services = Services.create(settings)
    recording.script("mcp-resume", [repl("x = 20"), "So far x is 20; more work is needed.",
                                    repl("FINAL(str(x + 22))")])
    try:
        async with connect(services) as client:
            first = await call(client, "rlm_complete", query="Make 42.", context="abc", model="openai/mcp-resume",
                               max_iterations=1)
            refused = await error_of(client, "rlm_complete", query="", continue_from=first["run_id"],
                                     max_iterations=1)
            resumed = await call(client, "rlm_complete", continue_from=first["run_id"], max_iterations=3)
    finally:
        await services.aclose()
    assert (first["status"], first["limit"], first["partial"]) == ("limit_reached", "max_iterations", True)
    assert first["answer"] == "So far x is 20; more work is needed."
    assert f"continue_from='{first['run_id']}'" in first["next_step"]
    assert "raise max_iterations above 1" in refused
    assert (resumed["status"], resumed["answer"], resumed["iterations"]) == ("completed", "42", 2)
    assert resumed["usage"]["openai/mcp-resume"]["calls"] == 3


async def test_bad_continuations_and_prompts_are_tool_errors_that_say_what_to_do(settings, model_server):
    services = Services.create(settings)
    try:
        async with connect(services) as client:
            unknown = await error_of(client, "rlm_complete", query="q", continue_from="run-20200101-000000-abcdef")
            hostile = await error_of(client, "rlm_complete", query="q", continue_from="../../../etc/passwd")
            template = await error_of(client, "rlm_complete", query="q", context="x",
                                      system_prompt="Context: {context.__class__.__init__.__globals__}")
            no_context = await error_of(client, "rlm_complete", query="q")
            errors = await error_of(client, "rlm_complete", query="q", context="x", max_errors=0)
    finally:
        await services.aclose()
    assert "no run run-20200101-000000-abcdef" in unknown
    assert "is not a run id" in hostile
    assert "unknown placeholder" in template and "{context_type}" in template
    assert "give exactly one of handle, handles or context" in no_context
    assert "max_errors must be a number from 1" in errors


async def test_a_custom_system_prompt_argument_reaches_the_model(settings, recording):
    services = Services.create(replace(settings, model="openai/mcp-prompt"))
    recording.script("mcp-prompt", ["FINAL(ok)"])
    try:
        async with connect(services) as client:
            await call(client, "rlm_complete", query="q", context="x" * 10,
                       system_prompt="House prompt over {context_total_chars} chars of {context_type}.")
    finally:
        await services.aclose()
    [body] = [b for b in recording.stats.requests if b["model"] == "mcp-prompt"]
    assert body["messages"][0] == {"role": "system", "content": "House prompt over 10 chars of text."}
