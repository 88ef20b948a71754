"""Follow-ups and continued runs (continue_from), kept sandboxes (TTL, caps, the live-sandbox
cap), compaction, the error and empty-reply guards, custom system prompts and partial answers.
Models are reached by real HTTP on the scripted model server; sandboxes are real."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from rlm_mcp.config import Settings
from rlm_mcp.engine import RlmEngine, RunManager, RunRequest, RunResult
from rlm_mcp.engine.trajectory import read_trajectory
from rlm_mcp.errors import ConfigError
from rlm_mcp.testing.model_server import ScriptedModelServer
from tests.engine.test_engine import repl, text_request, with_limits



def root_requests(server: ScriptedModelServer, name: str) -> list[list[dict]]:
    """The message lists sent to the model ``name`` (litellm drops the provider prefix)."""
    return [body["messages"] for body in server.stats.requests if body["model"] == name]


async def first_and_follow_up(engine: RlmEngine, tmp_path: Path, server: ScriptedModelServer,
                              name: str) -> tuple[RunResult, RunResult]:
    server.script(f"{name}-1", [repl("secret = 6 * 7\nprint('stored')"), "I stored it.\nFINAL(stored)"])
    first = await engine.run(replace(text_request(tmp_path, "some text", query="Compute the secret."),
                                     model=f"openai/{name}-1"))
    server.script(f"{name}-2", [repl("FINAL(str(secret))")])
    follow = await engine.run(RunRequest(query="What is the secret?", continue_from=first.run_id,
                                         model=f"openai/{name}-2"))
    return first, follow


# ----- follow-ups in the same sandbox, on every backend ------------------------------------------


@pytest.mark.parametrize("backend", ["local", "docker", "daytona"])
async def test_a_follow_up_reads_a_variable_the_first_run_created(settings, tmp_path, recording, request, backend):
    engine = RlmEngine(replace(settings, sandbox=backend), keep_sandboxes=True)
    if backend != "local":
        engine.sandboxes.register(request.getfixturevalue(f"{backend}_provider"))
    try:
        first, follow = await first_and_follow_up(engine, tmp_path, recording, f"follow-{backend}")
    finally:  # the docker and daytona providers are the session's: close only what this engine kept
        await (engine.aclose() if backend == "local" else engine.keeper.aclose())
    assert (first.status, first.answer) == ("completed", "stored")
    assert (follow.status, follow.answer, follow.continued_from) == ("completed", "42", first.run_id)
    assert follow.notes == [] and follow.usage[f"openai/follow-{backend}-2"].calls == 1  # usage is its own
    [messages] = root_requests(recording, f"follow-{backend}-2")
    opening = messages[1]["content"]
    # A compact account of the earlier turn, not its history: its query and answer, not its code.
    assert "Compute the secret." in opening and "Answer: stored" in opening and "secret (int)" in opening
    assert "6 * 7" not in json.dumps(messages) and "still holds every variable" in opening
    meta, _ = read_trajectory(Path(follow.trajectory_path))
    assert meta["continued_from"] == first.run_id and meta["turns"][0]["run_id"] == first.run_id


async def test_a_follow_up_whose_sandbox_is_gone_continues_with_history_and_says_so(settings, tmp_path, recording):
    engine = RlmEngine(settings)  # like the CLI: sandboxes are not kept
    try:
        recording.script("gone-1", [repl("secret = 42"), "FINAL(stored)"])
        first = await engine.run(replace(text_request(tmp_path, "abc", query="Store it."), model="openai/gone-1"))
        recording.script("gone-2", [repl("print('secret' in globals())"), "FINAL(recomputed)"])
        follow = await engine.run(RunRequest(query="And now?", continue_from=first.run_id, model="openai/gone-2"))
    finally:
        await engine.aclose()
    assert (follow.status, follow.answer) == ("completed", "recomputed")
    assert any(f"the sandbox of run {first.run_id} is gone" in note for note in follow.notes)
    first_turn, second_turn = root_requests(recording, "gone-2")
    assert "The REPL of those runs is gone" in first_turn[1]["content"]
    assert "False" in second_turn[-1]["content"]  # a fresh REPL: the variable really is gone


async def test_continue_from_refuses_what_it_cannot_continue(settings, tmp_path, model_server):
    engine = RlmEngine(settings)
    try:
        model_server.script("done-1", ["FINAL(ok)"])
        done = await engine.run(replace(text_request(tmp_path, "x"), model="openai/done-1"))
        with pytest.raises(ConfigError, match="nothing to resume: give a query"):
            engine.prepare(RunRequest(query="", continue_from=done.run_id))
        with pytest.raises(ConfigError, match="no run run-20200101-000000-abcdef"):
            engine.prepare(RunRequest(query="q", continue_from="run-20200101-000000-abcdef"))
        with pytest.raises(Exception, match="is not a run id"):
            engine.prepare(RunRequest(query="q", continue_from="../../etc/passwd"))
        with pytest.raises(ConfigError, match="no context"):
            engine.prepare(RunRequest(query="q"))
    finally:
        await engine.aclose()


# ----- kept sandboxes: TTL, caps, and never a run waiting on an idle one -------------------------


async def test_a_kept_sandbox_closes_after_its_idle_ttl(settings, tmp_path, model_server):
    now = [1000.0]
    engine = RlmEngine(replace(settings, session_ttl_s=60), keep_sandboxes=True)
    engine.keeper.clock = lambda: now[0]
    try:
        model_server.script("ttl-1", [repl("x = 1"), "FINAL(ok)"])
        first = await engine.run(replace(text_request(tmp_path, "x"), model="openai/ttl-1"))
        assert list(engine.keeper.kept) == [first.run_id] and engine.sandboxes.slots.live == 1
        timer = engine.keeper._timer
        assert timer is not None  # armed for the expiry, 60 s after the run ended
        now[0] += 59.9
        assert engine.keeper.sweep() == 0 and first.run_id in engine.keeper.kept
        now[0] += 0.2
        assert engine.keeper.sweep() == 1
        async with asyncio.timeout(30):
            await engine.keeper.drain()
        assert engine.keeper.kept == {} and engine.sandboxes.slots.live == 0
        model_server.script("ttl-2", ["FINAL(history only)"])
        follow = await engine.run(RunRequest(query="more?", continue_from=first.run_id, model="openai/ttl-2"))
        assert follow.answer == "history only" and "is gone" in follow.notes[0]
    finally:
        await engine.aclose()


async def test_ttl_zero_keeps_nothing(settings, tmp_path, model_server):
    engine = RlmEngine(replace(settings, session_ttl_s=0), keep_sandboxes=True)
    try:
        model_server.script("ttl-0", ["FINAL(ok)"])
        await engine.run(replace(text_request(tmp_path, "x"), model="openai/ttl-0"))
        assert engine.keeper.kept == {} and engine.sandboxes.slots.live == 0
    finally:
        await engine.aclose()


async def test_the_count_and_memory_caps_close_the_oldest_kept_sandbox(settings, tmp_path, model_server):
    engine = RlmEngine(replace(settings, max_kept_sandboxes=2), keep_sandboxes=True)
    try:
        ids = []
        for index in range(3):
            model_server.script(f"cap-{index}", ["FINAL(ok)"])
            ids.append((await engine.run(replace(text_request(tmp_path, "x"), model=f"openai/cap-{index}"))).run_id)
        async with asyncio.timeout(30):
            await engine.keeper.drain()
        assert list(engine.keeper.kept) == ids[1:] and engine.sandboxes.slots.live == 2
    finally:
        await engine.aclose()
    small = RlmEngine(replace(settings, sandbox_memory_mb=1024, kept_sandboxes_memory_mb=1500), keep_sandboxes=True)
    try:
        for index in range(2):
            model_server.script(f"mem-{index}", ["FINAL(ok)"])
            last = await small.run(replace(text_request(tmp_path, "x"), model=f"openai/mem-{index}"))
        async with asyncio.timeout(30):
            await small.keeper.drain()
        assert list(small.keeper.kept) == [last.run_id]  # two would reserve 2,048 MB > 1,500
    finally:
        await small.aclose()


async def test_a_new_run_never_waits_on_idle_kept_sandboxes(settings, tmp_path, model_server):
    """Five kept sandboxes fill RLM_MCP_MAX_SANDBOXES=5: the sixth run gets the oldest one's slot."""
    engine = RlmEngine(replace(settings, max_sandboxes=5, max_kept_sandboxes=10, kept_sandboxes_memory_mb=100_000),
                       keep_sandboxes=True)
    try:
        ids = []
        for index in range(5):
            model_server.script(f"slot-{index}", ["FINAL(ok)"])
            ids.append((await engine.run(replace(text_request(tmp_path, "x"), model=f"openai/slot-{index}"))).run_id)
        assert engine.sandboxes.slots.live == 5 and list(engine.keeper.kept) == ids
        model_server.script("slot-5", [repl("print(1)"), "FINAL(sixth)"])
        async with asyncio.timeout(60):
            sixth = await engine.run(replace(text_request(tmp_path, "x"), model="openai/slot-5"))
        assert sixth.answer == "sixth"
        async with asyncio.timeout(30):
            await engine.keeper.drain()
        assert ids[0] not in engine.keeper.kept and sixth.run_id in engine.keeper.kept
        assert engine.sandboxes.slots.peak == 5
    finally:
        await engine.aclose()


