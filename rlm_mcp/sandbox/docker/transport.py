"""The attach stream of one container, and the frames Docker multiplexes on it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from typing import Any

import docker.errors
import requests.exceptions

from rlm_mcp.sandbox.base import STDERR_TAIL_LINES
from rlm_mcp.sandbox.channel import WorkerGone, WorkerTransport, describe_stop, message_too_large
from rlm_mcp.sandbox.docker.containers import Box, Containers

STDERR_TAIL_CHARS = 4096
FRAME_HEADER = 8


class DockerTransport(WorkerTransport):
    """The attach stream of one container: stdin out, multiplexed stdout/stderr frames in.

    Frames are ``[stream, 0, 0, 0, size (4 bytes big-endian)] + payload``; stream 1 is the
    worker's protocol (stdout), stream 2 its stderr, kept as a bounded tail for describe_exit().
    Plain sockets are driven by the event loop; TLS sockets and SSH channels (remote engines)
    through threads. Docker's detach sequence (ctrl-p ctrl-q) cannot occur on stdin: the
    protocol is JSON, which escapes control characters.
    """

    def __init__(self, box: Box, containers: Containers) -> None:
        self.box = box
        self.containers = containers
        self._native = isinstance(box.sock, socket.socket) and not isinstance(box.sock, ssl.SSLSocket)
        if self._native:
            box.sock.setblocking(False)
        self._raw = bytearray()
        self._out = bytearray()
        self._scan = 0
        self._eof = False
        self._write_lock = asyncio.Lock()
        self._input_closed = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_partial = ""
        self.state: dict[str, Any] | None = None

    # ----- I/O ---------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        if self._input_closed or self.box.disposed:
            raise WorkerGone("the container's stdin is closed")
        async with self._write_lock:
            try:
                if self._native:
                    await asyncio.get_running_loop().sock_sendall(self.box.sock, data)
                else:
                    await asyncio.to_thread(self.box.sock.sendall, data)
            except OSError as exc:
                raise WorkerGone(f"cannot write to the container: {exc}") from exc

    async def _recv(self) -> bytes:
        if self._native:
            return await asyncio.get_running_loop().sock_recv(self.box.sock, 1 << 16)
        return await asyncio.to_thread(self.box.sock.recv, 1 << 16)

    async def receive_line(self) -> bytes:
        while True:
            end = self._out.find(b"\n", self._scan)
            if end >= 0:
                line = bytes(self._out[:end + 1])
                del self._out[:end + 1]
                self._scan = 0
                return line
            self._scan = len(self._out)
            if len(self._out) > self.max_message_bytes + 1:  # one partial line, already too long
                raise message_too_large(self.max_message_bytes)
            if self._eof:
                return b""
            try:
                chunk = await self._recv()
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                continue
            self._raw += chunk
            self._parse_frames()

    def _parse_frames(self) -> None:
        raw = self._raw
        offset = 0
        while len(raw) - offset >= FRAME_HEADER:
            stream = raw[offset]
            size = int.from_bytes(raw[offset + 4:offset + 8], "big")
            if size > self.max_message_bytes + 1:  # never wait for (and hold) a frame this big
                raise message_too_large(self.max_message_bytes)
            if len(raw) - offset - FRAME_HEADER < size:
                break
            payload = raw[offset + FRAME_HEADER:offset + FRAME_HEADER + size]
            offset += FRAME_HEADER + size
            if stream == 1:
                self._out += payload
            elif stream == 2:
                self._add_stderr(bytes(payload))
        del raw[:offset]

    def _add_stderr(self, payload: bytes) -> None:
        text = self._stderr_partial + payload.decode("utf-8", "replace")
        *lines, partial = text.split("\n")
        self._stderr_partial = partial[-STDERR_TAIL_CHARS:]
        for line in lines:
            self.stderr_tail.append(line.rstrip()[:STDERR_TAIL_CHARS])

    # ----- lifecycle ---------------------------------------------------------------------------

    async def kill(self) -> None:
        await asyncio.to_thread(self._snapshot_and_dispose)

    async def close(self) -> None:
        self._input_closed = True
        with contextlib.suppress(OSError):
            self.box.sock.shutdown(socket.SHUT_WR)  # the worker reads EOF and exits
        await asyncio.to_thread(self._wait_exit, 2.0)
        await asyncio.to_thread(self._snapshot_and_dispose)

    def _wait_exit(self, timeout: float) -> None:
        with contextlib.suppress(requests.exceptions.RequestException, docker.errors.DockerException):
            self.box.container.wait(timeout=timeout)

    def _snapshot_and_dispose(self) -> None:
        if self.state is None and not self.box.disposed:
            self._load_state()
        self.containers.dispose(self.box)

    def _load_state(self) -> None:
        with contextlib.suppress(requests.exceptions.RequestException, docker.errors.DockerException):
            self.box.container.reload()
            self.state = dict(self.box.container.attrs.get("State") or {})

    async def settle(self, timeout: float = 1.0) -> None:
        if self.box.disposed:
            return
        await asyncio.to_thread(self._wait_exit, timeout)
        await asyncio.to_thread(self._load_state)

    def describe_exit(self) -> str:
        state = self.state or {}
        code = state.get("ExitCode")
        if state.get("OOMKilled"):
            limit = self.containers.settings.sandbox_memory_mb
            tail = [line for line in self.stderr_tail if line.strip()][-3:]
            return f"killed for exceeding the sandbox memory limit ({limit} MB)" + (
                ": " + " | ".join(tail) if tail else "")
        if state.get("Running") or code is None:
            return describe_stop(None, None, self.stderr_tail)
        if code > 128:  # the shell convention docker reports for a signal
            return describe_stop(None, code - 128, self.stderr_tail)
        return describe_stop(code, None, self.stderr_tail)
