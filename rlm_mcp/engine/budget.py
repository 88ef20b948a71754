"""Usage over a whole run tree (root, sub-calls, child RLMs), and the limits it is held to;
and the usage of each RLM of the tree with everything below it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

from pydantic import BaseModel

from rlm_mcp.config import Limits
from rlm_mcp.engine.models import Completion
from rlm_mcp.errors import LimitExceeded


class ModelUsage(BaseModel):
    """Calls and tokens for one model; ``cost_usd`` is null when litellm has no price for it."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None

    def add(self, completion: Completion) -> None:
        self.calls += 1
        self.input_tokens += completion.input_tokens
        self.output_tokens += completion.output_tokens
        if completion.cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + completion.cost_usd


class Tally:
    """The model calls of one RLM and of everything below it (its sub-calls, its child RLMs).

    Each call is added here and to every ancestor's tally as it is recorded, so a child's
    figure is exact while siblings run at the same time (a difference of the tree-wide
    counters taken around the child would include theirs). Limits stay with the tree's
    :class:`Budget`."""

    def __init__(self, parent: Tally | None = None) -> None:
        self.parent = parent
        self.usage: dict[str, ModelUsage] = {}

    @property
    def tokens(self) -> int:
        return sum(u.input_tokens + u.output_tokens for u in self.usage.values())

    def record(self, completion: Completion) -> None:
        tally: Tally | None = self
        while tally is not None:
            tally.usage.setdefault(completion.model, ModelUsage()).add(completion)
            tally = tally.parent


class Budget:
    """Counters and limits shared by a run and every child RLM it starts.

    One semaphore bounds the sub-calls in flight across the whole tree, so recursion cannot
    multiply the fan-out. Root calls of the RLMs do not take a slot (a parent waiting on its
    children must never starve them).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.started = time.monotonic()
        self.deadline = None if limits.timeout_s is None else self.started + limits.timeout_s
        self.usage: dict[str, ModelUsage] = {}
        self.subcalls_started = 0
        self.subcalls_done = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.slots = asyncio.Semaphore(limits.max_concurrency)
        self.tripped: LimitExceeded | None = None

    def resume(self, usage: dict[str, ModelUsage], subcalls: int, elapsed_s: float) -> None:
        """Carry over what an earlier part of the same run used (a run continued after a limit):
        the limits hold for both parts together."""
        self.usage = {model: value.model_copy() for model, value in usage.items()}
        self.subcalls_started = self.subcalls_done = subcalls
        self.started -= elapsed_s
        if self.limits.timeout_s is not None:
            self.deadline = self.started + self.limits.timeout_s

    @property
    def input_tokens(self) -> int:
        return sum(u.input_tokens for u in self.usage.values())

    @property
    def output_tokens(self) -> int:
        return sum(u.output_tokens for u in self.usage.values())

    @property
    def cost_usd(self) -> float | None:
        known = [u.cost_usd for u in self.usage.values() if u.cost_usd is not None]
        return sum(known) if known else None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self, kind: Literal["root", "sub"]) -> None:
        """Raise LimitExceeded (and remember it) if another call of this kind is not allowed."""
        exceeded = self._exceeded(kind)
        if exceeded is not None:
            if self.tripped is None:
                self.tripped = exceeded
            raise exceeded

    def _exceeded(self, kind: str) -> LimitExceeded | None:
        limits = self.limits
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return LimitExceeded("timeout_s", f"the run reached its time limit of {limits.timeout_s:g} s")
        if limits.max_tokens is not None and self.input_tokens + self.output_tokens >= limits.max_tokens:
            return LimitExceeded("max_tokens", f"the run used its token budget of {limits.max_tokens:,} tokens")
        cost = self.cost_usd
        if limits.max_cost_usd is not None and cost is not None and cost >= limits.max_cost_usd:
            return LimitExceeded("max_cost_usd", f"the run spent its budget of ${limits.max_cost_usd:g}")
        if kind == "sub" and limits.max_subcalls is not None and self.subcalls_started >= limits.max_subcalls:
            return LimitExceeded("max_subcalls", f"the run made its maximum of {limits.max_subcalls:,} sub-calls")
        return None

    def record(self, completion: Completion) -> None:
        self.usage.setdefault(completion.model, ModelUsage()).add(completion)

    @contextlib.asynccontextmanager
    async def subcall(self) -> AsyncIterator[Callable[[Completion], None]]:
        """``async with budget.subcall() as done: done(await model_call())``: one sub-call.

        Waits for a slot, then checks the limits (after the wait: the calls before it have been
        counted), counts it started and in flight; ``done(completion)`` records its usage and
        counts it done. A call that raises is counted started, never done."""
        async with self.slots:
            self.check("sub")
            self.subcalls_started += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            finished: list[Completion] = []
            try:
                yield finished.append
            finally:
                self.in_flight -= 1
        for completion in finished:
            self.record(completion)
            self.subcalls_done += 1
