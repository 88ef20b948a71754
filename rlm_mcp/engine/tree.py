"""The state a run shares with all its child RLMs: budget, limits, the partial answer so far,
and the progress events sent to whoever started the run."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlm_mcp.config import Limits
from rlm_mcp.engine import replies
from rlm_mcp.engine.budget import Budget
from rlm_mcp.engine.results import EventKind, RunEvent

log = logging.getLogger(__name__)

EVENT_INTERVAL_S = 0.25  # sub-call progress events are throttled to this rate


@dataclass
class Tree:
    """State shared by a run and all its child RLMs."""

    run_id: str
    budget: Budget
    sandbox: str | None
    workdir: Path
    on_event: Callable[[RunEvent], None] | None
    root_iterations: int = 0
    child_slots: dict[int, asyncio.Semaphore] = field(default_factory=dict)
    draft: str | None = None  # answer["content"] set but not marked ready
    last_reply: str | None = None  # the root model's last reply
    final_attempt: str | None = None  # the reply to the last "answer now" call after a limit
    compactions: int = 0
    child_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    last_event: float = 0.0
    notes: list[str] = field(default_factory=list)  # from every sandbox of the tree, each once

    @property
    def limits(self) -> Limits:
        """The run's limits: the budget's, which holds the tree to them."""
        return self.budget.limits

    @property
    def partial(self) -> str | None:
        """The best partial answer so far, for runs that end early: the last "answer now" reply,
        else the draft answer, else the last reply's substantive text (never a connective
        between two code blocks)."""
        return self.final_attempt or self.draft or (replies.substantive(self.last_reply) if self.last_reply else None)

    def emit(self, kind: EventKind, depth: int, iteration: int, force: bool = False,
             detail: Mapping[str, Any] | None = None) -> None:
        """Tell the run's starter how far it got; sub-call events at most every EVENT_INTERVAL_S."""
        if self.on_event is None:
            return
        now = time.monotonic()
        if not force and kind == "subcalls" and now - self.last_event < EVENT_INTERVAL_S:
            return
        self.last_event = now
        budget = self.budget
        event = RunEvent(self.run_id, kind, depth, iteration, self.limits.max_iterations,
                         budget.subcalls_done, budget.subcalls_started,
                         budget.input_tokens + budget.output_tokens, budget.cost_usd, detail)
        try:
            self.on_event(event)
        except Exception:  # a broken progress consumer must not end the run
            log.exception("progress callback failed")
