"""The worker's channel through a Daytona session command: input by ``send_session_command_input``,
output from the command's log stream, reassembled into protocol lines and a stderr tail."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shlex
from typing import Any

from daytona.common.errors import DaytonaGoneError, DaytonaRateLimitError

from rlm_mcp.sandbox.base import STDERR_TAIL_LINES
from rlm_mcp.sandbox.channel import ProtocolError, WorkerTransport, message_too_large
from rlm_mcp.sandbox.daytona.account import DaytonaAccount
from rlm_mcp.sandbox.daytona.errors import ChannelLost, describe_error

log = logging.getLogger(__name__)

RATE_LIMIT_RETRIES = 3
LOG_STREAM_RECONNECTS = 3


class SessionTransport(WorkerTransport):
    """Byte pipes to ``worker.py`` running as one Daytona session command of ``sandbox`` (a
    ``daytona.AsyncSandbox``)."""

    def __init__(self, account: DaytonaAccount, sandbox: Any, session_id: str, command_id: str,
                 remote_dir: str) -> None:
        self.account = account
        self.sandbox = sandbox
        self.session_id = session_id
        self.command_id = command_id
        self.remote_dir = remote_dir
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.exit_code: int | None = None
        self.failure: str | None = None
        self._lines: asyncio.Queue[bytes | ProtocolError] = asyncio.Queue()
        self._queued = 0  # bytes of complete lines waiting in _lines
        self._room = asyncio.Event()  # set when receive_line takes a line (or the stream ends)
        self._partial: list[str] = []
        self._partial_chars = 0
        self._overflowed = False
        self._stderr_partial = ""
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._ended = False
        self._consumed = 0  # stdout characters taken from the stream so far
        self._replayed = 0  # stdout characters seen on the current connection
        self._stream = asyncio.create_task(self._follow_logs())

    # ----- worker -> host ---------------------------------------------------------------------

    async def _follow_logs(self) -> None:
        """Stream the command's output; reconnect (skipping what was seen) if the stream breaks
        while the worker still runs, since the daemon replays the log from its start."""
        try:
            for attempt in range(LOG_STREAM_RECONNECTS + 1):
                self._replayed = 0
                try:
                    await self.sandbox.process.get_session_command_logs_async(
                        self.session_id, self.command_id, self._on_stdout, self._on_stderr)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failure = describe_error(exc, "streaming the worker's output", self.account.settings)
                    log.debug("log stream of %s broke: %s", self.command_id, exc)
                else:
                    return  # a normal close: the command has ended
                if attempt == LOG_STREAM_RECONNECTS or not await self._still_running():
                    return
                log.warning("the worker's output stream broke; reconnecting (%s)", self.failure)
                self.failure = None
        finally:
            self._end_stream()

    async def _still_running(self) -> bool:
        try:
            command = await self.account.api(self.sandbox.process.get_session_command(
                self.session_id, self.command_id), raw=True, timeout=15)
        except Exception:
            return False
        self.exit_code = command.exit_code
        return command.exit_code is None

    async def _on_stdout(self, chunk: str) -> None:
        if self._overflowed:
            return  # the worker is being killed; what it still sends is dropped
        if self._replayed < self._consumed:  # a reconnected stream starts from the beginning
            skip = min(len(chunk), self._consumed - self._replayed)
            self._replayed += skip
            chunk = chunk[skip:]
        self._consumed += len(chunk)
        self._replayed += len(chunk)
        limit = self.max_message_bytes
        while chunk:
            head, newline, chunk = chunk.partition("\n")
            self._partial.append(head)
            self._partial_chars += len(head)
            if self._partial_chars > limit:  # characters: a message of N bytes has at most N
                self._overflowed = True
                self._partial, self._partial_chars = [], 0
                self._lines.put_nowait(message_too_large(limit))
                return
            if not newline:
                return
            line = "".join(self._partial).encode("utf-8", "replace") + b"\n"
            self._partial, self._partial_chars = [], 0
            while self._queued and self._queued + len(line) > limit and not self._ended:
                self._room.clear()  # back-pressure: at most one message's worth queued
                await self._room.wait()
            self._queued += len(line)
            self._lines.put_nowait(line)

    def _on_stderr(self, chunk: str) -> None:
        text = self._stderr_partial + chunk
        *complete, self._stderr_partial = text.split("\n")
        self.stderr_tail.extend(line for line in complete if line.strip())
        if len(self._stderr_partial) > 4096:
            self.stderr_tail.append(self._stderr_partial[:4096])
            self._stderr_partial = ""

    def _end_stream(self) -> None:
        if not self._ended:
            self._ended = True
            self._lines.put_nowait(b"")
            self._room.set()

    async def receive_line(self) -> bytes:
        line = await self._lines.get()
        if isinstance(line, ProtocolError):
            raise line
        if not line:
            self._lines.put_nowait(b"")  # stay at end of stream for later readers
            return line
        self._queued -= len(line)
        self._room.set()
        return line

    # ----- host -> worker ---------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        if self._ended:
            raise ChannelLost("the worker's session has ended")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((data, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        await future

    async def _write_pending(self) -> None:
        """The single writer: lines stay whole and ordered; what queued up goes in one request."""
        while self._pending:
            batch, self._pending = self._pending, []
            payload = b"".join(data for data, _ in batch).decode("utf-8", "replace")
            try:
                await self._send_input(payload)
            except BaseException as exc:
                error = exc if isinstance(exc, ChannelLost) else ChannelLost(
                    describe_error(exc, "sending to the worker", self.account.settings))
                for _, future in batch + self._pending:
                    if not future.done():
                        future.set_exception(error)
                self._pending = []
                if isinstance(exc, asyncio.CancelledError):
                    raise
                # A lost message leaves the protocol in an unknown state: end this worker.
                self.failure = str(error)
                self._end_stream()
                return
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _send_input(self, payload: str) -> None:
        delay = 0.5
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                await self.account.api(self.sandbox.process.send_session_command_input(
                    self.session_id, self.command_id, payload), raw=True)
                return
            except DaytonaRateLimitError:  # refused, so not delivered: safe to send again
                if attempt == RATE_LIMIT_RETRIES:
                    raise
                log.warning("Daytona rate-limited input to the worker; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay *= 2
            except DaytonaGoneError as exc:
                raise ChannelLost(f"the worker's session command has ended ({exc})") from exc

    # ----- lifecycle --------------------------------------------------------------------------

    async def settle(self, timeout: float = 1.0) -> None:
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(self._stream), timeout)
        with contextlib.suppress(Exception):
            command = await self.account.api(self.sandbox.process.get_session_command(
                self.session_id, self.command_id), raw=True, timeout=min(timeout * 5, 10.0))
            self.exit_code = command.exit_code

    async def kill(self) -> None:
        """Kill the worker's process group, then delete its session."""
        self._end_stream()
        if self._writer is not None:
            self._writer.cancel()
        pid_file = shlex.quote(f"{self.remote_dir}/worker-{self.session_id}.pid")
        with contextlib.suppress(Exception):
            await self.account.api(self.sandbox.process.exec(
                f'pid=$(cat {pid_file} 2>/dev/null) && kill -KILL -- "-$pid" "$pid" 2>/dev/null; true',
                timeout=10), raw=True, timeout=15)
        with contextlib.suppress(Exception):
            await self.account.api(self.sandbox.process.delete_session(self.session_id), raw=True, timeout=15)
        self._stream.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._stream

    async def close(self) -> None:
        """Stop following the worker's output. The channel closes a transport only when the whole
        sandbox is being closed, and deleting the sandbox ends the worker: no round trips here."""
        self._end_stream()
        for task in (self._writer, self._stream):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._writer, self._stream) if t), return_exceptions=True)

    def describe_exit(self) -> str:
        if self.failure:
            reason = self.failure
        elif self.exit_code is None:
            reason = "the worker's Daytona session ended"
        elif self.exit_code > 128:
            reason = f"killed by signal {self.exit_code - 128}"
        else:
            reason = f"exit code {self.exit_code}"
        tail = list(self.stderr_tail)[-3:]
        return reason + (": " + " | ".join(tail) if tail else "")
