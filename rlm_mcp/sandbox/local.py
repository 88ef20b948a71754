"""The embedded default backend: the worker as a child process of the server.

Always, whatever ``RLM_MCP_LOCAL_ISOLATION`` says:

* no capabilities and an unprivileged uid: a root server runs its sandboxes as
  ``RLM_MCP_LOCAL_UID`` (65534) with no supplementary groups, no capability (bounding set
  included) and no-new-privileges; any other server runs them as itself, which has none;
* a scrubbed environment (no API keys), the context on an inherited descriptor (the store's
  files may be readable by the server's user only), rlimits per process;
* limits on the sandbox as a whole where the host lets us create control groups (cgroup v1 as
  root, or a delegated cgroup v2 group): memory (tmpfs scratch included), process count, CPU;
* the whole process tree killed on timeout, cancel or close: through the control group, else the
  bubblewrap pid namespace, else a child subreaper (orphans stay below the worker).

With bubblewrap (``auto`` finds it, ``bwrap`` requires it) the worker also runs without network,
sees only the system's read-only program directories and the Python installation, and writes
only to a size-limited tmpfs at ``/tmp`` (its working directory). Without it a local worker can
read what its uid may read, reach the network and call the model server on loopback directly,
outside budget accounting: use Docker for untrusted inputs. What this host cannot enforce is
logged once at start and listed in every run's result notes.

This module is the worker process and its pipes; how this host isolates it (uid, bubblewrap,
control groups, the child's set-up) is decided in :mod:`rlm_mcp.sandbox.isolation`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import STDERR_TAIL_LINES, CellResult, Sandbox, SandboxSpec
from rlm_mcp.sandbox.channel import WorkerGone, WorkerSandbox, WorkerTransport, describe_stop
from rlm_mcp.sandbox.leftovers import owned_temp_prefix
from rlm_mcp.sandbox.isolation import (
    SANDBOX_HOME, Isolation, bubblewrap_argv, child_setup, decide_isolation, protect_host_environment,
    scrubbed_environment)
from rlm_mcp.sandbox.processes import Group, GroupLimits, kill_tree

# The pipe readers' buffer limit: protocol lines are read in pieces of at most this (so a
# message is never held beyond its own cap plus one piece), and it bounds one stderr line.
LINE_LIMIT = 4 << 20
STDERR_LINE_BYTES = 2_000  # per kept line: the last 3 reach the model when a worker dies
STDERR_CHUNK = 1 << 16

LIMIT_CHECK_S = 0.05  # cells this long (or failing) have their group's limit counters read

# ----- one worker process --------------------------------------------------------------------------


@dataclass
class Launch:
    """What one worker process holds on the host besides the process itself."""

    argv: list[str]
    home: str
    cwd: str
    workdir: str | None  # a host directory to delete (no bubblewrap)
    group: Group | None
    subreaper: bool
    context_fd: int | None
    pass_fds: list[int]
    memory_mb: int
    pids: int
    events_at_start: dict[str, int] = field(default_factory=dict)
    events_seen: dict[str, int] = field(default_factory=dict)  # at the last check after a cell
    final_events: dict[str, int] | None = None

    def events(self) -> dict[str, int]:
        """The group's limit counters (the last ones read if the group is gone)."""
        if self.final_events is not None or self.group is None:
            return self.final_events or {}
        return self.group.limit_events()

    def close_context(self) -> None:
        if self.context_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.context_fd)
            self.context_fd = None

    def discard(self) -> None:
        """Remove the control group and work directory (blocking)."""
        self.close_context()
        if self.group is not None:
            if self.final_events is None:
                self.final_events = self.group.limit_events()
            self.group.remove()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class LocalTransport(WorkerTransport):
    def __init__(self, process: asyncio.subprocess.Process, launch: Launch) -> None:
        self.process = process
        self.launch = launch
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.stderr_bytes = 0
        self._stderr_line = b""  # the line being read, at most STDERR_LINE_BYTES of it
        self._stderr_cut = 0  # bytes of that line beyond the cap
        self._stderr_task = asyncio.create_task(self._collect_stderr())
        self._write_lock = asyncio.Lock()
        self._terminated = False

    async def _collect_stderr(self) -> None:
        """Keep the last lines of the worker's fd 2, each cut to STDERR_LINE_BYTES: whatever
        a cell writes there (30 MB in one line, millions of empty lines), the host keeps at most
        STDERR_TAIL_LINES x STDERR_LINE_BYTES, and spends one split per chunk on it."""
        reader = self.process.stderr
        assert reader is not None
        while chunk := await reader.read(STDERR_CHUNK):
            self.stderr_bytes += len(chunk)
            pieces = chunk.split(b"\n")
            self._extend_line(pieces[0])
            if len(pieces) == 1:
                continue
            self._end_line()
            for piece in pieces[1:-1][-STDERR_TAIL_LINES:]:  # earlier ones would leave the tail anyway
                self._extend_line(piece)
                self._end_line()
            self._extend_line(pieces[-1])
        if self._stderr_line or self._stderr_cut:
            self._end_line()

    def _extend_line(self, piece: bytes) -> None:
        room = STDERR_LINE_BYTES - len(self._stderr_line)
        self._stderr_line += piece[:room]
        self._stderr_cut += max(0, len(piece) - room)

    def _end_line(self) -> None:
        text = self._stderr_line.decode("utf-8", "replace").rstrip()
        if self._stderr_cut:
            text += f" [... {self._stderr_cut:,} more bytes of this line not kept]"
        self.stderr_tail.append(text)
        self._stderr_line, self._stderr_cut = b"", 0

    async def send(self, data: bytes) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing():
            raise WorkerGone("worker stdin is closed")
        async with self._write_lock:
            try:
                stdin.write(data)
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise WorkerGone(str(exc)) from exc

    async def receive_line(self) -> bytes:
        assert self.process.stdout is not None
        return await self.read_line_from(self.process.stdout)

    async def settle(self, timeout: float = 1.0) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout)

    def _kill_everything(self) -> None:
        """SIGKILL the worker and every process it started, setsid daemons included (blocking)."""
        if self.launch.group is not None:
            self.launch.group.kill_all()
        elif self.launch.subreaper:
            kill_tree(self.process.pid)
        # Also the process group: bubblewrap's own processes, whose end takes its pid namespace.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def kill(self) -> None:
        await self._terminate()

    async def close(self) -> None:
        # No graceful phase: the worker keeps nothing worth a shutdown, and while it exits by
        # itself its orphans could leave the tree (without a control group, the worker is the
        # subreaper that keeps them findable).
        await self._terminate()

    async def _terminate(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        await asyncio.to_thread(self._kill_everything)
        with contextlib.suppress(ProcessLookupError):
            await self.process.wait()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._stderr_task, timeout=1.0)
        await asyncio.to_thread(self.launch.discard)

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            reason = describe_stop(None, -code, self.stderr_tail)
        else:
            reason = describe_stop(code, None, self.stderr_tail)
        hit = limits_hit(self.launch.events_at_start, self.launch.events(), self.launch)
        return reason + ("; " + "; ".join(hit) if hit else "")