# ----- a run stopped by a limit, resumed ----------------------------------------------------------


async def test_a_run_stopped_by_max_iterations_resumes_in_the_same_loop(settings, tmp_path, recording):
    engine = RlmEngine(settings, keep_sandboxes=True)
    try:
        recording.script("resume-it", [repl("x = 1"), repl("x += 1"), "I have x = 2 so far, not done."])
        first = await engine.run(replace(text_request(tmp_path, "abc", query="Make x 42."), model="openai/resume-it",
                                         limits=replace(settings.limits, max_iterations=2)))
        assert (first.status, first.limit, first.iterations) == ("limit_reached", "max_iterations", 2)
        with pytest.raises(ConfigError, match="raise max_iterations above 2"):
            engine.prepare(RunRequest(query="", continue_from=first.run_id,
                                      limits=replace(settings.limits, max_iterations=2)))
        recording.script("resume-it", [repl("FINAL(str(x + 40))")])
        calls_before = len(root_requests(recording, "resume-it"))
        second = await engine.run(RunRequest(query="", continue_from=first.run_id,
                                             limits=replace(settings.limits, max_iterations=4)))
    finally:
        await engine.aclose()
    assert (second.status, second.answer, second.iterations) == ("completed", "42", 3)
    [resumed] = root_requests(recording, "resume-it")[calls_before:]
    # The same conversation goes on: the earlier replies are there, then the resume note.
    assert [m["content"] for m in resumed[2:5]] == ["```repl\nx = 1\n```", resumed[3]["content"], "```repl\nx += 1\n```"]
    assert "raised" in resumed[-1]["content"] and "still holds your variables" in resumed[-1]["content"]
    # Usage adds up exactly: the first part's calls plus the one made now.
    model = "openai/resume-it"
    new_input = sum(len(m["content"]) for m in resumed) // 4
    assert second.usage[model].calls == first.usage[model].calls + 1
    assert second.usage[model].input_tokens == first.usage[model].input_tokens + new_input
    meta, records = read_trajectory(Path(second.trajectory_path))
    assert [r["iteration"] for r in records] == [1, 2, 2, 3]  # both parts, the answer-now call included
    assert [r["part"] for r in records] == [1, 1, 1, 2]
    assert meta["usage"][model]["calls"] == second.usage[model].calls and meta["continued_from"] == first.run_id


