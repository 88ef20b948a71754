"""The RLM engine end to end with local sandboxes. Tests of the loop script the root model in
process (FakeModelClient); tests of the model path (litellm over HTTP, retries, pricing, error
mapping) and the end-to-end policies go to the scripted model server."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from rlm_mcp.config import Limits, Settings
from rlm_mcp.engine import RlmEngine, RunRequest, RunResult
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.engine.trajectory import read_trajectory
from rlm_mcp.errors import ConfigError, ModelError
from rlm_mcp.sandbox import ContextFile
from rlm_mcp.testing.fake_models import FakeModelClient
from rlm_mcp.testing.model_server import CHUNK_CHARS, Fault
from tests.conftest import haystack


def text_request(tmp_path: Path, text: str, query: str = "What is the secret code?", **kwargs) -> RunRequest:
    path = tmp_path / "context.txt"
    path.write_text(text, encoding="utf-8")
    return RunRequest(query=query, context=ContextFile(path), shape=ContextShape("text", len(text)), **kwargs)


def with_limits(settings: Settings, **limits) -> Settings:
    return replace(settings, limits=replace(settings.limits, **limits))


async def run(settings: Settings, request: RunRequest, models: FakeModelClient | None = None) -> RunResult:
    engine = RlmEngine(settings, models=models)
    try:
        return await engine.run(request)
    finally:
        await engine.sandboxes.aclose()


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"




async def test_needle_in_a_multi_megabyte_haystack_is_found(settings, tmp_path, recording):
    text = haystack(3_000_000, "NEEDLE-7")
    result = await run(settings, text_request(tmp_path, text))
    chunks = -(-len(text) // CHUNK_CHARS)
    assert (result.status, result.answer, result.error) == ("completed", "NEEDLE-7", None)
    assert result.subcalls == chunks
    assert result.usage["openai/needle"].calls == result.iterations + chunks
    assert result.input_tokens > len(text) // 4  # every chunk went to a sub-model once
    root_prompts = [b for b in recording.stats.requests if b["messages"][0]["role"] == "system"]
    assert all(len(json.dumps(b)) < 20_000 for b in root_prompts)  # the root never sees the context


async def test_final_var_line_outside_code_finishes_the_run(settings, tmp_path):
    result = await run(replace(settings, model="openai/needle-final"), text_request(tmp_path, haystack(900_000, "FV-1")),
                       FakeModelClient())
    assert (result.status, result.answer, result.iterations) == ("completed", "FV-1", 3)


async def test_final_line_in_prose_is_the_answer(settings, tmp_path):
    models = FakeModelClient(["I have what I need.\nFINAL(the answer is 7)"])
    result = await run(settings, text_request(tmp_path, "x"), models)
    assert (result.status, result.answer) == ("completed", "the answer is 7")


async def test_final_inside_a_code_block_is_code_not_an_answer(settings, tmp_path):
    models = FakeModelClient([repl("print('FINAL(not yet)')"), "FINAL(done)"])
    result = await run(settings, text_request(tmp_path, "x"), models)
    assert (result.answer, result.iterations) == ("done", 2)


async def test_a_reply_without_code_or_answer_gets_a_nudge(settings, tmp_path):
    models = FakeModelClient(["Let me think about this.", "FINAL(ok)"])
    result = await run(settings, text_request(tmp_path, "x"), models)
    assert (result.answer, result.iterations) == ("ok", 2)
    assert "no ```repl code block" in models.user_messages("openai/needle")[1]


async def test_long_cell_output_is_truncated_for_the_model(settings, tmp_path):
    models = FakeModelClient([repl("print('y' * 50_000)"), "FINAL(ok)"])
    result = await run(with_limits(settings, max_output_chars=1_000), text_request(tmp_path, "x"), models)
    feedback = models.user_messages("openai/needle")[1]
    assert result.status == "completed"
    assert "y" * 1_000 in feedback and "y" * 1_001 not in feedback
    assert "49,001 more characters not shown" in feedback


async def test_iterations_exhausted_ends_with_one_answer_now_call(settings, tmp_path):
    models = FakeModelClient([repl("print(1)"), repl("print(2)"), "FINAL(best guess: 3)"])
    result = await run(with_limits(settings, max_iterations=2), text_request(tmp_path, "x"), models)
    assert (result.status, result.limit, result.answer, result.iterations) == (
        "limit_reached", "max_iterations", "best guess: 3", 2)


async def test_max_subcalls_ends_the_run_with_the_limit_named(settings, tmp_path):
    result = await run(with_limits(settings, max_subcalls=2), text_request(tmp_path, haystack(2_000_000)),
                       FakeModelClient())
    assert (result.status, result.limit) == ("limit_reached", "max_subcalls")
    assert result.subcalls == 2


async def test_max_tokens_ends_the_run(settings, tmp_path):
    result = await run(with_limits(settings, max_tokens=50), text_request(tmp_path, haystack(1_000_000)),
                       FakeModelClient())
    assert (result.status, result.limit) == ("limit_reached", "max_tokens")


async def test_cost_is_priced_from_litellm_tables_and_max_cost_ends_the_run(settings, tmp_path):
    priced = replace(settings, model="openai/gpt-4o-mini")
    full = await run(priced, text_request(tmp_path, haystack(900_000)))
    assert full.status == "completed" and full.cost_usd is not None and full.cost_usd > 0
    assert full.usage["openai/gpt-4o-mini"].cost_usd == pytest.approx(full.cost_usd)
    # The budget is checked before each call; calls already in flight can overshoot it, so one at a time here.
    capped = await run(with_limits(priced, max_cost_usd=full.cost_usd / 10, max_concurrency=1),
                       text_request(tmp_path, haystack(900_000)))
    assert (capped.status, capped.limit) == ("limit_reached", "max_cost_usd")


async def test_unknown_prices_give_null_cost(settings, tmp_path):
    result = await run(settings, text_request(tmp_path, haystack(10_000)))
    assert result.cost_usd is None and result.usage["openai/needle"].cost_usd is None


async def test_wall_clock_timeout_ends_a_stuck_run_with_the_partial_answer(settings, tmp_path):
    models = FakeModelClient([repl("answer['content'] = 'partial'\nimport time\ntime.sleep(60)")])
    result = await run(with_limits(settings, timeout_s=1.0, cell_timeout_s=1.0), text_request(tmp_path, "x"), models)
    assert (result.status, result.limit) == ("limit_reached", "timeout_s")
    assert result.elapsed_s < 10


async def test_depth_two_recursion_runs_child_rlms_and_sums_their_usage(settings, tmp_path):
    text = haystack(1_000_000, "DEEP-2")
    result = await run(with_limits(replace(settings, model="openai/recursive"), max_depth=2),
                       text_request(tmp_path, text))
    children = -(-len(text) // CHUNK_CHARS)
    assert (result.status, result.answer) == ("completed", "DEEP-2")
    # root: 2 turns; each child: 2 turns plus its sub-calls, which the tree-wide count includes
    assert result.subcalls >= children
    assert result.usage["openai/recursive"].calls == 2 + children * 2 + result.subcalls
    child_files = sorted(Path(result.trajectory_path).parent.glob(f"{result.run_id}.*.jsonl"))
    assert len(child_files) == children
    meta, _ = read_trajectory(child_files[0])
    assert (meta["depth"], meta["status"]) == (2, "completed")


def own_tokens(path: Path) -> int:
    """Tokens of the calls one RLM's trajectory records: its root calls (and summary calls), its
    plain sub-calls, and, through their own files, its child RLMs."""
    _, records = read_trajectory(path)
    total = 0
    for record in records:
        usage = record.get("usage") or {}
        total += usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
        compaction = (record.get("compaction") or {}).get("usage") or {}
        total += compaction.get("input_tokens", 0) + compaction.get("output_tokens", 0)
        for block in record["code_blocks"]:
            for call in block["result"]["rlm_calls"]:
                child = call["usage_summary"].get("child_run_id")
                total += own_tokens(path.with_name(f"{child}.jsonl")) if child else (
                    call["usage_summary"]["input_tokens"] + call["usage_summary"]["output_tokens"])
    return total


def child_calls(path: Path) -> list[dict]:
    _, records = read_trajectory(path)
    return [call for record in records for block in record["code_blocks"]
            for call in block["result"]["rlm_calls"] if "child_run_id" in call["usage_summary"]]


async def test_concurrent_child_rlms_report_only_their_own_usage(settings, tmp_path, model_server):
    model_server.latency_s = 0.02  # each child's calls take long enough for its siblings' to land meanwhile
    try:
        result = await run(with_limits(replace(settings, model="openai/recursive"), max_depth=2, max_concurrency=3),
                           text_request(tmp_path, haystack(1_000_000, "OWN-3")))
    finally:
        model_server.latency_s = 0.0
    assert (result.status, result.answer) == ("completed", "OWN-3")
    root = Path(result.trajectory_path)
    calls = child_calls(root)
    assert len(calls) == -(-1_000_000 // CHUNK_CHARS)
    # The premise: the children ran at the same time (rlm_query_batched), not one after another.
    spans = sorted((c["start_s"], c["start_s"] + c["execution_time"]) for c in calls)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    for call in calls:
        child = root.with_name(f"{call['usage_summary']['child_run_id']}.jsonl")
        meta, _ = read_trajectory(child)
        assert call["usage_summary"]["tokens"] == own_tokens(child) > 0
        assert sum(u["input_tokens"] + u["output_tokens"] for u in meta["usage"].values()) == own_tokens(child)
    assert own_tokens(root) == result.input_tokens + result.output_tokens


async def test_rlm_query_at_the_depth_limit_falls_back_to_llm_query(settings, tmp_path):
    result = await run(replace(settings, model="openai/recursive"), text_request(tmp_path, haystack(500_000, "FLAT")))
    assert (result.status, result.answer) == ("completed", "FLAT")
    assert not list(Path(result.trajectory_path).parent.glob(f"{result.run_id}.*.jsonl"))


async def test_usage_is_kept_per_model_over_the_tree(settings, tmp_path, recording):
    result = await run(replace(settings, sub_model="openai/cheap-sub"), text_request(tmp_path, haystack(900_000)))
    assert set(result.usage) == {"openai/needle", "openai/cheap-sub"}
    assert result.usage["openai/cheap-sub"].calls == recording.stats.by_model["cheap-sub"] == result.subcalls
    assert result.usage["openai/needle"].calls == recording.stats.by_model["needle"]


async def test_subcalls_run_concurrently_under_the_shared_limit(settings, tmp_path, model_server):
    model_server.reset_stats()
    model_server.latency_s = 0.05
    try:
        result = await run(with_limits(replace(settings, model="openai/recursive"), max_depth=2, max_concurrency=3),
                           text_request(tmp_path, haystack(4_000_000)))
    finally:
        model_server.latency_s = 0.0
    assert result.status == "completed"
    assert result.max_subcalls_in_flight == 3  # ten children, each with sub-calls, never above the cap


async def test_a_provider_error_is_retried(settings, tmp_path, model_server):
    model_server.script("flaky", [Fault(503), Fault(429), "FINAL(recovered)"])
    result = await run(replace(settings, model="openai/flaky", model_retries=2), text_request(tmp_path, "x"))
    assert (result.status, result.answer) == ("completed", "recovered")


async def test_a_provider_that_keeps_failing_ends_the_run_with_a_clear_error(settings, tmp_path, model_server):
    model_server.script("broken", [Fault(500, "upstream exploded")] * 3)
    result = await run(replace(settings, model="openai/broken", model_retries=2), text_request(tmp_path, "x"))
    assert result.status == "failed"
    assert "openai/broken" in result.error and "after 3 attempts" in result.error


async def test_an_authentication_error_says_which_key_to_set(settings, tmp_path, model_server):
    model_server.script("locked", [Fault(401, "invalid api key")])
    result = await run(replace(settings, model="openai/locked"), text_request(tmp_path, "x"))
    assert result.status == "failed" and "OPENAI_API_KEY" in result.error


async def test_a_crashed_worker_is_reported_and_the_run_goes_on(settings, tmp_path):
    models = FakeModelClient([repl("import os\nos._exit(1)"), repl("print(len(context))"), "FINAL(survived)"])
    result = await run(settings, text_request(tmp_path, "abc"), models)
    feedback = models.user_messages("openai/needle")
    assert (result.status, result.answer) == ("completed", "survived")
    assert "died" in feedback[1] and "lost" in feedback[1]
    assert "Output:\n3" in feedback[2]


@pytest.mark.parametrize("model, message", [
    ("", "no model configured"),
    ("definitely-not-a-provider/some-model", "unknown model"),
])
async def test_an_unusable_model_string_is_refused_before_the_run(settings, tmp_path, model, message):
    engine = RlmEngine(replace(settings, model=model or None))
    with pytest.raises(ModelError, match=message):
        await engine.run(text_request(tmp_path, "x"))


@pytest.mark.parametrize("limits, message", [
    (Limits(max_iterations=0), "max_iterations must be a number from 1"),
    (Limits(max_depth=9), "max_depth must be a number from 1 to 5"),
    (Limits(cell_timeout_s=100, timeout_s=10), "cell_timeout_s .* cannot exceed timeout_s"),
    (Limits(max_cost_usd=-1), "max_cost_usd"),
])
async def test_absurd_or_contradictory_limits_are_refused(settings, tmp_path, limits, message):
    with pytest.raises(ConfigError, match=message):
        await run(settings, text_request(tmp_path, "x", limits=limits))


async def test_an_empty_query_is_refused(settings, tmp_path):
    with pytest.raises(ConfigError, match="query is empty"):
        await run(settings, text_request(tmp_path, "x", query="  "))


async def test_trajectory_uses_the_reference_format_and_never_holds_the_context(settings, tmp_path):
    text = haystack(1_000_000, "TRJ-9")
    marker = "UNIQUE-MARKER-IN-THE-MIDDLE"
    text = text[:300_000] + marker + text[300_000:]
    result = await run(settings, text_request(tmp_path, text))
    raw = Path(result.trajectory_path).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in raw.splitlines()]
    meta, iterations = lines[0], lines[1:]
    assert meta["type"] == "metadata"
    for field in ("root_model", "max_depth", "max_iterations", "backend", "backend_kwargs",
                  "environment_type", "environment_kwargs", "other_backends"):
        assert field in meta
    assert (meta["status"], meta["answer"], meta["run_id"]) == ("completed", "TRJ-9", result.run_id)
    assert meta["usage"]["openai/needle"]["calls"] == result.usage["openai/needle"].calls
    for record in iterations:
        assert record["type"] == "iteration"
        for field in ("iteration", "timestamp", "prompt", "response", "code_blocks", "final_answer", "iteration_time"):
            assert field in record
        for block in record["code_blocks"]:
            assert set(block["result"]) >= {"stdout", "stderr", "locals", "execution_time", "final_answer", "rlm_calls"}
    assert len(iterations[1]["code_blocks"][0]["result"]["rlm_calls"]) == result.subcalls
    assert marker not in raw
    assert len(raw) < 50_000


@pytest.mark.parametrize("backend", ["docker", "daytona"])
async def test_a_run_goes_the_same_way_in_the_other_sandbox_backends(settings, tmp_path, request, backend):
    provider = request.getfixturevalue(f"{backend}_provider")
    engine = RlmEngine(replace(settings, sandbox=backend, limits=replace(settings.limits, max_depth=2)))
    engine.sandboxes.register(provider)
    result = await engine.run(replace(text_request(tmp_path, haystack(900_000, "BOX-3")),
                                      model="openai/recursive"))
    assert (result.status, result.answer) == ("completed", "BOX-3")
    meta, _ = read_trajectory(Path(result.trajectory_path))
    assert meta["environment_type"] == backend


async def test_repl_code_may_only_name_allowed_models(settings, tmp_path):
    code = repl("try:\n    print(llm_query('the secret code is M-1', model='openai/pricey'))\n"
                "except Exception as exc:\n    print('refused:', exc)")
    models = FakeModelClient([code, "FINAL(done)"])
    await run(replace(settings, model="openai/picky"), text_request(tmp_path, "x"), models)
    assert "refused: model 'openai/pricey' is not allowed for sub-calls" in models.user_messages("openai/picky")[1]
    models.script([code, "FINAL(done)"])
    result = await run(replace(settings, model="openai/picky", allowed_models=("openai/pricey",)),
                       text_request(tmp_path, "x"), models)
    assert "Output:\nM-1" in models.user_messages("openai/picky")[3]
    assert result.usage["openai/pricey"].calls == 1


def test_a_short_run_timeout_lowers_the_default_cell_timeout():
    from_env = Settings.from_env({"RLM_MCP_TIMEOUT_S": "60"}).limits
    assert (from_env.timeout_s, from_env.cell_timeout_s) == (60, 60)
    overridden = Limits().with_overrides(timeout_s=45)
    assert (overridden.timeout_s, overridden.cell_timeout_s) == (45, 45)
    assert Limits().with_overrides(timeout_s=900).cell_timeout_s == 300  # only ever lowered


def test_an_explicit_cell_timeout_over_the_run_timeout_is_refused():
    with pytest.raises(ConfigError, match=r"cell_timeout_s \(120\) cannot exceed timeout_s \(60\)"):
        Settings.from_env({"RLM_MCP_TIMEOUT_S": "60", "RLM_MCP_CELL_TIMEOUT_S": "120"})
    with pytest.raises(ConfigError, match=r"cell_timeout_s \(120\) cannot exceed timeout_s \(60\)"):
        Limits().with_overrides(timeout_s=60, cell_timeout_s=120)
