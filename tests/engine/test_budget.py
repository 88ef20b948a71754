"""Budget: usage summed per model, and each limit refusing the next call once it is reached."""

from __future__ import annotations

import asyncio

import pytest

from rlm_mcp.config import Limits
from rlm_mcp.engine.budget import Budget, ModelUsage
from rlm_mcp.engine.models import Completion
from rlm_mcp.errors import LimitExceeded


def completion(model: str = "m", tokens_in: int = 10, tokens_out: int = 5, cost: float | None = None) -> Completion:
    return Completion(model, "text", tokens_in, tokens_out, cost, 0.0)


def test_usage_is_summed_per_model_and_over_the_tree():
    budget = Budget(Limits())
    budget.record(completion("a", 10, 5, 0.25))
    budget.record(completion("a", 1, 1, 0.5))
    budget.record(completion("b", 100, 50))
    assert budget.usage["a"] == ModelUsage(calls=2, input_tokens=11, output_tokens=6, cost_usd=0.75)
    assert budget.usage["b"] == ModelUsage(calls=1, input_tokens=100, output_tokens=50, cost_usd=None)
    assert (budget.input_tokens, budget.output_tokens, budget.cost_usd) == (111, 56, 0.75)


def test_cost_is_null_until_some_model_has_a_price():
    budget = Budget(Limits())
    budget.record(completion(cost=None))
    assert budget.cost_usd is None


def test_the_token_limit_refuses_the_next_call_once_reached():
    budget = Budget(Limits(max_tokens=30))
    budget.record(completion(tokens_in=20, tokens_out=9))
    budget.check("root")  # 29 < 30: still allowed
    budget.record(completion(tokens_in=1, tokens_out=0))
    with pytest.raises(LimitExceeded, match="token budget of 30 tokens") as caught:
        budget.check("sub")
    assert caught.value.limit == "max_tokens" and budget.tripped is caught.value


def test_the_cost_limit_refuses_the_next_call_once_spent():
    budget = Budget(Limits(max_cost_usd=1.0))
    budget.record(completion(cost=0.6))
    budget.check("root")
    budget.record(completion(cost=0.4))
    with pytest.raises(LimitExceeded, match=r"spent its budget of \$1") as caught:
        budget.check("root")
    assert caught.value.limit == "max_cost_usd"


def test_an_unpriced_model_never_trips_the_cost_limit():
    budget = Budget(Limits(max_cost_usd=0.0))
    budget.record(completion(cost=None))
    budget.check("root")


def test_the_subcall_limit_holds_sub_calls_only():
    budget = Budget(Limits(max_subcalls=2))
    budget.subcalls_started = 2
    budget.check("root")  # root turns are not sub-calls
    with pytest.raises(LimitExceeded, match="maximum of 2 sub-calls") as caught:
        budget.check("sub")
    assert caught.value.limit == "max_subcalls"


def test_the_first_limit_tripped_is_the_one_remembered():
    budget = Budget(Limits(max_subcalls=0, max_tokens=10))
    with pytest.raises(LimitExceeded):
        budget.check("sub")
    budget.record(completion(tokens_in=10))
    with pytest.raises(LimitExceeded, match="token budget"):
        budget.check("root")
    assert budget.tripped is not None and budget.tripped.limit == "max_subcalls"


def test_the_time_limit_counts_from_the_start():
    budget = Budget(Limits(timeout_s=60, cell_timeout_s=1))
    remaining = budget.remaining_s()
    assert remaining is not None and 0 < remaining <= 60
    budget.deadline = budget.started  # as if 60 s had passed
    with pytest.raises(LimitExceeded, match="time limit of 60 s") as caught:
        budget.check("root")
    assert caught.value.limit == "timeout_s"
    assert Budget(Limits(timeout_s=None)).remaining_s() is None


async def test_the_concurrency_slots_admit_max_concurrency_sub_calls_at_once():
    budget = Budget(Limits(max_concurrency=2))
    held = [asyncio.create_task(budget.slots.acquire()) for _ in range(2)]
    await asyncio.gather(*held)
    third = asyncio.create_task(budget.slots.acquire())
    await asyncio.sleep(0)
    assert not third.done()
    budget.slots.release()
    async with asyncio.timeout(10):
        await third


async def test_a_subcall_is_counted_started_in_flight_then_done_with_its_usage():
    budget = Budget(Limits())
    async with budget.subcall() as done:
        assert (budget.subcalls_started, budget.in_flight, budget.subcalls_done) == (1, 1, 0)
        done(completion("sub", 7, 3, 0.01))
    assert (budget.subcalls_started, budget.in_flight, budget.subcalls_done, budget.max_in_flight) == (1, 0, 1, 1)
    assert budget.usage["sub"] == ModelUsage(calls=1, input_tokens=7, output_tokens=3, cost_usd=0.01)


async def test_a_failed_subcall_is_counted_started_but_never_done():
    budget = Budget(Limits())
    with pytest.raises(RuntimeError):
        async with budget.subcall():
            raise RuntimeError("provider down")
    assert (budget.subcalls_started, budget.in_flight, budget.subcalls_done, budget.usage) == (1, 0, 0, {})


async def test_a_subcall_over_the_limit_is_refused_before_it_counts():
    budget = Budget(Limits(max_subcalls=1))
    async with budget.subcall() as done:
        done(completion())
    with pytest.raises(LimitExceeded, match="maximum of 1 sub-calls"):
        async with budget.subcall():
            pytest.fail("the refused sub-call ran")
    assert (budget.subcalls_started, budget.in_flight) == (1, 0)


async def test_subcalls_beyond_max_concurrency_wait_for_a_slot_and_the_peak_is_kept():
    budget = Budget(Limits(max_concurrency=2))
    release = asyncio.Event()
    entered = 0

    async def one() -> None:
        nonlocal entered
        async with budget.subcall() as done:
            entered += 1
            await release.wait()
            done(completion())

    calls = [asyncio.create_task(one()) for _ in range(3)]
    async with asyncio.timeout(10):
        while entered < 2:
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert (entered, budget.in_flight, budget.subcalls_started) == (2, 2, 2)  # the third waits for a slot
    release.set()
    async with asyncio.timeout(10):
        await asyncio.gather(*calls)
    assert (budget.subcalls_done, budget.max_in_flight, budget.in_flight) == (3, 2, 0)


async def test_a_subcall_waiting_for_a_slot_is_checked_against_what_the_calls_before_it_used():
    budget = Budget(Limits(max_concurrency=1, max_tokens=10))
    release = asyncio.Event()

    async def first() -> None:
        async with budget.subcall() as done:
            await release.wait()
            done(completion(tokens_in=10, tokens_out=0))

    running = asyncio.create_task(first())
    async with asyncio.timeout(10):
        while budget.in_flight == 0:
            await asyncio.sleep(0)

    async def second() -> None:
        async with budget.subcall():
            pytest.fail("admitted past the token budget")

    waiting = asyncio.create_task(second())
    await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(10):
        await running
        with pytest.raises(LimitExceeded, match="token budget"):
            await waiting