async def test_a_run_stopped_by_max_cost_resumes_when_the_budget_is_raised(settings, tmp_path, recording):
    priced = replace(settings, model="openai/gpt-4o-mini")
    engine = RlmEngine(priced, keep_sandboxes=True)
    try:
        recording.script("gpt-4o-mini", [repl("x = 21")])
        first = await engine.run(replace(text_request(tmp_path, "abc", query="Double x."),
                                         limits=replace(settings.limits, max_cost_usd=1e-9)))
        assert (first.status, first.limit) == ("limit_reached", "max_cost_usd")
        assert first.answer is None and not first.partial  # no budget left for a last answer-now call
        recording.script("gpt-4o-mini", [repl("FINAL(str(x * 2))")])
        second = await engine.run(RunRequest(query="", continue_from=first.run_id,
                                             limits=replace(settings.limits, max_cost_usd=1.0)))
    finally:
        await engine.aclose()
    assert (second.status, second.answer) == ("completed", "42")
    model = "openai/gpt-4o-mini"
    assert second.usage[model].calls == first.usage[model].calls + 1
    last_call = recording.stats.requests[-1]["messages"]
    assert second.usage[model].input_tokens == first.usage[model].input_tokens + sum(
        len(m["content"]) for m in last_call) // 4
    assert second.cost_usd > first.cost_usd


