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
