"""What a run takes and gives back: the request, its progress events and its result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from rlm_mcp.config import Limits
from rlm_mcp.engine.budget import ModelUsage
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.sandbox import ContextFile

RunStatus = Literal["completed", "limit_reached", "failed", "cancelled"]
EventKind = Literal["iteration", "subcalls", "done", "iteration_done"]


@dataclass
class RunRequest:
    """One question over one context. ``None`` fields fall back to the settings."""

    query: str
    context: ContextFile | None = None  # None: the context of the run in ``continue_from``
    shape: ContextShape | None = None
    model: str | None = None
    sub_model: str | None = None
    sandbox: str | None = None
    limits: Limits | None = None
    # A finished run to build on: with a query, a follow-up in its sandbox (if still kept) that
    # is told the earlier turns; with an empty query, the same loop resumed after its limit.
    continue_from: str | None = None
    system_prompt: str | None = None  # a template (prompts.PLACEHOLDERS); None: the settings'


@dataclass(frozen=True)
class RunEvent:
    """Progress, for the CLI's stderr line and the server's progress notifications.

    ``iteration_done`` comes after an iteration of any RLM of the tree was written to its
    trajectory; ``detail`` is then that trajectory line (reply, code blocks with their output and
    sub-calls, final answer) plus ``rlm_id``, the RLM's own run id (``run_id`` is the root's)."""

    run_id: str
    kind: EventKind
    depth: int
    iteration: int
    max_iterations: int
    subcalls_done: int
    subcalls_started: int
    tokens: int
    cost_usd: float | None
    detail: Mapping[str, Any] | None = None

    @property
    def message(self) -> str:
        cost = f", ${self.cost_usd:.4f}" if self.cost_usd is not None else ""
        where = f"iteration {self.iteration}/{self.max_iterations}"
        if self.depth > 1:
            where += f" (child depth {self.depth})"
        return f"{where}, {self.subcalls_done}/{self.subcalls_started} sub-calls, {self.tokens:,} tokens{cost}"


class RunResult(BaseModel):
    """The outcome of a run."""

    run_id: str
    status: RunStatus
    answer: str | None = None
    limit: str | None = None
    error: str | None = None
    iterations: int = 0
    subcalls: int = 0
    max_subcalls_in_flight: int = 0
    usage: dict[str, ModelUsage] = {}
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    elapsed_s: float = 0.0
    trajectory_path: str | None = None
    notes: list[str] = []  # what the sandbox could not enforce on this host, or ran into (limits)
    partial: bool = False  # the answer is a draft or last words of a run cut short, not a submitted one
    continued_from: str | None = None
    compactions: int = 0  # times the root conversation was summarised to fit the model's window