# ----- compaction ---------------------------------------------------------------------------------


async def test_a_small_declared_window_triggers_compaction_and_the_run_still_answers(settings, tmp_path, recording):
    recording.script("compact", [repl("x = 5\nprint('a' * 1500)"), repl("print('b' * 1500)"),
                                 "SUMMARY: x holds 5; printed a and b blocks.", repl("FINAL(str(x))")])
    engine = RlmEngine(replace(settings, model="openai/compact", context_window=1_000))
    try:
        result = await engine.run(text_request(tmp_path, "abc"))
    finally:
        await engine.aclose()
    assert (result.status, result.answer, result.compactions) == ("completed", "5", 1)
    calls = root_requests(recording, "compact")
    summarise, after = calls[2], calls[3]
    assert "The agent's history so far" in summarise[-1]["content"] and "a" * 400 in summarise[-1]["content"]
    assert "SUMMARY: x holds 5" in after[1]["content"] and "a" * 1000 not in json.dumps(after)
    assert len(after) == 4  # system, the first message with the summary, the last reply and its output
    _, records = read_trajectory(Path(result.trajectory_path))
    compaction = records[2]["compaction"]
    assert compaction["summary"] == "SUMMARY: x holds 5; printed a and b blocks." and compaction["window"] == 1_000
    assert compaction["dropped_messages"] == 2 and compaction["usage"]["input_tokens"] > 0


async def test_without_a_known_window_nothing_is_compacted(settings, tmp_path, recording):
    recording.script("no-window", [repl("print('a' * 3000)"), repl("print('b' * 3000)"), "FINAL(done)"])
    result = await run_once(replace(settings, model="openai/no-window"), text_request(tmp_path, "abc"))
    assert (result.answer, result.compactions) == ("done", 0)


async def run_once(settings: Settings, request: RunRequest) -> RunResult:
    engine = RlmEngine(settings)
    try:
        return await engine.run(request)
    finally:
        await engine.aclose()


# ----- guards: failing cells, empty replies -------------------------------------------------------


async def test_max_errors_ends_the_run_after_consecutive_failing_cells(settings, tmp_path, recording):
    recording.script("errors", [repl("1/0"), repl("print('fine')"), repl("1/0"), repl("undefined_name"),
                                "My best guess is 7, but every computation failed."])
    result = await run_once(with_limits(replace(settings, model="openai/errors"), max_errors=2),
                            text_request(tmp_path, "abc"))
    assert (result.status, result.limit, result.iterations) == ("limit_reached", "max_errors", 4)
    assert "2 code blocks in a row failed" in result.error and "NameError" in result.error
    # Budget remained: one last answer-now call gave the partial answer.
    assert (result.answer, result.partial) == ("My best guess is 7, but every computation failed.", True)
    assert "max_errors" in root_requests(recording, "errors")[-1][-1]["content"]


async def test_consecutive_empty_replies_end_the_run_with_a_clear_error(settings, tmp_path, model_server):
    model_server.script("mute", ["", "", "", "FINAL(never reached)"])
    result = await run_once(replace(settings, model="openai/mute"), text_request(tmp_path, "abc"))
    assert (result.status, result.iterations) == ("failed", 3)
    assert "3 empty replies in a row" in result.error
    model_server.script("mute", [])  # nothing left queued for other tests


# ----- custom system prompt -----------------------------------------------------------------------


