"""What the Daytona emulator keeps: its sandboxes (temporary directories), their sessions and
session commands (local processes whose output is relabelled into one on-disk log as Daytona's
daemon does), and the faults tests inject. The HTTP API over them is
:mod:`rlm_mcp.testing.daytona_emulator`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


STDOUT_PREFIX = b"\x01\x01\x01"
STDERR_PREFIX = b"\x02\x02\x02"
LOG_CHUNK = 1024  # the daemon reads and sends the log in chunks of this size
LINE_IN_MEMORY = 1 << 20  # a longer line being relabelled goes to a file
SOURCE_API = "DAYTONA_API"
SOURCE_DAEMON = "DAYTONA_DAEMON"

# Operation names used for fault injection.
OPERATIONS = ("create_sandbox", "get_sandbox", "delete_sandbox", "toolbox_proxy_url",
              "create_session", "delete_session", "session_exec", "send_input", "command_logs",
              "get_command", "execute", "upload", "work_dir")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Faults:
    """What the emulator should get wrong. Counts are consumed one per matching request."""

    errors: dict[str, int] = field(default_factory=dict)       # operation -> number of 500s
    rate_limits: dict[str, int] = field(default_factory=dict)  # operation -> number of 429s
    delays: dict[str, float] = field(default_factory=dict)     # operation -> seconds before answering
    kill_session_on_input: str | None = None  # kill the session when input contains this text
    break_log_streams: int = 0  # close this many log WebSockets abnormally (1011) mid-stream

    def clear(self) -> None:
        self.errors.clear()
        self.rate_limits.clear()
        self.delays.clear()
        self.kill_session_on_input = None
        self.break_log_streams = 0


class PartialLine:
    """A line being relabelled: in memory while short, spilled to a file in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.head = bytearray()
        self.spill: Any = None
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.spill is None and len(self.head) + len(data) <= LINE_IN_MEMORY:
            self.head += data
            return
        if self.spill is None:
            self.spill = tempfile.TemporaryFile(dir=self.directory)
            self.spill.write(self.head)
            self.head = bytearray()
        self.spill.write(data)

    def copy_to(self, target: Any) -> None:
        """Write the line so far to ``target`` (blocking, for a spilled line)."""
        if self.spill is None:
            target.write(self.head)
            return
        self.spill.seek(0)
        shutil.copyfileobj(self.spill, target, 1 << 20)

    def clear(self) -> None:
        if self.spill is not None:
            self.spill.close()
        self.spill, self.head, self.size = None, bytearray(), 0


class EmulatedCommand:
    """One session command: a local process and its relabelled log (a file)."""

    def __init__(self, command_id: str, command: str, suppress_input_echo: bool, log_dir: Path) -> None:
        self.id = command_id
        self.command = command
        self.suppress_input_echo = suppress_input_echo
        self.process: asyncio.subprocess.Process | None = None
        self.log_dir = log_dir
        self._log = open(log_dir / f"{command_id}.log", "w+b")
        self.log_size = 0
        self.exit_code: int | None = None
        self.finished = False
        self.version = 0
        self.changed = asyncio.Condition()
        self.input_lock = asyncio.Lock()
        self.tasks: list[asyncio.Task[None]] = []

    async def append(self, data: bytes) -> None:
        async with self.changed:
            self._write(data)

    async def append_line(self, prefix: bytes, line: PartialLine) -> None:
        """Append ``prefix`` + the line + newline as one entry (the other stream waits)."""
        async with self.changed:
            self._log.seek(0, os.SEEK_END)
            self._log.write(prefix)
            if line.spill is None:
                self._log.write(line.head)
            else:
                await asyncio.to_thread(line.copy_to, self._log)
            self._write(b"\n")

    def _write(self, data: bytes) -> None:
        self._log.seek(0, os.SEEK_END)
        self._log.write(data)
        self._log.flush()
        self.log_size = self._log.tell()
        self.version += 1
        self.changed.notify_all()

    def read_log(self, offset: int = 0, size: int | None = None) -> bytes:
        """The log from ``offset`` (at most ``size`` bytes)."""
        if self._log.closed:
            return b""
        return os.pread(self._log.fileno(), self.log_size - offset if size is None else size, offset)

    def close_log(self) -> None:
        self._log.close()

    async def finish(self, exit_code: int) -> None:
        async with self.changed:
            if not self.finished:
                self.exit_code = exit_code
                self.finished = True
                self.version += 1
                self.changed.notify_all()

    async def wait_change(self, version: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.version != version)

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()  # the daemon's end of the input pipe goes with the session

    def dto(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "command": self.command}
        if self.exit_code is not None:
            data["exitCode"] = self.exit_code
        return data


class EmulatedSession:
    def __init__(self, session_id: str) -> None:
        self.id = session_id
        self.commands: dict[str, EmulatedCommand] = {}
        self.ended = False

    def kill(self) -> None:
        self.ended = True
        for command in self.commands.values():
            command.kill()


class EmulatedSandbox:
    def __init__(self, sandbox_id: str, name: str, root: Path, request: dict[str, Any]) -> None:
        self.id = sandbox_id
        self.name = name
        self.root = root
        self.request = request
        self.state = "started"
        self.sessions: dict[str, EmulatedSession] = {}
        self.created_at = self.updated_at = now()

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.request.get("labels") or {})

    def resolve(self, path: str) -> Path:
        """A sandbox path on the host; relative paths start at the working directory."""
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = Path(os.path.normpath(candidate))
        if resolved != self.root and self.root not in resolved.parents:
            raise PermissionError(f"path {path!r} is outside the sandbox")
        return resolved


def kill_processes_in(root: Path) -> None:
    """SIGKILL every process whose working directory is inside ``root`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == root or root in cwd.parents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def demux(log_bytes: bytes) -> tuple[str, str]:
    """Split a relabelled log into (stdout, stderr) text."""
    out, err = bytearray(), bytearray()
    target = out
    index = 0
    while index < len(log_bytes):
        if log_bytes.startswith(STDOUT_PREFIX, index):
            target, index = out, index + len(STDOUT_PREFIX)
        elif log_bytes.startswith(STDERR_PREFIX, index):
            target, index = err, index + len(STDERR_PREFIX)
        else:
            target.append(log_bytes[index])
            index += 1
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