def limits_hit(before: dict[str, int], after: dict[str, int], launch: Launch) -> list[str]:
    """What the sandbox ran into between two readings of its group's counters."""
    hit = []
    if after.get("memory", 0) > before.get("memory", 0):
        hit.append(f"the sandbox reached its memory limit ({launch.memory_mb:,} MB, files in /tmp "
                   "included) and the kernel killed a process in it")
    if after.get("pids", 0) > before.get("pids", 0):
        hit.append(f"the sandbox reached its process limit ({launch.pids}): starting more processes "
                   "or threads failed")
    return hit


class LocalSandbox(WorkerSandbox):
    """``worker.py`` in a child process, isolated as the provider decided."""

    def __init__(self, spec: SandboxSpec, provider: "LocalProvider") -> None:
        super().__init__(spec)
        self.provider = provider
        self.settings = provider.settings
        self._launch_now: Launch | None = None

    async def _launch(self) -> WorkerTransport:
        isolation = await self.provider.isolation()
        if isolation.error is not None:
            raise SandboxError(isolation.error)
        for note in isolation.notes:
            self._note(note)
        launch = await asyncio.to_thread(self._prepare, isolation)
        try:
            process = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=launch.cwd,
                env=scrubbed_environment(launch.home),
                start_new_session=True,
                pass_fds=launch.pass_fds,
                preexec_fn=child_setup(isolation, launch.group, self.settings, self._cpu_seconds()),
                limit=LINE_LIMIT,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            await asyncio.to_thread(launch.discard)
            hint = (f" (the sandbox runs as uid {isolation.uid}: set RLM_MCP_LOCAL_UID, or make the "
                    "Python installation readable by that user)" if isolation.drop else "")
            raise SandboxError(f"cannot start the local REPL worker: {exc}{hint}") from exc
        finally:
            launch.close_context()  # the child has its copy
        self._launch_now = launch
        return LocalTransport(process, launch)

    def _cpu_seconds(self) -> int:
        return int(max(1, self.spec.cpu_limit_s or self.settings.limits.timeout_s or 86_400))

    def _prepare(self, isolation: Isolation) -> Launch:
        """Everything a worker needs before its process starts (blocking)."""
        settings = self.settings
        group = None
        if isolation.groups is not None:
            try:
                group = isolation.groups.create(GroupLimits(settings.sandbox_memory_mb * 1024 * 1024,
                                                            settings.sandbox_pids, settings.sandbox_cpus))
            except OSError as exc:  # e.g. the parent group was removed under us
                raise SandboxError(f"cannot create the local sandbox's control group: {exc}") from exc
        workdir = None
        context_fd = None
        try:
            if isolation.bwrap is None:
                workdir = tempfile.mkdtemp(prefix=owned_temp_prefix("rlm-sandbox"))
                if isolation.drop:
                    os.chown(workdir, isolation.uid, isolation.gid)
            if self.spec.context.path is not None:
                context_fd = os.open(self.spec.context.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if group is not None:
                group.remove()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise SandboxError(f"cannot prepare the local sandbox: {exc}") from exc
        worker = [*isolation.python, isolation.script]
        if context_fd is not None:
            worker += ["--context-fd", str(context_fd)]
        for directory in isolation.site_dirs:
            worker += ["--site-dir", directory]
        if isolation.user_namespace and group is None:
            worker += ["--max-processes", str(settings.sandbox_pids)]
        argv = (bubblewrap_argv(isolation, settings.sandbox_memory_mb) if isolation.bwrap else []) + worker
        launch = Launch(argv=argv, home=workdir or SANDBOX_HOME, cwd=workdir or "/", workdir=workdir,
                        group=group, subreaper=group is None and isolation.bwrap is None,
                        context_fd=context_fd,
                        pass_fds=list(isolation.inherited) + ([context_fd] if context_fd is not None else []),
                        memory_mb=settings.sandbox_memory_mb, pids=settings.sandbox_pids)
        if group is not None:
            launch.events_at_start = launch.events_seen = group.limit_events()
        return launch

    async def execute(self, code: str, *, timeout: float) -> CellResult:
        launch = self._launch_now
        started = time.monotonic()
        result = await super().execute(code, timeout=timeout)
        # Reading the counters costs a few file reads: only after cells that could have hit a
        # limit (a fast, clean cell did not allocate hundreds of MB or fork hundreds of times).
        slow_or_failed = time.monotonic() - started >= LIMIT_CHECK_S or result.error or result.state_lost
        if launch is not None and launch.group is not None and slow_or_failed:
            before = launch.events_seen
            launch.events_seen = await asyncio.to_thread(launch.events)
            for hit in limits_hit(before, launch.events_seen, launch):
                result.notices.append(f"note: {hit}")
                self._note(f"{hit} during the run")
        return result

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


class LocalProvider:
    """Creates local sandboxes; decides once (at warm-up or the first sandbox) how to isolate
    them on this host."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._isolation: Isolation | None = None
        self._deciding = threading.Lock()
        protect_host_environment()

    def _decide(self) -> Isolation:
        with self._deciding:
            if self._isolation is None:
                self._isolation = decide_isolation(self.settings)
            return self._isolation

    async def isolation(self) -> Isolation:
        """How this host isolates local sandboxes (probed in a thread the first time)."""
        if self._isolation is not None:
            return self._isolation
        return await asyncio.to_thread(self._decide)

    async def warm_up(self) -> None:
        """Decide the isolation now, so that its warnings appear when the server starts."""
        await self.isolation()

    def create(self, spec: SandboxSpec) -> Sandbox:
        return LocalSandbox(spec, self)

    async def aclose(self) -> None:
        isolation, self._isolation = self._isolation, None  # decided again if used after this
        if isolation is not None:
            isolation.close()
