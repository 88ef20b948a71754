"""Host side of the worker protocol, shared by every backend that runs ``worker.py``.

A backend only has to say how to launch one worker process and hand back its byte pipes
(:class:`WorkerTransport`); :class:`WorkerSandbox` does the rest: the init handshake, cells,
serving ``llm_query``/``rlm_query`` calls, interrupts, and restarting a dead or stuck worker.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlm_mcp.errors import RlmError, SandboxError
from rlm_mcp.sandbox.base import CellResult, Sandbox, SandboxSpec

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("worker.py")
MAX_CALLS_IN_FLIGHT = 64  # per worker: bounds host memory held by prompts read off the channel


def describe_stop(exit_code: int | None, signal_number: int | None, stderr_tail: Iterable[str]) -> str:
    """'killed by SIGKILL: <last stderr lines>' / 'exit code 3' / 'the worker stopped answering'."""
    if signal_number is not None:
        try:
            reason = f"killed by {signal.Signals(signal_number).name}"
        except ValueError:
            reason = f"killed by signal {signal_number}"
    elif exit_code is None:
        reason = "the worker stopped answering"
    else:
        reason = f"exit code {exit_code}"
    tail = [line for line in stderr_tail if line.strip()][-3:]
    return reason + (": " + " | ".join(tail) if tail else "")


class WorkerGone(Exception):
    """The worker process ended or its channel closed."""


class WorkerTransport(abc.ABC):
    """Byte pipes to one running worker process."""

    @abc.abstractmethod
    async def send(self, data: bytes) -> None:
        """Write bytes to the worker's stdin (raise WorkerGone if it is closed)."""

    @abc.abstractmethod
    async def receive_line(self) -> bytes:
        """Next line from the worker's stdout; ``b""`` once the worker is gone."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop the worker at once (and anything it started)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close stdin so the worker exits, then make sure it is gone and cleaned up."""

    async def settle(self, timeout: float = 1.0) -> None:
        """Wait briefly for the worker's exit status to be known (used before describe_exit)."""

    def describe_exit(self) -> str:
        """Why the worker went away, for the model and the logs (exit code, stderr tail)."""
        return "the worker process exited"


