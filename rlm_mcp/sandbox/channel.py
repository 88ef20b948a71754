"""Host side of the worker protocol, shared by every backend that runs ``worker.py``.

A backend only has to say how to launch one worker process and hand back its byte pipes
(:class:`WorkerTransport`); :class:`WorkerSandbox` does the rest: the init handshake, cells,
serving ``llm_query``/``rlm_query`` calls, interrupts, and restarting a dead or stuck worker.

Everything read from the worker is untrusted: user code in the sandbox can find the channel's
descriptor (/proc/self/fd) and write anything to it. So a message is at most
``spec.max_message_bytes`` (every transport reads incrementally and stops at that size, never
buffering more), must be a JSON object of a known type, and anything else is a
:class:`ProtocolError`: the worker is killed and the cell reports lost state naming the cause.
Prompts held by sub-calls in flight are bounded in bytes as well as in number.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any

from rlm_mcp.config import MAX_MESSAGE_MB
from rlm_mcp.errors import RlmError, SandboxError
from rlm_mcp.sandbox.base import CellResult, Sandbox, SandboxSpec

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("worker.py")
MAX_CALLS_IN_FLIGHT = 64  # per worker: with the byte budget below, bounds prompts held on the host
EXCERPT_CHARS = 120       # of untrusted bytes quoted in errors and logs
THREAD_PARSE_BYTES = 1 << 20  # larger messages are parsed off the event loop
LOCALS_KEPT = 40          # what a real worker reports at most (worker.LOCALS_SHOWN)
LOCAL_CHARS = 400         # per variable summary (the worker's own is ~200)
NOTICES_KEPT = 10
MESSAGE_TYPES = ("ready", "call", "result", "fatal")
NEWLINE = b"\n"


def excerpt_of(data: bytes | str) -> str:
    """A short printable excerpt of untrusted data, for error messages and logs."""
    text = data[:EXCERPT_CHARS].decode("utf-8", "replace") if isinstance(data, bytes) else data[:EXCERPT_CHARS]
    more = f" ... ({len(data):,} {'bytes' if isinstance(data, bytes) else 'characters'})" if len(data) > EXCERPT_CHARS else ""
    return repr(text) + more


def message_too_large(limit: int) -> "ProtocolError":
    return ProtocolError(f"it wrote a protocol message over the {limit / 2**20:g} MB limit "
                         "(RLM_MCP_MAX_MESSAGE_MB) to its private channel")


async def read_line_bounded(reader: asyncio.StreamReader, limit: int) -> bytes:
    """The next line (at most ``limit`` bytes before its newline) from a StreamReader; b"" at end.

    Read in pieces of at most the reader's own limit, so no more than ``limit`` plus one piece
    is ever held; raises ProtocolError for a longer line.
    """
    pieces: list[bytes] = []
    size = 0
    while True:
        try:
            piece = await reader.readuntil(NEWLINE)
        except asyncio.IncompleteReadError:
            return b""  # end of stream; a partial line from a dying worker is dropped
        except asyncio.LimitOverrunError as exc:  # no newline within the reader's limit yet
            piece = await reader.readexactly(exc.consumed)
        size += len(piece)
        if size > limit + 1:
            raise message_too_large(limit)
        if not pieces and piece.endswith(NEWLINE):
            return piece
        pieces.append(piece)
        if piece.endswith(NEWLINE):
            return b"".join(pieces)


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


class ProtocolError(WorkerGone):
    """The worker broke the protocol (an oversized, malformed or out-of-place message); the
    message says what it did. The worker is killed: nothing it sends can be trusted after."""


class WorkerTransport(abc.ABC):
    """Byte pipes to one running worker process.

    ``receive_line`` must never hold more than ``max_message_bytes`` (plus one read) of a line
    and raise ProtocolError (see :func:`message_too_large`) for a longer one.
    """

    max_message_bytes: int = MAX_MESSAGE_MB << 20  # set from the spec before the first read
    violation: str | None = None  # why the host killed this worker, once it did

    @abc.abstractmethod
    async def send(self, data: bytes) -> None:
        """Write bytes to the worker's stdin (raise WorkerGone if it is closed)."""

    @abc.abstractmethod
    async def receive_line(self) -> bytes:
        """Next line from the worker's stdout; ``b""`` once the worker is gone; ProtocolError
        for a line over ``max_message_bytes``."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop the worker at once (and anything it started)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close stdin so the worker exits, then make sure it is gone and cleaned up."""

    def read_line_from(self, reader: asyncio.StreamReader) -> Awaitable[bytes]:
        """receive_line for transports whose worker output is a StreamReader."""
        return read_line_bounded(reader, self.max_message_bytes)

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
        self._prompt_bytes = 0  # bytes of the call messages being served (their prompts)
        self._bytes_freed: asyncio.Future[None] | None = None
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
            violation = self._violation()
            await self._respawn()
            notices.append("note: the REPL worker had stopped"
                           + (f" (the host killed it: {violation})" if violation else "")
                           + " and was restarted; earlier variables are lost")
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
            violation = self._violation()
            reason = await self._describe_exit()
            await self._respawn()
            what = (f"The host killed the REPL worker while running this cell: {violation}."
                    if violation else f"The REPL worker died while running this cell ({reason}).")
            return CellResult(
                error=(f"{what} A fresh worker was started with `context` loaded again, but all "
                       "other variables are lost."),
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
        self._prompt_bytes = 0
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._transport = await self._launch()
        self._transport.max_message_bytes = self.spec.max_message_bytes
        self._reader = asyncio.create_task(self._read_loop(self._transport, self._gone))
        try:
            await self._send({"type": "init", "context_path": self._worker_context_path(),
                              "context_kind": self.spec.context.kind,
                              "max_output_chars": self.spec.max_output_chars,
                              "max_message_bytes": self.spec.max_message_bytes})
        except WorkerGone:
            self._gone.set()  # died at once: reported below with its exit reason
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {self._ready, gone}
            done, _ = await asyncio.wait(waiters, timeout=self.ready_timeout_s,
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

    def _violation(self) -> str | None:
        """Why the host killed the last worker, if it did."""
        transport = self._last_transport
        return None if transport is None else transport.violation

    async def _describe_exit(self) -> str:
        transport = self._last_transport
        if transport is None:
            return "the worker process exited"
        if transport.violation:
            return f"the host killed it: {transport.violation}"
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
            waiters: set[asyncio.Future[Any]] = {cell, gone}
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
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
                # Tens of MB of JSON take a while to parse: not on the event loop.
                message = self._parse(line) if len(line) < THREAD_PARSE_BYTES else await asyncio.to_thread(self._parse, line)
                await self._dispatch(transport, message, len(line))
        except ProtocolError as exc:
            # One warning per killed worker (each restart costs the attacker a cell), with the
            # untrusted part already cut to an excerpt.
            transport.violation = str(exc)
            log.warning("killed a REPL worker that broke the protocol: %s", exc)
            with contextlib.suppress(Exception):
                await transport.kill()
        except (WorkerGone, ConnectionError, OSError) as exc:
            log.debug("worker channel closed: %s", exc)
        finally:
            gone.set()

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any]:
        """A protocol message, or ProtocolError: only the worker writes here, and it writes
        nothing but JSON objects of known types."""
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            shown = excerpt_of(line.rstrip(NEWLINE))
            raise ProtocolError(f"it wrote a line that is not a protocol message to its private channel: {shown}") from None
        if not isinstance(message, dict) or message.get("type") not in MESSAGE_TYPES:
            shown = excerpt_of(line.rstrip(NEWLINE))
            raise ProtocolError(f"it wrote an unknown message to its private channel: {shown}")
        return message

    async def _dispatch(self, transport: WorkerTransport, message: dict[str, Any], size: int) -> None:
        kind = message.get("type")
        if kind == "call":
            prompt, model = message.get("prompt"), message.get("model")
            if not isinstance(prompt, str) or not isinstance(model, (str, type(None))):
                raise ProtocolError(f"it wrote a malformed sub-call to its private channel (prompt "
                                    f"{type(prompt).__name__}, model {type(model).__name__})")
            await self._slots.acquire()  # back-pressure: stop reading until a slot frees
            if self._prompt_bytes and self._prompt_bytes + size > self.spec.max_message_bytes:
                await self._prompt_room(size)
            self._prompt_bytes += size
            task = asyncio.create_task(self._serve_call(transport, message, size))
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)
        elif kind == "result":
            # The worker answers each cell once; anything else is forged (and a flood of
            # forged lines must not keep the event loop parsing): a protocol violation.
            if self._cell is None or self._cell.done() or message.get("cell") != self._cell_counter:
                raise ProtocolError("it wrote a cell result out of turn to its private channel")
            self._cell.set_result(message)
        elif kind == "ready":
            if self._ready is None or self._ready.done():
                raise ProtocolError("it wrote a second 'ready' message to its private channel")
            self._ready.set_result(message)
        elif self._ready is not None and not self._ready.done():  # "fatal" while starting
            self._ready.set_exception(SandboxError(f"REPL worker error: {str(message.get('error'))[:2000]}"))
        else:  # a running worker reports trouble through cell results, never "fatal"
            raise ProtocolError(f"it reported a fatal error after it had started: "
                                f"{excerpt_of(str(message.get('error')))}")

    async def _prompt_room(self, size: int) -> None:
        """Hold the reader until the prompts in flight leave room for this one: their total
        stays under one maximal message (or is this one message alone)."""
        while self._prompt_bytes and self._prompt_bytes + size > self.spec.max_message_bytes:
            self._bytes_freed = asyncio.get_running_loop().create_future()
            await self._bytes_freed

    def _free_prompt_bytes(self, size: int) -> None:
        self._prompt_bytes -= size
        if self._bytes_freed is not None and not self._bytes_freed.done():
            self._bytes_freed.set_result(None)

    async def _serve_call(self, transport: WorkerTransport, message: dict[str, Any], size: int) -> None:
        reply: dict[str, Any] = {"type": "reply", "id": message.get("id")}
        try:
            text = await self.spec.handler(str(message.get("op")), message["prompt"], message.get("model"))
            reply.update(ok=True, text=text)
        except RlmError as exc:
            reply.update(ok=False, error=str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug on our side must not hang the cell waiting for a reply
            log.exception("sub-call failed")
            reply.update(ok=False, error=f"internal error serving the sub-call: {exc!r}")
        finally:
            message.clear()  # drop the prompt now, not when the reply has been written
            self._slots.release()
            self._free_prompt_bytes(size)
        if transport is self._transport:
            data = json.dumps(reply, ensure_ascii=False).encode("utf-8", "replace") + b"\n"
            with contextlib.suppress(WorkerGone, ConnectionError, OSError):
                await transport.send(data)

    def _to_result(self, message: dict[str, Any]) -> CellResult:
        """A CellResult from a result message, re-bounded here: the message may be forged by
        user code, so what reaches the prompt is cut to max_output_chars whatever it says."""
        limit = self.spec.max_output_chars
        stdout, stderr = _text(message.get("stdout")) or "", _text(message.get("stderr")) or ""
        error = _text(message.get("error"))
        raw_locals = message.get("locals")
        raw_notices = message.get("notices")
        return CellResult(
            stdout=stdout[:limit],
            stderr=stderr[:limit],
            error=None if error is None else error[:limit],
            final=_text(message.get("final")),
            draft=_text(message.get("draft")),
            stdout_dropped=_count(message.get("stdout_dropped")) + max(0, len(stdout) - limit),
            stderr_dropped=_count(message.get("stderr_dropped")) + max(0, len(stderr) - limit),
            notices=[str(n)[:LOCAL_CHARS] for n in raw_notices[:NOTICES_KEPT]] if isinstance(raw_notices, list) else [],
            locals=({str(k)[:LOCAL_CHARS]: str(v)[:LOCAL_CHARS] for k, v in list(raw_locals.items())[:LOCALS_KEPT]}
                    if isinstance(raw_locals, dict) else {}),
            elapsed=_seconds(message.get("elapsed")),
        )


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


def _seconds(value: Any) -> float:
    try:
        return max(0.0, float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
    except OverflowError:
        return 0.0


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
