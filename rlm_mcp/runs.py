"""Runs in the background: start, wait with a deadline, poll, cancel, and a cap on concurrency.

Some MCP hosts drop a tool call after ~60 s, so a run must outlive the call that started it:
``rlm_complete`` waits ``wait_s`` and hands back a run id; ``rlm_get_result`` picks it up later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlm_mcp.engine import RlmEngine, RunEvent, RunRequest, RunResult
from rlm_mcp.errors import RunNotFound
from rlm_mcp.prompts import ContextShape
from rlm_mcp.trajectory import read_trajectory, unique_run_id

if TYPE_CHECKING:
    from rlm_mcp.store import ContextInfo

log = logging.getLogger(__name__)

FINISHED_RUNS_KEPT = 500


@dataclass
class Run:
    """A run the manager knows about, finished or not."""

    run_id: str
    request: RunRequest
    task: asyncio.Task[RunResult] | None = None
    result: RunResult | None = None
    last_event: RunEvent | None = None
    queued: bool = True
    started_at: float = field(default_factory=time.monotonic)
    listeners: list[Callable[[RunEvent], None]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.result is not None

    def progress_message(self) -> str:
        if self.queued:
            return "queued: waiting for a free run slot"
        return self.last_event.message if self.last_event else "starting"


class RunManager:
    """Owns every run of one server: a cap on how many run at once, a queue beyond it."""

    def __init__(self, engine: RlmEngine, max_runs: int) -> None:
        self.engine = engine
        self.slots = asyncio.Semaphore(max_runs)
        self.runs: dict[str, Run] = {}

    def start(self, request: RunRequest, listener: Callable[[RunEvent], None] | None = None) -> Run:
        """Validate and start a run in the background (raises for an invalid request)."""
        self.engine.prepare(request)
        run = Run(unique_run_id(), request)
        if listener is not None:
            run.listeners.append(listener)
        run.task = asyncio.create_task(self._drive(run), name=run.run_id)
        self.runs[run.run_id] = run
        self._forget_old()
        return run

    async def _drive(self, run: Run) -> RunResult:
        def on_event(event: RunEvent) -> None:
            run.last_event = event
            for listener in list(run.listeners):
                listener(event)

        try:
            async with self.slots:
                run.queued = False
                run.started_at = time.monotonic()
                run.result = await self.engine.run(run.request, run_id=run.run_id, on_event=on_event)
        except asyncio.CancelledError:
            run.result = self._cancelled(run)
            raise
        except Exception as exc:  # engine.run reports failures itself; this is a safety net
            log.exception("run %s crashed", run.run_id)
            run.result = RunResult(run_id=run.run_id, status="failed", error=f"internal error: {exc!r}")
        return run.result

    def _cancelled(self, run: Run) -> RunResult:
        path = self.engine.trajectory_path(run.run_id)
        answer = None
        if path.exists():
            with contextlib.suppress(Exception):
                answer = read_trajectory(path)[0].get("answer")
        event = run.last_event
        return RunResult(run_id=run.run_id, status="cancelled", answer=answer, error="the run was cancelled",
                         iterations=event.iteration if event else 0,
                         subcalls=event.subcalls_done if event else 0,
                         elapsed_s=round(time.monotonic() - run.started_at, 3),
                         trajectory_path=str(path) if path.exists() else None)

    def get(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise RunNotFound(f"unknown run_id {run_id!r}: use the run_id that rlm_complete returned "
                              "(runs from before a server restart only have their trajectory)")
        return run

    async def wait(self, run_id: str, wait_s: float) -> Run:
        """Wait up to ``wait_s`` for the run to finish; return it either way."""
        run = self.get(run_id)
        if run.task is not None and not run.done:
            # asyncio.wait never cancels the run; the caller's own cancellation still propagates.
            await asyncio.wait({run.task}, timeout=max(0.0, wait_s))
        return run

    async def cancel(self, run_id: str) -> Run:
        """Stop a run and its sandboxes; returns it with its final (cancelled) result."""
        run = self.get(run_id)
        if run.task is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run.task
        if run.result is None:  # cancelled before its first step ran
            run.result = self._cancelled(run)
        return run

    def stored_result(self, run_id: str) -> RunResult | None:
        """A finished run's outcome read back from its trajectory (e.g. after a restart)."""
        path = self.engine.trajectory_path(run_id)
        if not _safe_run_id(run_id) or not path.exists():
            return None
        meta, iterations = read_trajectory(path)
        status = meta.get("status")
        if status == "running":
            status = "failed"  # the server that ran it is gone
        return RunResult(run_id=run_id, status=status or "failed", answer=meta.get("answer"),
                         limit=meta.get("limit"), error=meta.get("error") or (
                             "the server stopped before this run finished" if meta.get("status") == "running" else None),
                         iterations=len(iterations), elapsed_s=meta.get("elapsed_s") or 0.0,
                         trajectory_path=str(path))

    async def aclose(self) -> None:
        """Cancel every unfinished run (their sandboxes are closed by the engine)."""
        tasks = [run.task for run in self.runs.values() if run.task is not None and not run.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _forget_old(self) -> None:
        finished = [run_id for run_id, run in self.runs.items() if run.done]
        for run_id in finished[:max(0, len(finished) - FINISHED_RUNS_KEPT)]:
            del self.runs[run_id]


def _safe_run_id(run_id: str) -> bool:
    return bool(run_id) and Path(run_id).name == run_id and all(c.isalnum() or c in "-_." for c in run_id)


def shape_of(info: "ContextInfo") -> ContextShape:
    """What the root model is told about a stored context."""
    return ContextShape(kind=info.kind, characters=info.characters, documents=info.documents,
                        document_lengths=tuple(info.document_lengths), name=info.name)
