"""The adaptive per-provider concurrency limiter (AIMD), on a fake clock: no test sleeps."""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from rlm_mcp.engine.limiter import (
    AdaptiveLimiter,
    ProviderLimiters,
    Slot,
    provider_key,
    retry_after_s,
)

T = TypeVar("T")


class FakeClock:
    """Time moves only when the test says so; sleepers wake when their moment is reached."""

    def __init__(self) -> None:
        self.t = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self.t:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((deadline, future))
        await future

    async def advance(self, seconds: float) -> None:
        self.t += seconds
        due = [(d, f) for d, f in self._sleepers if d <= self.t]
        self._sleepers = [(d, f) for d, f in self._sleepers if d > self.t]
        for _, future in due:
            if not future.done():
                future.set_result(None)
        await run_ready()


async def run_ready() -> None:
    """Let every task that is ready run until it blocks again. A yield to the loop, not a
    wait for time: asyncio runs ready callbacks in order, so a few passes settle the chain
    (woken timer task -> grant -> waiter resumes)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def within(awaitable: Awaitable[T], seconds: float = 2.0) -> T:
    async with asyncio.timeout(seconds):
        return await awaitable


class Holder:
    """Takes a slot in a task and keeps it until told how the call went."""

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self.limiter = limiter
        self.granted = asyncio.Event()
        self.outcome: asyncio.Future[tuple[str, float | None]] = asyncio.get_running_loop().create_future()
        self.slot: Slot | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.limiter.slot() as slot:
            self.slot = slot
            self.granted.set()
            kind, retry_after = await self.outcome
            if kind == "ok":
                slot.succeeded()
            elif kind == "overloaded":
                slot.overloaded(retry_after)

    async def finish(self, kind: str = "ok", retry_after: float | None = None) -> None:
        self.outcome.set_result((kind, retry_after))
        await within(self.task)


async def hold(limiter: AdaptiveLimiter, count: int) -> list[Holder]:
    holders = [Holder(limiter) for _ in range(count)]
    await run_ready()
    return holders


async def test_starts_at_the_configured_maximum_and_queues_the_rest_in_order() -> None:
    limiter = AdaptiveLimiter(4, clock=FakeClock())
    holders = await hold(limiter, 6)
    assert [h.granted.is_set() for h in holders] == [True] * 4 + [False] * 2
    assert limiter.state().in_flight == 4 and limiter.state().waiting == 2
    await holders[0].finish()
    assert holders[4].granted.is_set() and not holders[5].granted.is_set()  # first come, first served
    for h in holders[1:5]:
        await h.finish()
    await within(holders[5].granted.wait())
    await holders[5].finish()
    assert limiter.state().in_flight == 0 and limiter.limit == 4


async def test_a_burst_of_overload_signals_from_one_round_halves_the_limit_once() -> None:
    limiter = AdaptiveLimiter(32, clock=FakeClock())
    holders = await hold(limiter, 32)
    for h in holders:  # all 32 were refused together: one congestion event, not 32
        await h.finish("overloaded")
    state = limiter.state()
    assert limiter.limit == 16 and state.decreases == 1 and state.overload_signals == 32


async def test_overload_after_a_decrease_halves_again_and_never_goes_below_one() -> None:
    limiter = AdaptiveLimiter(8, clock=FakeClock())
    seen = []
    for _ in range(6):
        (h,) = await hold(limiter, 1)  # granted after the last decrease: news about the new limit
        await h.finish("overloaded")
        seen.append(limiter.limit)
    assert seen == [4, 2, 1, 1, 1, 1]
    holders = await hold(limiter, 2)
    assert [h.granted.is_set() for h in holders] == [True, False]  # a limit of 1 still lets one call through
    await holders[0].finish()
    await within(holders[1].granted.wait())
    await holders[1].finish()


async def test_the_lowered_limit_holds_back_new_calls_until_enough_finish() -> None:
    limiter = AdaptiveLimiter(8, clock=FakeClock())
    holders = await hold(limiter, 8)
    await holders[0].finish("overloaded")  # limit 8 -> 4 with 7 still in flight
    late = await hold(limiter, 1)
    for h in holders[1:4]:
        await h.finish("error")  # neither success nor overload: slot back, limit unchanged
    assert limiter.limit == 4 and limiter.state().in_flight == 4 and not late[0].granted.is_set()
    await holders[4].finish("error")
    assert late[0].granted.is_set()
    for h in holders[5:] + late:
        await h.finish("error")


async def test_successes_grow_the_limit_by_one_per_window_up_to_the_maximum() -> None:
    limiter = AdaptiveLimiter(6, clock=FakeClock())
    (h,) = await hold(limiter, 1)
    await h.finish("overloaded")
    (h,) = await hold(limiter, 1)
    await h.finish("overloaded")
    assert limiter.limit == 1.5
    growth = []
    for _ in range(12):
        (h,) = await hold(limiter, 1)
        await h.finish("ok")
        growth.append(int(limiter.limit))
    # 1.5 -> +1/limit per success: whole slots come back one window at a time, never past 6
    assert growth == sorted(growth) and growth[-1] <= 6 and growth[0] == 2
    for _ in range(50):
        (h,) = await hold(limiter, 1)
        await h.finish("ok")
    assert limiter.limit == 6


async def test_a_grown_limit_admits_queued_callers_without_waiting_for_a_release() -> None:
    limiter = AdaptiveLimiter(3, clock=FakeClock())
    first = await hold(limiter, 3)
    await first[0].finish("overloaded")  # 3 -> 1.5: capacity 1 with two still in flight
    await first[1].finish("error")
    await first[2].finish("error")
    a, b = await hold(limiter, 2)
    assert a.granted.is_set() and not b.granted.is_set()
    a_slot = a.slot
    assert a_slot is not None
    a_slot.succeeded()  # 1.5 + 1/1.5 = 2.17: a second slot opens while `a` is still in flight
    await run_ready()
    assert b.granted.is_set()
    await a.finish()
    await b.finish()


async def test_retry_after_above_the_floor_lowers_the_limit_without_pausing() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(8, clock=clock)
    holders = await hold(limiter, 2)
    await holders[0].finish("overloaded", retry_after=10.0)
    assert limiter.limit == 4 and limiter.state().paused_for_s == 0.0
    (next_call,) = await hold(limiter, 1)  # capacity 4, 1 in flight: the provider can take it
    assert next_call.granted.is_set()
    await next_call.finish()
    await holders[1].finish()


async def test_retry_after_at_the_floor_pauses_new_calls_until_it_has_passed() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(2, clock=clock)
    holders = await hold(limiter, 2)
    await holders[0].finish("overloaded", retry_after=10.0)  # 2 -> 1: even one at a time is refused
    waiting = await hold(limiter, 1)
    assert limiter.limit == 1
    assert limiter.state().paused_for_s == pytest.approx(10.0)
    await holders[1].finish("ok")  # a release during the pause grants nothing
    assert not waiting[0].granted.is_set()
    await clock.advance(9.9)
    assert not waiting[0].granted.is_set()
    await clock.advance(0.1)
    assert waiting[0].granted.is_set()
    await waiting[0].finish()


async def test_a_later_longer_retry_after_extends_the_pause() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(2, clock=clock)
    holders = await hold(limiter, 2)
    await holders[0].finish("overloaded", retry_after=5.0)
    (waiting,) = await hold(limiter, 1)
    await holders[1].finish("overloaded", retry_after=20.0)  # same round: no second halving
    assert limiter.limit == 1
    await clock.advance(6.0)
    assert not waiting.granted.is_set()
    await clock.advance(14.0)
    assert waiting.granted.is_set()
    await waiting.finish()


async def test_a_huge_retry_after_is_capped_and_nonsense_is_ignored() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(1, clock=clock, max_pause_s=60.0)
    (h,) = await hold(limiter, 1)
    await h.finish("overloaded", retry_after=1e9)
    assert limiter.state().paused_for_s == pytest.approx(60.0)
    (waiting,) = await hold(limiter, 1)
    await clock.advance(60.0)
    assert waiting.granted.is_set()
    await waiting.finish("overloaded", retry_after=float("nan"))
    for bad in (float("inf"), -5.0, 0.0):
        (h,) = await hold(limiter, 1)
        await h.finish("overloaded", retry_after=bad)
    assert limiter.state().paused_for_s == 0.0
    (h,) = await hold(limiter, 1)
    assert h.granted.is_set()
    await h.finish()


async def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    limiter = AdaptiveLimiter(1, clock=FakeClock())
    holder, queued, after = await hold(limiter, 3)
    queued.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(queued.task)
    await holder.finish()
    assert after.granted.is_set() and limiter.state().in_flight == 1 and limiter.state().waiting == 0
    await after.finish()
    assert limiter.state().in_flight == 0


async def test_a_waiter_cancelled_as_it_is_granted_hands_the_slot_on() -> None:
    limiter = AdaptiveLimiter(1, clock=FakeClock())
    holder, queued, after = await hold(limiter, 3)
    holder.outcome.set_result(("ok", None))
    queued.task.cancel()  # the release grants `queued` in the same loop pass as its cancellation
    with pytest.raises(asyncio.CancelledError):
        await within(queued.task)
    await within(holder.task)
    await within(after.granted.wait())
    assert limiter.state().in_flight == 1
    await after.finish()
    assert limiter.state().in_flight == 0


async def test_a_slot_reports_once() -> None:
    limiter = AdaptiveLimiter(8, clock=FakeClock())
    async with limiter.slot() as slot:
        slot.overloaded()
        slot.overloaded()
        slot.succeeded()
    assert limiter.limit == 4 and limiter.state().overload_signals == 1


def test_the_maximum_must_be_a_positive_whole_number() -> None:
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="at least 1"):
            AdaptiveLimiter(bad)  # type: ignore[arg-type]


async def test_each_provider_has_its_own_limit() -> None:
    limiters = ProviderLimiters(8, clock=FakeClock())
    a = limiters.for_key(provider_key("openai/gpt-4.1-mini"))
    b = limiters.for_key(provider_key("anthropic/claude-sonnet-4-5"))
    assert limiters.for_key("openai") is a and a is not b
    async with a.slot() as slot:
        slot.overloaded()
    assert a.limit == 4 and b.limit == 8
    assert set(limiters.states()) == {"openai", "anthropic"}


def test_provider_key_groups_by_endpoint_then_by_provider_prefix() -> None:
    assert provider_key("openai/needle", "http://127.0.0.1:8321/v1") == "http://127.0.0.1:8321"
    assert provider_key("openai/other", "HTTP://User:Secret@LocalHost:8321/v1/") == "http://localhost:8321"
    assert provider_key("anthropic/claude-sonnet-4-5") == "anthropic"
    assert provider_key("openrouter/openai/gpt-4o") == "openrouter"
    assert provider_key("gpt-4o") == "gpt-4o"
    assert provider_key("openai/x", "   ") == "openai"


def test_retry_after_is_read_from_seconds_milliseconds_or_an_http_date() -> None:
    assert retry_after_s({"Retry-After": "7"}) == 7.0
    assert retry_after_s({"retry-after": "1.5"}) == 1.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # the finer one wins
    now = 1_700_000_000.0
    assert retry_after_s({"Retry-After": email.utils.formatdate(now + 30, usegmt=True)}, now_epoch_s=now) == 30.0
    assert retry_after_s({"Retry-After": email.utils.formatdate(now - 30, usegmt=True)}, now_epoch_s=now) == 0.0
    for bad in ({}, None, {"Retry-After": ""}, {"Retry-After": "soon"}, {"Retry-After": "-4"},
                {"Retry-After": "nan"}, {"Retry-After": "inf"}, {"retry-after-ms": "x"}):
        assert retry_after_s(bad) is None, bad


async def test_adaptive_limit_refuses_far_fewer_calls_than_a_fixed_one_against_a_small_provider() -> None:
    """A simulated provider that serves 6 calls at a time and answers the rest 'overloaded',
    each attempt one tick long (so the attempts started in one tick are the ones in flight
    together); 300 calls, each retried until it succeeds. The fixed limit retries as
    ``ModelClient.complete`` does today (exponential backoff per call: 1, 2, 4, 8 ticks, no
    jitter here); the adaptive one retries at once and lets the limiter pace it."""
    capacity, calls = 6, 300

    async def run(adaptive: bool) -> tuple[int, float]:
        clock = FakeClock()
        limiter = AdaptiveLimiter(32, clock=clock)
        started: dict[float, int] = {}
        refused = 0

        async def one_call() -> None:
            nonlocal refused
            attempt = 0
            while True:
                attempt += 1
                async with limiter.slot() as slot:
                    started[clock.now()] = started.get(clock.now(), 0) + 1
                    accepted = started[clock.now()] <= capacity
                    await clock.sleep_until(clock.now() + 1.0)
                    if accepted:
                        slot.succeeded()
                        return
                    refused += 1
                    if adaptive:
                        slot.overloaded()
                if not adaptive:
                    await clock.sleep_until(clock.now() + min(8.0, 2.0 ** (attempt - 1)))

        tasks = [asyncio.create_task(one_call()) for _ in range(calls)]
        await run_ready()
        ticks = 0
        while not all(t.done() for t in tasks):
            ticks += 1
            assert ticks < 10_000, "the simulation did not converge"
            await clock.advance(1.0)
        await within(asyncio.gather(*tasks))
        return refused, clock.now()

    fixed_refused, fixed_time = await run(adaptive=False)
    adaptive_refused, adaptive_time = await run(adaptive=True)
    # Fixed: most attempts above the capacity are refused, over and over. Adaptive: a few rounds
    # of refusals while the limit comes down, then occasional probes above the capacity.
    assert adaptive_refused * 5 < fixed_refused
    assert adaptive_time < fixed_time
    assert adaptive_time <= 1.25 * calls / capacity  # close to what the provider can serve
