"""Runs in the background: start, wait with a deadline, poll, cancel, and a cap on concurrency.

Some MCP hosts drop a tool call after ~60 s, so a run must outlive the call that started it:
``rlm_complete`` waits ``wait_s`` and hands back a run id; ``rlm_get_result`` picks it up later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydantic

from rlm_mcp.engine.budget import ModelUsage
from rlm_mcp.engine.loop import RlmEngine
from rlm_mcp.engine.results import RunEvent, RunRequest, RunResult
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.engine.trajectory import (
    check_run_id,
    excerpt,
    now_iso,
    process_gone,
    process_identity,
    read_metadata,
    read_trajectory,
    rewrite_metadata,
    unique_run_id,
)
from rlm_mcp.errors import RlmError, RunNotFound, quoted

if TYPE_CHECKING:
    from rlm_mcp.store import ContextInfo

log = logging.getLogger(__name__)

FINISHED_RUNS_KEPT = 500           # finished runs kept in memory, newest first ...
FINISHED_RUNS_MAX_BYTES = 64 << 20  # ... within this many bytes (answers can be megabytes)
RUN_OVERHEAD_BYTES = 4_096          # a finished run's objects besides its strings, roughly
QUERY_KEPT_CHARS = 1_000
SERVER_STOPPED = "the server stopped during the run"
FINISHED = ("completed", "limit_reached", "failed", "cancelled")


@dataclass
class Run:
    """A run the manager knows about, finished or not."""

    run_id: str
    request: RunRequest | None  # None once the run has ended: a query can be megabytes
    query: str = ""  # an excerpt, kept after the end
    task: asyncio.Task[RunResult] | None = None
    result: RunResult | None = None
    last_event: RunEvent | None = None
    queued: bool = True
    started_at: float = field(default_factory=time.monotonic)
    listeners: list[Callable[[RunEvent], None]] = field(default_factory=list)
    check: Callable[[], None] | None = None  # blocking; raises RlmError if the context was altered

    @property
    def done(self) -> bool:
        return self.result is not None

    def release(self) -> None:
        """Drop what only an unfinished run needs."""
        self.request = None
        self.check = None
        self.listeners.clear()

    def kept_bytes(self) -> int:
        """Roughly what this run holds in memory once finished."""
        strings = [self.query] + ([self.result.answer or "", self.result.error or ""] if self.result else [])
        return RUN_OVERHEAD_BYTES + sum(sys.getsizeof(text) for text in strings)

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

    def start(self, request: RunRequest, listener: Callable[[RunEvent], None] | None = None,
              check: Callable[[], None] | None = None) -> Run:
        """Validate and start a run in the background (raises for an invalid request).

        ``check`` (blocking) verifies the context; it runs in a thread alongside the run, and
        if it raises RlmError the run is stopped and fails with that message, answer withheld."""
        self.engine.prepare(request)
        run = Run(unique_run_id(), request, query=excerpt(request.query, QUERY_KEPT_CHARS), check=check)
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
                run.result = await self._checked_run(run, on_event)
        except asyncio.CancelledError:
            run.result = self._cancelled(run)
            raise
        except RlmError as exc:  # refused after the start, e.g. a model string litellm cannot route
            run.result = RunResult(run_id=run.run_id, status="failed", error=str(exc))
        except Exception as exc:  # engine.run reports failures itself; this is a safety net
            log.exception("run %s crashed", run.run_id)
            run.result = RunResult(run_id=run.run_id, status="failed", error=f"internal error: {exc!r}")
        finally:
            run.release()
            self._forget_old()
        return run.result

    async def _checked_run(self, run: Run, on_event: Callable[[RunEvent], None]) -> RunResult:
        """The engine's run, with ``run.check`` in a thread alongside it: hashing a large context
        takes ~0.1 s per 100 MB, which overlaps the sandbox start and the first model call
        instead of delaying them. No answer is returned unless the check passed."""
        assert run.request is not None
        work = self.engine.run(run.request, run_id=run.run_id, on_event=on_event)
        if run.check is None:
            return await work
        engine = asyncio.create_task(work, name=f"{run.run_id}-engine")
        try:
            try:
                await asyncio.to_thread(run.check)
            except RlmError as exc:
                engine.cancel()
                await asyncio.gather(engine, return_exceptions=True)
                return self._refused(run, str(exc))
            return await engine
        finally:
            if not engine.done():  # this run was cancelled (rlm_cancel, client gone, shutdown)
                engine.cancel()
                await asyncio.gather(engine, return_exceptions=True)

    def _refused(self, run: Run, error: str) -> RunResult:
        """A run stopped because its context failed the check; its trajectory says so too."""
        log.error("run %s stopped: %s", run.run_id, error)
        path = self.engine.trajectory_path(run.run_id)
        if path.exists():
            with contextlib.suppress(OSError, ValueError):
                rewrite_metadata(path, {**read_metadata(path), "status": "failed", "error": error, "answer": None})
        event = run.last_event
        return RunResult(run_id=run.run_id, status="failed", error=error,
                         iterations=event.iteration if event else 0,
                         subcalls=event.subcalls_done if event else 0,
                         elapsed_s=round(time.monotonic() - run.started_at, 3),
                         trajectory_path=str(path) if path.exists() else None)

    def _cancelled(self, run: Run) -> RunResult:
        path = self.engine.trajectory_path(run.run_id)
        answer = None
        if path.exists():
            with contextlib.suppress(Exception):
                answer = read_trajectory(path)[0].get("answer")
        event = run.last_event
        return RunResult(run_id=run.run_id, status="cancelled", answer=answer, error="the run was cancelled",
                         partial=answer is not None,
                         iterations=event.iteration if event else 0,
                         subcalls=event.subcalls_done if event else 0,
                         elapsed_s=round(time.monotonic() - run.started_at, 3),
                         trajectory_path=str(path) if path.exists() else None)

    def get(self, run_id: str) -> Run:
        run = self.runs.get(run_id) if isinstance(run_id, str) else None
        if run is None:
            check_run_id(run_id)
            raise RunNotFound(f"unknown run_id {quoted(run_id)}: use the run_id that rlm_complete returned "
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
            run.release()
            self._forget_old()
        return run

    def trajectory(self, run_id: str) -> Path | None:
        """The run's trajectory file, or None if it has none. A run left "running" by a server
        that died is marked failed first, so every tool tells the same story about it."""
        path = self.engine.trajectory_path(check_run_id(run_id))
        if not path.is_file():
            return None
        settle(path)
        return path

    def stored_result(self, run_id: str) -> RunResult | None:
        """A finished run's outcome read back from its trajectory (e.g. after a restart)."""
        path = self.trajectory(run_id)
        if path is None:
            return None
        meta, iterations = read_trajectory(path)
        status = meta.get("status")
        if status == "running":  # its server is alive: this one (a child RLM) or another one
            owner = str(meta.get("server") or "")
            if owner == process_identity():
                raise RunNotFound(f"run {run_id} is a child RLM still running inside run {run_id.split('.')[0]}: "
                                  "follow that run with rlm_get_result")
            raise RunNotFound(f"run {run_id} is still running in another rlm-mcp server (process "
                              f"{owner.partition(':')[0]}) that shares this data directory: ask that server")
        usage = {}
        with contextlib.suppress(pydantic.ValidationError, AttributeError, TypeError):
            usage = {model: ModelUsage.model_validate(value) for model, value in (meta.get("usage") or {}).items()}
        answer = meta.get("answer")
        return RunResult(run_id=run_id, status=status if status in FINISHED else "failed", answer=answer,
                         partial=answer is not None and status != "completed", continued_from=meta.get("continued_from"),
                         limit=meta.get("limit"), error=meta.get("error"),
                         # the metadata's count: iteration lines include last answer-now calls
                         iterations=meta.get("iterations") or len(iterations),
                         subcalls=meta.get("subcalls") or 0, usage=usage, elapsed_s=meta.get("elapsed_s") or 0.0,
                         trajectory_path=str(path))

    def settle_all(self) -> int:
        """Mark failed every trajectory a dead server left "running" (at server start, in a
        thread: it reads one line per trajectory file). Returns how many were marked."""
        settled = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.engine.trajectory_dir):
                if entry.name.endswith(".jsonl") and not entry.name.startswith("."):
                    with contextlib.suppress(OSError):
                        settled += settle(Path(entry.path))
        if settled:
            log.info("marked %d runs of stopped servers as failed", settled)
        return settled

    async def stop(self, grace_s: float) -> list[str]:
        """A server shutting down: cancel every unfinished run and give them ``grace_s`` seconds
        to close their sandboxes and record their end. Every trajectory of theirs still saying
        "running" or "cancelled" (a run that overran the grace, a child RLM) is then marked
        cancelled because the server stopped: the story rlm_get_result tells after a restart.
        Returns the ids of the runs still unwinding when the grace ran out."""
        live = [run for run in self.runs.values() if run.task is not None and not run.task.done()]
        tasks = [run.task for run in live if run.task is not None]
        for task in tasks:
            task.cancel(SERVER_STOPPED)
        pending: set[asyncio.Task[RunResult]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for run in live:
            with contextlib.suppress(OSError):
                for path in self.engine.trajectory_dir.glob(f"{run.run_id}*.jsonl"):  # the run and its children
                    with contextlib.suppress(OSError, ValueError):
                        meta = read_metadata(path)
                        if meta.get("status") in ("running", "cancelled"):
                            rewrite_metadata(path, {**meta, "status": "cancelled", "error": SERVER_STOPPED,
                                                    "finished_at": meta.get("finished_at") or now_iso()})
        return [run.run_id for run in live if run.task in pending]

    async def aclose(self) -> None:
        """Cancel every unfinished run (their sandboxes are closed by the engine)."""
        tasks = [run.task for run in self.runs.values() if run.task is not None and not run.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _forget_old(self) -> None:
        """Keep the newest finished runs within a count and a byte budget; older ones leave
        memory and are read back from their trajectory when asked for."""
        count = size = 0
        for run in reversed([run for run in self.runs.values() if run.done]):
            count += 1
            size += run.kept_bytes()
            if count > FINISHED_RUNS_KEPT or size > FINISHED_RUNS_MAX_BYTES:
                del self.runs[run.run_id]


def settle(path: Path) -> bool:
    """If the trajectory at ``path`` says "running" but the process that wrote it is gone,
    rewrite its metadata line as failed. True if it did."""
    meta = read_metadata(path)
    if meta.get("status") != "running":
        return False
    owner = meta.get("server")
    if isinstance(owner, str) and not process_gone(owner):
        return False
    rewrite_metadata(path, {**meta, "status": "failed", "error": SERVER_STOPPED, "finished_at": now_iso()})
    log.info("run %s: %s (marked failed)", meta.get("run_id") or path.stem, SERVER_STOPPED)
    return True


def shape_of(info: "ContextInfo") -> ContextShape:
    """What the root model is told about a stored context."""
    return ContextShape(kind=info.kind, characters=info.characters, documents=info.documents,
                        document_lengths=tuple(info.document_lengths), name=info.name)