class WorkerSandbox(Sandbox):
    """A :class:`Sandbox` driving ``worker.py`` over a :class:`WorkerTransport`."""

    ready_timeout_s: float = 120.0
    interrupt_grace_s: float = 2.0

    def __init__(self, spec: SandboxSpec) -> None:
        super().__init__(spec)
        self._transport: WorkerTransport | None = None
        self._last_transport: WorkerTransport | None = None  # for describing how a worker ended
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._cell: asyncio.Future[dict[str, Any]] | None = None
        self._gone: asyncio.Event = asyncio.Event()
        self._call_tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self._cell_counter = 0
        self._closed = False
        self.restarts = 0

    # ----- what a backend provides ----------------------------------------------------------

    @abc.abstractmethod
    async def _launch(self) -> WorkerTransport:
        """Start one worker process running ``worker.py``."""

    def _worker_context_path(self) -> str | None:
        """Where the worker finds the context file (backends that mount it elsewhere override)."""
        path = self.spec.context.path
        return None if path is None else str(path)

    async def _release(self) -> None:
        """Free backend resources after the last worker is gone (containers, sandboxes)."""

    # ----- Sandbox ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._spawn()

    async def execute(self, code: str, *, timeout: float) -> CellResult:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        notices: list[str] = []
        if self._transport is None or self._gone.is_set():
            await self._respawn()
            notices.append("note: the REPL worker had stopped and was restarted; earlier variables are lost")
        self._cell_counter += 1
        loop = asyncio.get_running_loop()
        cell = self._cell = loop.create_future()
        try:
            await self._send({"type": "exec", "cell": self._cell_counter, "code": code,
                              "max_output_chars": self.spec.max_output_chars})
        except WorkerGone:
            self._gone.set()  # handled below like a worker that died mid-cell
        outcome = await self._wait_cell(cell, timeout)
        if outcome is not None:
            result = self._to_result(outcome)
            result.notices[:0] = notices
            return result
        if self._gone.is_set():
            reason = await self._describe_exit()
            await self._respawn()
            return CellResult(
                error=(f"The REPL worker died while running this cell ({reason}). A fresh worker "
                       "was started with `context` loaded again, but all other variables are lost."),
                notices=notices, state_lost=True)
        # Timed out: stop the cell's sub-calls (they would spend budget for nothing and keep the
        # reader waiting for slots), ask nicely (KeyboardInterrupt in the cell), then kill.
        for task in list(self._call_tasks):
            task.cancel()
        with contextlib.suppress(WorkerGone):
            await self._send({"type": "interrupt"})
        outcome = await self._wait_cell(cell, self.interrupt_grace_s)
        if outcome is not None:
            result = self._to_result(outcome)
            result.timed_out = True
            result.error = (f"The cell exceeded its {timeout:g} s time limit and was interrupted "
                            "(REPL state is kept).")
            return result
        await self._respawn()
        return CellResult(
            error=(f"The cell exceeded its {timeout:g} s time limit and did not stop when "
                   "interrupted, so the REPL worker was killed and restarted: `context` is loaded "
                   "again, all other variables are lost."),
            notices=notices, state_lost=True, timed_out=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop_worker(graceful=True)
        await self._release()

    # ----- internals ------------------------------------------------------------------------

    async def _spawn(self) -> None:
        self._gone = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._transport = await self._launch()
        self._reader = asyncio.create_task(self._read_loop(self._transport, self._gone))
        try:
            await self._send({"type": "init", "context_path": self._worker_context_path(),
                              "context_kind": self.spec.context.kind,
                              "max_output_chars": self.spec.max_output_chars})
        except WorkerGone:
            self._gone.set()  # died at once: reported below with its exit reason
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            done, _ = await asyncio.wait({self._ready, gone}, timeout=self.ready_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if self._ready.done():
            self._ready.result()  # raises SandboxError for a 'fatal' message
            return
        if self._gone.is_set():
            reason = await self._describe_exit()
        else:
            reason = f"no answer in {self.ready_timeout_s:g} s"
        await self._stop_worker(graceful=False)
        raise SandboxError(f"the REPL worker did not start: {reason}")

    async def _respawn(self) -> None:
        self.restarts += 1
        await self._stop_worker(graceful=False)
        await self._spawn()

    async def _stop_worker(self, *, graceful: bool) -> None:
        transport, self._transport = self._transport, None
        for task in list(self._call_tasks):
            task.cancel()
        if transport is not None:
            with contextlib.suppress(Exception):
                await (transport.close() if graceful else transport.kill())
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if self._call_tasks:
            await asyncio.gather(*self._call_tasks, return_exceptions=True)

    async def _describe_exit(self) -> str:
        transport = self._last_transport
        if transport is None:
            return "the worker process exited"
        with contextlib.suppress(Exception):
            await transport.settle()
        return transport.describe_exit()

    async def _send(self, message: dict[str, Any]) -> None:
        transport = self._transport
        if transport is None:
            raise WorkerGone("no worker")
        data = json.dumps(message, ensure_ascii=False).encode("utf-8", "replace") + b"\n"
        await transport.send(data)

    async def _wait_cell(self, cell: asyncio.Future[dict[str, Any]], timeout: float) -> dict[str, Any] | None:
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({cell, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        return cell.result() if cell.done() and not cell.cancelled() else None

    async def _read_loop(self, transport: WorkerTransport, gone: asyncio.Event) -> None:
        self._last_transport = transport
        try:
            while True:
                line = await transport.receive_line()
                if not line:
                    return
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("ignored a non-protocol line from the worker: %.200r", line)
                    continue
                await self._dispatch(transport, message)
        except (WorkerGone, ConnectionError, OSError) as exc:
            log.debug("worker channel closed: %s", exc)
        finally:
            gone.set()

    async def _dispatch(self, transport: WorkerTransport, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "call":
            await self._slots.acquire()  # back-pressure: stop reading until a slot frees
            task = asyncio.create_task(self._serve_call(transport, message))
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)
        elif kind == "result":
            if self._cell is not None and not self._cell.done():
                self._cell.set_result(message)
        elif kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(message)
        elif kind == "fatal":
            error = SandboxError(f"REPL worker error: {message.get('error')}")
            for future in (self._ready, self._cell):
                if future is not None and not future.done():
                    future.set_exception(error)
                    break
        else:
            log.warning("ignored an unknown message from the worker: %.200r", message)

    async def _serve_call(self, transport: WorkerTransport, message: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"type": "reply", "id": message.get("id")}
        try:
            text = await self.spec.handler(str(message.get("op")), str(message.get("prompt", "")),
                                           message.get("model"))
            reply.update(ok=True, text=text)
        except RlmError as exc:
            reply.update(ok=False, error=str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug on our side must not hang the cell waiting for a reply
            log.exception("sub-call failed")
            reply.update(ok=False, error=f"internal error serving the sub-call: {exc!r}")
        finally:
            self._slots.release()
        if transport is self._transport:
            data = json.dumps(reply, ensure_ascii=False).encode("utf-8", "replace") + b"\n"
            with contextlib.suppress(WorkerGone, ConnectionError, OSError):
                await transport.send(data)

    @staticmethod
    def _to_result(message: dict[str, Any]) -> CellResult:
        return CellResult(
            stdout=message.get("stdout") or "",
            stderr=message.get("stderr") or "",
            error=message.get("error"),
            final=message.get("final"),
            draft=message.get("draft"),
            stdout_dropped=int(message.get("stdout_dropped") or 0),
            stderr_dropped=int(message.get("stderr_dropped") or 0),
            notices=list(message.get("notices") or []),
            locals=dict(message.get("locals") or {}),
            elapsed=float(message.get("elapsed") or 0.0),
        )
