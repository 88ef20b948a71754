"""The embedded default backend: the worker as a child process of the server.

Always: a scrubbed environment (no API keys, no provider variables), a fresh temporary working
directory, memory/CPU/file-size rlimits and its own process group, which is killed as a whole on
timeout, cancel or close. With bubblewrap (``RLM_MCP_LOCAL_ISOLATION=auto`` finds it, ``bwrap``
requires it) the worker also runs without network and sees only the system's read-only program
directories, the Python installation, its context file and its working directory. Without it a
local worker can read the user's files and reach the network: use Docker for untrusted inputs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import Sandbox, SandboxSpec
from rlm_mcp.sandbox.channel import WORKER_SCRIPT, WorkerGone, WorkerSandbox, WorkerTransport, describe_stop

log = logging.getLogger(__name__)

LINE_LIMIT = 1 << 30  # one protocol line may carry a large prompt; memory is bounded by the worker
STDERR_TAIL_LINES = 20


def scrubbed_environment(workdir: str) -> dict[str, str]:
    """An allow-list environment: nothing from the server's environment leaks in."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


class LocalTransport(WorkerTransport):
    def __init__(self, process: asyncio.subprocess.Process, workdir: str) -> None:
        self.process = process
        self.workdir = workdir
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_task = asyncio.create_task(self._collect_stderr())
        self._write_lock = asyncio.Lock()

    async def _collect_stderr(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())

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
        try:
            return await self.process.stdout.readline()
        except ValueError:  # a line beyond LINE_LIMIT: the protocol cannot continue
            return b""

    async def settle(self, timeout: float = 1.0) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def kill(self) -> None:
        self._kill_group()
        await self._reap()

    async def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        self._kill_group()  # also takes down anything user code started in the group
        await self._reap()

    async def _reap(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            await self.process.wait()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._stderr_task, timeout=1.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            return describe_stop(None, -code, self.stderr_tail)
        return describe_stop(code, None, self.stderr_tail)


class LocalSandbox(WorkerSandbox):
    """``worker.py`` in a child process with rlimits and its own process group."""

    def __init__(self, spec: SandboxSpec, settings: Settings) -> None:
        super().__init__(spec)
        self.settings = settings

    def _limit_resources(self) -> None:  # runs in the child between fork and exec
        import resource

        memory = self.settings.sandbox_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        cpu = int(max(1, self.spec.cpu_limit_s or self.settings.limits.timeout_s or 86_400))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        scratch = 4 * 1024**3
        resource.setrlimit(resource.RLIMIT_FSIZE, (scratch, scratch))

    def _command(self, workdir: str) -> list[str]:
        """The worker's argv, inside bubblewrap when isolation is on and available."""
        command = [sys.executable, "-I", "-u", str(WORKER_SCRIPT)]
        mode = self.settings.local_isolation
        bwrap = shutil.which("bwrap") if mode != "none" else None
        if bwrap is not None and mode == "auto" and not _bubblewrap_works(bwrap):
            bwrap = None  # e.g. user namespaces disabled (AppArmor, unprivileged containers)
        if bwrap is None:
            if mode == "bwrap":
                raise SandboxError("RLM_MCP_LOCAL_ISOLATION=bwrap but bubblewrap is not installed: "
                                   "install it (apt-get install bubblewrap) or set RLM_MCP_LOCAL_ISOLATION=auto")
            if mode == "auto":
                _warn_once("bubblewrap (bwrap) not found: local sandboxes run without network or "
                           "file isolation; install bubblewrap or use RLM_MCP_SANDBOX=docker")
            return command
        return bubblewrap_argv(bwrap, workdir, self.spec.context.path) + command

    async def _launch(self) -> WorkerTransport:
        workdir = tempfile.mkdtemp(prefix="rlm-sandbox-")
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command(workdir),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env=scrubbed_environment(workdir),
                start_new_session=True,
                preexec_fn=self._limit_resources,
                limit=LINE_LIMIT,
            )
        except (OSError, SandboxError) as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(exc, SandboxError):
                raise
            raise SandboxError(f"cannot start the local REPL worker: {exc}") from exc
        return LocalTransport(process, workdir)


SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc/alternatives", "/etc/ssl")
_warned: set[str] = set()


_bwrap_checked: dict[str, bool] = {}


def _bubblewrap_works(bwrap: str) -> bool:
    """Whether bwrap can create the namespaces we ask for here (checked once per binary)."""
    if bwrap not in _bwrap_checked:
        try:
            probe = subprocess.run([bwrap, "--unshare-net", "--ro-bind", "/", "/", "true"],
                                   capture_output=True, timeout=10)
            _bwrap_checked[bwrap] = probe.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _bwrap_checked[bwrap] = False
    return _bwrap_checked[bwrap]


def protect_host_environment() -> None:
    """Make this process non-dumpable, so a same-user worker cannot read our environment (API
    keys) through /proc/<ppid>/environ or ptrace us. Linux only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_dumpable = 4
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)
    except (OSError, AttributeError):
        _warn_once("could not make the server non-dumpable; local workers may read its environment")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def bubblewrap_argv(bwrap: str, workdir: str, context: Path | None) -> list[str]:
    """bwrap options: no network, new pid/ipc/uts namespaces, read-only system and Python
    directories, the context file read-only, the working directory writable, nothing else."""
    argv = [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    visible = list(SYSTEM_DIRS) + sorted({sys.prefix, sys.base_prefix, sys.exec_prefix,
                                          str(Path(sys.executable).resolve().parent)})
    for path in visible:
        argv += ["--ro-bind-try", path, path]
    argv += ["--ro-bind", str(WORKER_SCRIPT), str(WORKER_SCRIPT)]
    if context is not None:
        argv += ["--ro-bind-try", str(context), str(context)]
    argv += ["--bind", workdir, workdir, "--chdir", workdir]
    return argv


class LocalProvider:
    """Creates local sandboxes; holds no shared resources."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        protect_host_environment()

    def create(self, spec: SandboxSpec) -> Sandbox:
        return LocalSandbox(spec, self.settings)

    async def aclose(self) -> None:
        return None
