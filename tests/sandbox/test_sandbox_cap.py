"""The server-wide cap on live sandboxes (RLM_MCP_MAX_SANDBOXES): child RLMs queue beyond it,
and a run always progresses (a parent holding its sandbox never waits on children that can
never get one). Driven through the real engine with the scripted sandbox backend."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from rlm_mcp.config import Settings
from rlm_mcp.engine import RlmEngine
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox import CellResult, Sandbox, SandboxSlots, SandboxSpec
from rlm_mcp.sandbox.fake import FakeProvider, FakeSandbox
from tests.engine.test_engine import text_request

BATCH = 8  # child RLMs each RLM starts at once, like rlm_query_batched over 8 chunks


class CountingProvider(FakeProvider):
    """The scripted backend, counting sandboxes that are started and not yet closed."""

    def __init__(self) -> None:
        super().__init__(self.respond)
        self.live = 0
        self.peak = 0
        self.opened = 0

    def create(self, spec: SandboxSpec) -> Sandbox:
        provider = self

        class Counted(FakeSandbox):
            async def start(self) -> None:
                await super().start()
                provider.live += 1
                provider.opened += 1
                provider.peak = max(provider.peak, provider.live)

            async def close(self) -> None:
                if self.started and not self.closed:
                    provider.live -= 1
                await super().close()

        sandbox = Counted(spec, self.responder)
        self.sandboxes.append(sandbox)
        return sandbox

    @staticmethod
    async def respond(code: str, spec: SandboxSpec) -> CellResult:
        # Every RLM's first cell hands BATCH sub-tasks to child RLMs at once (below max_depth
        # the engine starts a child RLM with its own sandbox; at max_depth, a model call).
        replies = await asyncio.gather(*(spec.handler("rlm_query", f"part {i}", None) for i in range(BATCH)))
        return CellResult(final=f"{len(replies)} parts done")


def engine_with(settings: Settings, provider: FakeProvider, *, max_sandboxes: int, max_depth: int) -> RlmEngine:
    engine = RlmEngine(replace(settings, sandbox=provider.name, max_sandboxes=max_sandboxes,
                               limits=replace(settings.limits, max_depth=max_depth, timeout_s=60)))
    engine.sandboxes.register(provider)
    return engine


async def test_a_batch_of_child_rlms_never_exceeds_the_sandbox_cap_and_the_run_completes(settings, tmp_path):
    provider = CountingProvider()
    engine = engine_with(settings, provider, max_sandboxes=5, max_depth=3)
    async with asyncio.timeout(90):  # without the room kept for deeper levels this deadlocks
        result = await engine.run(text_request(tmp_path, "a document"))
    assert (result.status, result.answer) == ("completed", f"{BATCH} parts done"), result
    assert provider.opened == 1 + BATCH + BATCH * BATCH  # every child RLM had its sandbox
    assert provider.peak <= 5, f"{provider.peak} sandboxes were live at once under a cap of 5"
    assert provider.peak >= 3  # children did run side by side
    assert provider.live == 0 and engine.sandboxes.slots.live == 0


async def test_without_a_low_cap_the_same_run_starts_far_more_sandboxes_at_once(settings, tmp_path):
    provider = CountingProvider()
    engine = engine_with(settings, provider, max_sandboxes=1000, max_depth=3)
    async with asyncio.timeout(90):
        result = await engine.run(text_request(tmp_path, "a document"))
    assert result.status == "completed"
    assert provider.peak > 5  # what the cap above prevents: the test there is not vacuous


async def test_a_run_deeper_than_the_cap_allows_fails_with_what_to_change(settings, tmp_path):
    slots = SandboxSlots(5)
    with pytest.raises(SandboxError, match="max_depth 6 needs at least 6 sandboxes at once, but "
                                           "RLM_MCP_MAX_SANDBOXES is 5"):
        await slots.acquire(5)


async def test_a_cancelled_wait_for_a_slot_leaves_the_count_right():
    slots = SandboxSlots(5)
    for _ in range(5):
        await slots.acquire(0)
    waiter = asyncio.create_task(slots.acquire(0))
    await asyncio.sleep(0)  # let it queue
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slots.release()
    assert slots.live == 4
    async with asyncio.timeout(5):
        await slots.acquire(0)  # the freed slot went to nobody else
    assert slots.live == 5


async def test_a_child_that_fits_is_admitted_before_a_root_that_arrived_first():
    slots = SandboxSlots(5)
    for _ in range(4):
        await slots.acquire(0)
    root = asyncio.create_task(slots.acquire(2))   # needs live + 2 < 5
    child = asyncio.create_task(slots.acquire(0))  # needs live < 5
    async with asyncio.timeout(5):
        await child
    assert not root.done() and slots.live == 5
    for _ in range(3):
        slots.release()
    async with asyncio.timeout(5):
        await root
    assert slots.live == 3
