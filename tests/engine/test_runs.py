"""RunManager: runs in the background with a cap, waiting, cancelling, context checks, stored
results, and how many finished runs stay in memory. The model is the in-process fake and the
sandbox the scripted one: these tests are about the bookkeeping, not the loop."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from rlm_mcp.engine import RlmEngine, RunEvent, RunManager, RunRequest
from rlm_mcp.engine import runs as runs_module
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.errors import ContextError, RunNotFound
from rlm_mcp.sandbox import CellResult, ContextFile
from rlm_mcp.sandbox.fake import FakeProvider
from rlm_mcp.testing.fake_models import FakeModelClient, ModelRequest


def request(query: str = "q") -> RunRequest:
    return RunRequest(query=query, context=ContextFile(None), shape=ContextShape("text", 0))


@pytest.fixture
async def engine(settings):
    provider = FakeProvider(lambda code, spec: CellResult(final=code.strip("`\n").removeprefix("repl\n")))
    engine = RlmEngine(replace(settings, sandbox="fake"), models=FakeModelClient())
    engine.sandboxes.register(provider)
    yield engine
    await engine.sandboxes.aclose()


def gated(gate: asyncio.Event, text: str):
    """A root reply that waits for ``gate`` before it is given."""
    async def reply(request: ModelRequest) -> str:
        await gate.wait()
        return text
    return reply


async def until(condition, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


async def finish(manager: RunManager, query: str = "q"):
    run = manager.start(request(query))
    async with asyncio.timeout(30):
        await run.task
    return run


async def test_a_started_run_finishes_in_the_background_and_wait_returns_its_result(engine):
    engine.models.script(["FINAL(forty-two)"])
    manager = RunManager(engine, max_runs=2)
    run = manager.start(request())
    assert not run.done and manager.get(run.run_id) is run
    waited = await manager.wait(run.run_id, wait_s=30)
    assert (waited.result.status, waited.result.answer) == ("completed", "forty-two")
    assert run.request is None and not run.listeners  # released once finished


async def test_wait_returns_the_unfinished_run_when_its_time_is_up(engine):
    gate = asyncio.Event()
    engine.models.script([gated(gate, "FINAL(late)")])
    manager = RunManager(engine, max_runs=1)
    run = manager.start(request())
    await until(lambda: engine.models.in_flight == 1)
    assert (await manager.wait(run.run_id, wait_s=0)).result is None
    assert not run.queued and "iteration 1/" in run.progress_message()
    gate.set()
    assert (await manager.wait(run.run_id, wait_s=30)).result.answer == "late"


async def test_runs_beyond_the_cap_queue_until_a_slot_frees(engine):
    gate = asyncio.Event()
    engine.models.script([gated(gate, "FINAL(first)"), "FINAL(second)"])
    manager = RunManager(engine, max_runs=1)
    first = manager.start(request())
    await until(lambda: engine.models.in_flight == 1)
    second = manager.start(request())
    await asyncio.sleep(0)
    assert second.queued and second.progress_message() == "queued: waiting for a free run slot"
    gate.set()
    results = [(await manager.wait(r.run_id, wait_s=30)).result for r in (first, second)]
    assert [(r.status, r.answer) for r in results] == [("completed", "first"), ("completed", "second")]


async def test_cancel_stops_a_running_run_and_reports_it_cancelled(engine):
    engine.models.script([gated(asyncio.Event(), "FINAL(never)")])
    manager = RunManager(engine, max_runs=1)
    run = manager.start(request())
    await until(lambda: engine.models.in_flight == 1)
    cancelled = await manager.cancel(run.run_id)
    assert (cancelled.result.status, cancelled.result.error) == ("cancelled", "the run was cancelled")
    assert run.task.done() and engine.models.in_flight == 0
    assert manager.stored_result(run.run_id).status == "cancelled"


async def test_cancel_of_a_queued_run_ends_it_before_it_starts(engine):
    gate = asyncio.Event()
    engine.models.script([gated(gate, "FINAL(first)")])
    manager = RunManager(engine, max_runs=1)
    first = manager.start(request())
    await until(lambda: engine.models.in_flight == 1)
    queued = manager.start(request())
    cancelled = await manager.cancel(queued.run_id)
    assert cancelled.result.status == "cancelled" and cancelled.result.iterations == 0
    gate.set()
    assert (await manager.wait(first.run_id, wait_s=30)).result.status == "completed"
    assert len(engine.models.requests) == 1  # the queued run never called the model


async def test_a_failed_context_check_fails_the_run_and_withholds_the_answer(engine):
    engine.models.script(["FINAL(secret answer)"])
    manager = RunManager(engine, max_runs=1)

    def check() -> None:
        raise ContextError("the context changed on disk since it was loaded: load it again")

    run = manager.start(request(), check=check)
    result = (await manager.wait(run.run_id, wait_s=30)).result
    assert (result.status, result.answer) == ("failed", None)
    assert result.error == "the context changed on disk since it was loaded: load it again"


async def test_listeners_receive_the_run_events(engine):
    engine.models.script(["FINAL(done)"])
    manager = RunManager(engine, max_runs=1)
    events: list[RunEvent] = []
    run = manager.start(request(), listener=events.append)
    await manager.wait(run.run_id, wait_s=30)
    assert [e.kind for e in events if e.kind != "subcalls"][0] == "iteration" and events[-1].kind == "done"
    assert {e.run_id for e in events} == {run.run_id}


async def test_a_finished_run_is_read_back_from_its_trajectory(engine):
    engine.models.script(["FINAL(kept on disk)"])
    run = await finish(RunManager(engine, max_runs=1))
    stored = RunManager(engine, max_runs=1).stored_result(run.run_id)  # a new server, say
    assert (stored.status, stored.answer, stored.iterations) == ("completed", "kept on disk", 1)
    assert stored.usage.keys() == run.result.usage.keys()


async def test_old_finished_runs_leave_memory_by_count(engine, monkeypatch):
    monkeypatch.setattr(runs_module, "FINISHED_RUNS_KEPT", 2)
    engine.models.script([f"FINAL(answer {i})" for i in range(4)])
    manager = RunManager(engine, max_runs=1)
    runs = [await finish(manager) for _ in range(4)]
    assert list(manager.runs) == [r.run_id for r in runs[-2:]]
    with pytest.raises(RunNotFound, match="unknown run_id"):
        manager.get(runs[0].run_id)
    assert manager.stored_result(runs[0].run_id).answer == "answer 0"


async def test_old_finished_runs_leave_memory_by_bytes(engine, monkeypatch):
    big = "```repl\n" + "B" * 200_000 + "\n```"  # the fake sandbox's final answer is the cell's code
    engine.models.script([big] * 4)
    manager = RunManager(engine, max_runs=1)
    first = await finish(manager)
    monkeypatch.setattr(runs_module, "FINISHED_RUNS_MAX_BYTES", 2 * first.kept_bytes() + 1_000)
    runs = [first] + [await finish(manager) for _ in range(3)]
    assert list(manager.runs) == [r.run_id for r in runs[-2:]]
    assert manager.stored_result(runs[0].run_id).answer == "B" * 200_000


async def test_unfinished_runs_are_never_forgotten(engine, monkeypatch):
    monkeypatch.setattr(runs_module, "FINISHED_RUNS_KEPT", 0)
    gate = asyncio.Event()
    engine.models.script([gated(gate, "FINAL(slow)")])
    manager = RunManager(engine, max_runs=2)
    run = manager.start(request())
    await until(lambda: engine.models.in_flight == 1)
    assert manager.get(run.run_id) is run
    gate.set()
    await manager.wait(run.run_id, wait_s=30)
    assert run.run_id not in manager.runs


@pytest.mark.parametrize("run_id, message", [
    ("run-20260101-120000-a1b2c3", "unknown run_id"),
    ("../../etc/passwd", "is not a run id"),
    (12, "is not a run id"),
])
async def test_an_unknown_or_malformed_run_id_says_what_to_use(engine, run_id, message):
    manager = RunManager(engine, max_runs=1)
    with pytest.raises(RunNotFound, match=message) as caught:
        manager.get(run_id)
    assert "rlm_complete returned" in str(caught.value)


async def test_aclose_cancels_every_unfinished_run(engine):
    engine.models.script([gated(asyncio.Event(), "FINAL(never)")] * 2)
    manager = RunManager(engine, max_runs=2)
    runs = [manager.start(request()) for _ in range(2)]
    await until(lambda: engine.models.in_flight == 2)
    async with asyncio.timeout(30):
        await manager.aclose()
    assert [r.result.status for r in runs] == ["cancelled", "cancelled"]
