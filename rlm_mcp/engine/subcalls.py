"""One RLM's model calls: its own root calls, and the ``llm_query`` / ``rlm_query`` calls its
REPL code makes, each counted against the tree's budget. ``rlm_query`` below the depth limit
starts a child RLM (through the ``run_child`` its RLM gives); above it, it is an ``llm_query``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

from rlm_mcp.engine.budget import Tally
from rlm_mcp.engine.models import Completion, Models
from rlm_mcp.engine.trajectory import excerpt
from rlm_mcp.engine.tree import Tree
from rlm_mcp.errors import RlmError

RunChild = Callable[[str, "str | None"], Awaitable[tuple[str, dict[str, Any]]]]


class SubCalls:
    """Serves one RLM's calls; ``cell_calls`` records those of the cell running now."""

    def __init__(self, models: Models, tree: Tree, *, depth: int, model: str, sub_model: str,
                 extra_models: Iterable[str], run_child: RunChild, tally: Tally) -> None:
        self.models = models
        self.tree = tree
        self.depth = depth
        self.model = model
        self.sub_model = sub_model
        self.extra_models = tuple(extra_models)  # RLM_MCP_ALLOWED_MODELS
        self.run_child = run_child
        self.tally = tally  # this RLM's own usage; the budget counts the whole tree's
        self.iteration = 0  # the RLM's, for progress events
        self.cell_calls: list[dict[str, Any]] = []

    def start_cell(self) -> None:
        """A new cell starts: its calls go to a list of their own (the last one's is logged)."""
        self.cell_calls = []

    async def call_model(self, kind: Literal["root", "sub"], model: str,
                         messages: list[dict[str, str]]) -> Completion:
        budget = self.tree.budget
        if kind == "root":
            budget.check(kind)
            completion = await self.models.complete(model, messages)
            budget.record(completion)
            self.tally.record(completion)
            return completion
        async with budget.subcall() as done:
            completion = await self.models.complete(model, messages)
            done(completion)
        self.tally.record(completion)
        self.tree.emit("subcalls", self.depth, self.iteration, force=budget.in_flight == 0)
        return completion

    async def serve(self, op: str, prompt: str, model: str | None) -> str:
        """The sandbox's ``llm_query`` / ``rlm_query`` handler."""
        started = time.monotonic()
        if model is not None and model not in self.allowed_models():
            # The model name comes from code the root model wrote, possibly steered by the input.
            raise RlmError(f"model {model!r} is not allowed for sub-calls: omit model= to use "
                           f"{self.sub_model!r}, or use one of {sorted(self.allowed_models())}")
        if op == "rlm_query" and self.depth < self.tree.limits.max_depth:
            text, usage = await self._child(prompt, model)
            used_model = model or self.model
            tokens_in = tokens_out = 0  # a child RLM's tokens are in its own trajectory (usage_summary.tokens)
        elif op in ("llm_query", "rlm_query"):
            used_model = model or self.sub_model
            completion = await self.call_model("sub", used_model, [{"role": "user", "content": prompt}])
            text = completion.text
            usage = {"input_tokens": completion.input_tokens, "output_tokens": completion.output_tokens,
                     "cost_usd": completion.cost_usd}
            tokens_in, tokens_out = completion.input_tokens, completion.output_tokens
        else:
            raise RlmError(f"unknown sub-call {op!r}")
        # prompt_tokens / completion_tokens / execution_time: the reference visualizer's names;
        # start_s (seconds since the root run started) lets the viewer draw sub-calls in flight.
        self.cell_calls.append({"root_model": used_model, "prompt": excerpt(prompt, 500),
                                "response": excerpt(text, 500), "usage_summary": usage,
                                "prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                                "start_s": round(started - self.tree.budget.started, 4),
                                "execution_time": round(time.monotonic() - started, 4)})
        return text

    def allowed_models(self) -> set[str]:
        """Models REPL code may name: the run's two and those in RLM_MCP_ALLOWED_MODELS."""
        return {self.model, self.sub_model, *self.extra_models}

    async def _child(self, prompt: str, model: str | None) -> tuple[str, dict[str, Any]]:
        # One limit per depth level (a shared one could deadlock parents waiting on children).
        slots = self.tree.child_slots.get(self.depth + 1)
        if slots is None:  # made once per level, not a throw-away semaphore per call
            slots = self.tree.child_slots[self.depth + 1] = asyncio.Semaphore(self.tree.limits.max_concurrency)
        async with slots:
            return await self.run_child(prompt, model)
