"""Follow-up questions and continued runs: kept sandboxes and what an earlier run left behind.

A finished run's sandbox (its REPL, with every variable the run made) is kept for an idle TTL
so that ``continue_from`` can ask a follow-up in it. Kept sandboxes still hold their slot under
RLM_MCP_MAX_SANDBOXES; the keeper gives them up (oldest first) whenever a new sandbox would
otherwise wait, so an idle REPL never delays a run. Everything else a continuation needs (the
root conversation, the earlier turns, the context, usage so far) is read back from the earlier
run's trajectory, so a continuation works after a server restart too, with history only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlm_mcp.engine.replies import substantive
from rlm_mcp.engine.trajectory import excerpt, read_trajectory
from rlm_mcp.sandbox import Sandbox, SandboxSlots

log = logging.getLogger(__name__)

TURN_QUERY_CHARS = 1_000
TURN_ANSWER_CHARS = 2_000
TURN_NOTES_CHARS = 400
MAX_TURNS = 20  # earlier turns told to a follow-up's root model; older ones are dropped


class Dispatch:
    """The sub-call handler a sandbox is created with. It forwards to the RLM currently using
    the sandbox, so a kept sandbox serves the follow-up run's ``llm_query`` calls."""

    def __init__(self, target: Callable[[str, str, str | None], Awaitable[str]]) -> None:
        self.target = target

    async def __call__(self, op: str, prompt: str, model: str | None) -> str:
        return await self.target(op, prompt, model)


@dataclass
class KeptSandbox:
    """An idle sandbox of a finished run, with what closes it (its slot included)."""

    run_id: str
    sandbox: Sandbox
    dispatch: Dispatch
    closer: contextlib.AsyncExitStack
    backend: str
    context_path: Path | None
    kept_at: float = 0.0


class SandboxKeeper:
    """Idle sandboxes of finished runs, by run id, within a TTL, a count and a memory cap."""

    def __init__(self, slots: SandboxSlots, *, ttl_s: float, max_count: int, max_memory_mb: int,
                 sandbox_memory_mb: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.ttl_s = ttl_s
        self.max_count = max_count
        self.max_memory_mb = max_memory_mb
        self.sandbox_memory_mb = sandbox_memory_mb
        self.clock = clock
        self.kept: OrderedDict[str, KeptSandbox] = OrderedDict()  # oldest first
        self._closing: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        slots.reclaim = self.reclaim

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_count > 0

    def keep(self, kept: KeptSandbox) -> bool:
        """Keep ``kept`` for follow-ups; False (the caller closes it) when sandboxes are not kept,
        a run is waiting for a slot, or it alone exceeds the memory cap."""
        if not self.enabled or self.slots.waiters or self.sandbox_memory_mb > self.max_memory_mb:
            return False
        kept.kept_at = self.clock()
        self.kept[kept.run_id] = kept
        while len(self.kept) > self.max_count or len(self.kept) * self.sandbox_memory_mb > self.max_memory_mb:
            self._close(next(iter(self.kept)), "the cap on kept sandboxes")
        self._arm()
        return True

    def take(self, run_id: str) -> KeptSandbox | None:
        """The kept sandbox of ``run_id``, now owned by the caller (None if there is none)."""
        self.sweep()
        return self.kept.pop(run_id, None)

    def sweep(self) -> int:
        """Close every kept sandbox idle for longer than the TTL; how many were closed."""
        now = self.clock()
        expired = [run_id for run_id, kept in self.kept.items() if now - kept.kept_at >= self.ttl_s]
        for run_id in expired:
            self._close(run_id, f"{self.ttl_s:g} s idle")
        self._arm()
        return len(expired)

    def reclaim(self) -> None:
        """A sandbox is about to wait for a slot: give up the oldest kept one."""
        if self.kept:
            self._close(next(iter(self.kept)), "a new sandbox needed its slot")

    async def drain(self) -> None:
        """Wait until the sandboxes being closed are closed."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for run_id in list(self.kept):
            self._close(run_id, "the server is stopping")
        await self.drain()

    def discard(self, kept: KeptSandbox) -> None:
        """Close a sandbox taken with :meth:`take` that will not be used after all."""
        self.kept[kept.run_id] = kept
        self._close(kept.run_id, "the follow-up needs another backend or context")

    def _close(self, run_id: str, why: str) -> None:
        kept = self.kept.pop(run_id)
        log.info("closing the kept sandbox of run %s (%s)", run_id, why)
        task = asyncio.get_running_loop().create_task(self._aclose(kept), name=f"close-kept-{run_id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _aclose(kept: KeptSandbox) -> None:
        try:
            await kept.closer.aclose()
        except Exception as exc:  # a sandbox that fails to close must not break the server
            log.warning("closing the kept sandbox of run %s failed: %r", kept.run_id, exc)

    def _arm(self) -> None:
        """One timer, for the oldest kept sandbox's expiry."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.kept:
            oldest = next(iter(self.kept.values()))
            delay = max(0.0, oldest.kept_at + self.ttl_s - self.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self.sweep)


@dataclass
class Earlier:
    """What a continuation takes from the run it continues (read from its trajectory)."""

    run_id: str
    meta: dict[str, Any]
    records: list[dict[str, Any]]
    messages: list[dict[str, str]] = field(default_factory=list)  # the root conversation at its end
    turns: list[dict[str, Any]] = field(default_factory=list)     # earlier turns, this run's last

    @property
    def iterations(self) -> int:
        return int(self.meta.get("iterations") or 0)


def load_earlier(path: Path, run_id: str) -> Earlier:
    """The earlier run's trajectory, its conversation rebuilt and its turn summarised (blocking)."""
    meta, records = read_trajectory(path)
    earlier = Earlier(run_id, meta, records, messages=rebuild_messages(meta, records))
    earlier.turns = (list(meta.get("turns") or []) + [turn_of(meta, records)])[-MAX_TURNS:]
    return earlier


def rebuild_messages(meta: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The root conversation as it stood when the run ended: every iteration line adds the
    messages sent since the one before and the reply; a compaction replaces what came before;
    ``pending_messages`` are those sent after the last logged reply."""
    messages: list[dict[str, str]] = []
    for record in records:
        compaction = record.get("compaction")
        if isinstance(compaction, dict) and isinstance(compaction.get("messages"), list):
            messages = list(compaction["messages"])
        messages.extend(record.get("prompt") or [])
        messages.append({"role": "assistant", "content": record.get("response") or ""})
    messages.extend(meta.get("pending_messages") or [])
    return messages


def turn_of(meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """One earlier run, compactly: its query, outcome, answer, variables, last notes."""
    variables: list[str] = []
    notes = None
    for record in reversed(records):
        cells = record.get("code_blocks") or []
        if not variables and cells:
            names = (cells[-1].get("result") or {}).get("locals") or {}
            variables = [f"{name} ({str(kind).split(' = ')[0]})" for name, kind in list(names.items())[:30]]
        if notes is None:
            notes = substantive(record.get("response") or "")
        if variables and notes is not None:
            break
    answer = meta.get("answer")
    return {"run_id": meta.get("run_id"), "query": excerpt(str(meta.get("query") or ""), TURN_QUERY_CHARS),
            "status": meta.get("status"), "iterations": meta.get("iterations") or len(records),
            "answer": excerpt(str(answer), TURN_ANSWER_CHARS) if answer is not None else None,
            "variables": variables, "notes": excerpt(notes, TURN_NOTES_CHARS) if notes else None}