async def test_a_custom_system_prompt_template_reaches_the_model_filled(settings, tmp_path, recording):
    template = ("CUSTOM: {context_type} of {context_total_chars:,} chars, {context_document_count} docs "
                "{context_document_lengths}; llm_query takes {sub_model_capacity_chars} chars; {{literal}}")
    recording.script("custom", ["FINAL(ok)"])
    text = "z" * 1234
    await run_once(replace(settings, model="openai/custom", system_prompt=template), text_request(tmp_path, text))
    recording.script("custom", ["FINAL(ok)"])
    await run_once(replace(settings, model="openai/custom", system_prompt=template),
                   replace(text_request(tmp_path, text), system_prompt="PER CALL {context_type}"))
    first, second = root_requests(recording, "custom")
    assert first[0] == {"role": "system", "content": "CUSTOM: text of 1,234 chars, 0 docs []; llm_query takes "
                                                     "400000 chars; {literal}"}
    assert second[0]["content"] == "PER CALL text"  # the argument wins over the setting


@pytest.mark.parametrize("template, message", [
    ("Hello {context_size}", r"unknown placeholder\(s\) \{context_size\}"),
    ("{context_type.__class__}", r"unknown placeholder"),
    ('JSON {"a": 1}', r"literal braces"),
    ("{context_type:d}", "does not format"),
    ("open { brace", "not a valid template"),
    ("   ", "empty"),
])
async def test_a_bad_system_prompt_template_is_refused_before_the_run(settings, tmp_path, template, message):
    engine = RlmEngine(settings)
    with pytest.raises(ConfigError, match=message):
        engine.prepare(replace(text_request(tmp_path, "x"), system_prompt=template))


def test_the_system_prompt_file_setting_is_read_and_checked(tmp_path):
    good = tmp_path / "prompt.txt"
    good.write_text("Mine: {context_type}", encoding="utf-8")
    assert Settings.from_env({"RLM_MCP_SYSTEM_PROMPT_FILE": str(good)}).system_prompt == "Mine: {context_type}"
    with pytest.raises(ConfigError, match="RLM_MCP_SYSTEM_PROMPT_FILE: cannot read"):
        Settings.from_env({"RLM_MCP_SYSTEM_PROMPT_FILE": str(tmp_path / "missing.txt")})


# ----- partial answers ----------------------------------------------------------------------------


async def cancel_at_iteration(settings: Settings, request: RunRequest, iteration: int) -> RunResult:
    """Start a run under a RunManager and cancel it when its root starts ``iteration``."""
    engine = RlmEngine(settings)
    manager = RunManager(engine, 1)

    def listener(event) -> None:
        if event.kind == "iteration" and event.depth == 1 and event.iteration == iteration and run.task:
            run.task.cancel()

    run = manager.start(request, listener=listener)
    try:
        async with asyncio.timeout(60):
            await asyncio.wait({run.task})
    finally:
        await engine.aclose()
    assert run.result is not None
    return run.result


async def test_a_cancelled_run_reports_its_last_substantive_words_not_the_prose_between_blocks(
        settings, tmp_path, model_server):
    model_server.script("between", ["I will count the lines first, then add them up.\n" + repl("n = 1")
                                    + "\nand\n" + repl("m = 2")])
    result = await cancel_at_iteration(replace(settings, model="openai/between"), text_request(tmp_path, "abc"), 2)
    assert result.status == "cancelled"
    assert (result.answer, result.partial) == ("I will count the lines first, then add them up.", True)


async def test_a_cancelled_run_reports_its_draft_answer_first(settings, tmp_path, model_server):
    model_server.script("drafty", [repl("answer['content'] = 'draft: 42'") + "\nand"])
    result = await cancel_at_iteration(replace(settings, model="openai/drafty"), text_request(tmp_path, "abc"), 2)
    assert (result.status, result.answer, result.partial) == ("cancelled", "draft: 42", True)


async def test_a_completed_run_is_not_partial(settings, tmp_path, model_server):
    model_server.script("whole", ["FINAL(all of it)"])
    result = await run_once(replace(settings, model="openai/whole"), text_request(tmp_path, "abc"))
    assert (result.answer, result.partial) == ("all of it", False)
