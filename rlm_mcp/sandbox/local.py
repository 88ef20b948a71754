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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import resource
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import STDERR_TAIL_LINES, CellResult, Sandbox, SandboxSpec
from rlm_mcp.sandbox.channel import WORKER_SCRIPT, WorkerGone, WorkerSandbox, WorkerTransport, describe_stop
from rlm_mcp.sandbox.leftovers import dead_owner_in_name, owned_temp_prefix, owner_dir_name
from rlm_mcp.sandbox.processes import Group, GroupLimits, GroupMaker, kill_tree

log = logging.getLogger(__name__)

# The pipe readers' buffer limit: protocol lines are read in pieces of at most this (so a
# message is never held beyond its own cap plus one piece), and it bounds one stderr line.
LINE_LIMIT = 4 << 20
STDERR_LINE_BYTES = 2_000  # per kept line: the last 3 reach the model when a worker dies
STDERR_CHUNK = 1 << 16

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc/alternatives", "/etc/ssl")
SANDBOX_HOME = "/tmp"  # with bubblewrap: the only writable place, a size-limited tmpfs
SANDBOX_WORKER = "/run/rlm-mcp/worker.py"  # where bubblewrap shows worker.py
FILE_SIZE_LIMIT = 4 * 1024**3  # RLIMIT_FSIZE: the only bound on disk use without bubblewrap
LIMIT_CHECK_S = 0.05  # cells this long (or failing) have their group's limit counters read

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_warned: set[str] = set()


def scrubbed_environment(home: str) -> dict[str, str]:
    """An allow-list environment: nothing from the server's environment leaks in."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _prctl(option: int, value: int) -> None:
    assert _LIBC is not None
    if _LIBC.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")


# ----- what this host allows: decided once per provider ------------------------------------------


@dataclass
class Isolation:
    """How local sandboxes run on this host (see :func:`decide_isolation`)."""

    uid: int
    gid: int
    drop: bool  # the server is root: the sandbox changes to uid/gid
    bwrap: str | None = None  # bubblewrap in use
    setpriv: str | None = None  # root + bubblewrap: drops to uid/gid inside the namespaces
    groups: GroupMaker | None = None
    user_namespace: bool = False  # bubblewrap as non-root: RLIMIT_NPROC counts per sandbox
    python: list[str] = field(default_factory=list)  # interpreter argv (+ -I -u)
    script: str = str(WORKER_SCRIPT)
    site_dirs: list[str] = field(default_factory=list)
    inherited: list[int] = field(default_factory=list)  # descriptors every worker gets (O_PATH)
    cap_last: int = 40
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # RLM_MCP_LOCAL_ISOLATION=bwrap and bubblewrap cannot run

    def close(self) -> None:
        for fd in self.inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.inherited = []


def decide_isolation(settings: Settings) -> Isolation:
    """Find out once what isolation this host gives (blocking: bubblewrap probe, cgroup setup);
    log a warning for each wall that is missing."""
    if os.geteuid() == 0:
        isolation = Isolation(uid=settings.local_uid, gid=settings.local_uid, drop=True)
    else:
        isolation = Isolation(uid=os.getuid(), gid=os.getgid(), drop=False)
    with contextlib.suppress(OSError, ValueError):
        isolation.cap_last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    mode = settings.local_isolation
    without = ""  # why bubblewrap is not used, when mode is auto
    if mode != "none":
        problem = _setup_bubblewrap(isolation, settings)
        if problem and mode == "bwrap":
            isolation.error = f"RLM_MCP_LOCAL_ISOLATION=bwrap but {problem}"
            return isolation
        without = problem
    if isolation.bwrap is None:
        _setup_plain_python(isolation)
        cause = "RLM_MCP_LOCAL_ISOLATION=none" if mode == "none" else without
        isolation.notes.append(
            f"local sandboxes run without isolation ({cause}): code in them can read what uid "
            f"{isolation.uid} may read, use the network, and call the model server on loopback "
            "directly, outside budget accounting; install bubblewrap, or use RLM_MCP_SANDBOX=docker "
            "for inputs you do not trust")
    isolation.notes += _setup_groups(isolation, settings)
    for note in isolation.notes:
        _warn_once(note)
    return isolation


def _setup_bubblewrap(isolation: Isolation, settings: Settings) -> str:
    """Set ``isolation.bwrap`` if bubblewrap works here with our options; else say why not."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if isolation.drop:
        setpriv = shutil.which("setpriv")
        if setpriv is None or not setpriv.startswith(("/usr/", "/bin/", "/sbin/")):
            return ("setpriv (util-linux) is not installed in /usr or /bin: a root server needs it to "
                    f"drop to uid {isolation.uid} inside bubblewrap")
        isolation.setpriv = setpriv
    isolation.bwrap = bwrap
    isolation.user_namespace = not isolation.drop
    isolation.python = [sys.executable, "-I", "-u"]
    isolation.script = SANDBOX_WORKER
    probe = bubblewrap_argv(isolation, settings.sandbox_memory_mb) + ["true"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=30, env=scrubbed_environment(SANDBOX_HOME),
                              preexec_fn=_child_setup(isolation, None, settings, cpu_s=60), cwd="/")
        problem = "" if done.returncode == 0 else (
            f"bubblewrap fails here: {done.stderr.decode('utf-8', 'replace').strip()[:300]} "
            "(as non-root, bubblewrap needs unprivileged user namespaces)")
    except (OSError, subprocess.SubprocessError) as exc:
        problem = f"bubblewrap cannot start: {exc}"
    if problem:
        isolation.bwrap = isolation.setpriv = None
        isolation.user_namespace = False
    return problem


def _setup_plain_python(isolation: Isolation) -> None:
    """The interpreter argv without bubblewrap. A root server's sandbox user often cannot reach
    the server's Python (pyenv under /root, mode 0700): then the interpreter, worker.py and the
    server's site-packages are reached through descriptors opened here (``/proc/self/fd/N``
    crosses no directory on the way), instead of loosening the host's permissions."""
    isolation.python = [sys.executable, "-I", "-u"]
    isolation.script = str(WORKER_SCRIPT)
    if not isolation.drop:
        return
    needed = [os.path.realpath(sys.executable), os.__file__, str(WORKER_SCRIPT)]
    if all(_reachable(path, isolation.uid, isolation.gid) for path in needed):
        return
    prefix = os.path.realpath(sys.base_prefix)
    interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if not interpreter.startswith(prefix + os.sep):
        return  # an unusual layout: run it as it is; a start failure names the uid to fix
    try:
        prefix_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
        isolation.inherited.append(prefix_fd)
        script_fd = os.open(WORKER_SCRIPT, os.O_PATH)
        isolation.inherited.append(script_fd)
        site_fds = [os.open(directory, os.O_PATH | os.O_DIRECTORY) for directory in site.getsitepackages()
                    if os.path.isdir(directory) and not os.path.realpath(directory).startswith(prefix + os.sep)]
        isolation.inherited += site_fds
    except OSError as exc:  # run the interpreter as it is: a start failure then names the uid
        log.warning("cannot open the Python installation for the sandbox's uid: %s", exc)
        isolation.close()
        return
    isolation.python = [f"/proc/self/fd/{prefix_fd}/{os.path.relpath(interpreter, prefix)}", "-I", "-u"]
    isolation.script = f"/proc/self/fd/{script_fd}"
    isolation.site_dirs = [f"/proc/self/fd/{fd}" for fd in site_fds]


def _reachable(path: str, uid: int, gid: int) -> bool:
    """Whether uid/gid (no supplementary groups) may search every directory down to ``path``
    and read it (mode bits; ACLs are not consulted, so the answer errs towards 'no')."""
    def allows(st: os.stat_result, user: int, group: int, other: int) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & user)
        if st.st_gid == gid:
            return bool(st.st_mode & group)
        return bool(st.st_mode & other)

    try:
        parts = Path(path).parts
        for depth in range(1, len(parts)):
            if not allows(os.stat(Path(*parts[:depth])), stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                return False
        return allows(os.stat(path), stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
    except OSError:
        return False


def _setup_groups(isolation: Isolation, settings: Settings) -> list[str]:
    """Control groups for whole-sandbox limits; notes for the limits that then do not hold."""
    maker, reason = GroupMaker.discover(prefix=f"rlm-mcp-{owner_dir_name()}-")
    if maker is not None:
        reaped = maker.reap_stale(lambda name: dead_owner_in_name(name, "rlm-mcp-"))
        if reaped:
            log.info("removed %d control groups left by local sandboxes of servers that are gone", reaped)
        isolation.groups = maker
        if isolation.bwrap is None:
            return [f"local sandboxes without bubblewrap write to the host's disk: disk use is limited per "
                    f"file ({FILE_SIZE_LIMIT >> 30} GB), not in total"]
        return []
    memory = settings.sandbox_memory_mb
    processes = (f"per sandbox ({settings.sandbox_pids}, RLIMIT_NPROC in its user namespace)"
                 if isolation.user_namespace else "not at all")
    scratch = (f"by a {scratch_bytes(memory) >> 20:,} MB tmpfs" if isolation.bwrap else
               f"per file ({FILE_SIZE_LIMIT >> 30} GB), not in total")
    return [f"local sandboxes cannot be limited as a whole on this host ({reason}): memory is limited "
            f"per process ({memory:,} MB of address space each), CPU time per process, the process "
            f"count {processes}, disk {scratch}; processes are still all killed at the end"]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def scratch_bytes(memory_mb: int) -> int:
    """Size of the bubblewrap sandbox's /tmp. Its pages count in the memory limit too: at half of
    it, filling /tmp fails with ENOSPC (a clean error, REPL state kept) before the kernel has to
    kill a process for memory."""
    return memory_mb * 1024 * 1024 // 2


def bubblewrap_argv(isolation: Isolation, memory_mb: int) -> list[str]:
    """bwrap, then setpriv for a root server: no network, new pid/ipc/uts/cgroup namespaces,
    no capabilities, read-only system and Python directories, worker.py, and a size-limited
    tmpfs at /tmp as the only writable place. Nothing else of the host is visible."""
    assert isolation.bwrap is not None
    argv = [isolation.bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--cap-drop", "ALL"]
    if isolation.setpriv is not None:
        # A root bwrap maps no user namespace: it keeps just what setpriv needs to drop to the
        # sandbox's uid, which also clears these (no ambient or kept capabilities survive).
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(scratch_bytes(memory_mb)), "--perms", "1777", "--tmpfs", SANDBOX_HOME]
    python_dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent)}
    bound: list[str] = []
    made: set[str] = set()
    for path in list(SYSTEM_DIRS) + sorted(python_dirs):
        if any(path == b or path.startswith(b.rstrip("/") + "/") for b in bound):
            continue  # inside a directory already shown
        # bwrap would create the missing parents with mode 0700, which the sandbox's uid cannot
        # cross (e.g. /root for a pyenv Python): create them 0755 first.
        for parent in list(Path(path).parents)[-2::-1]:
            if str(parent) not in made:
                made.add(str(parent))
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind-try", path, path]
        bound.append(path)
    argv += ["--perms", "0755", "--dir", str(Path(SANDBOX_WORKER).parent),
             "--ro-bind", str(WORKER_SCRIPT), SANDBOX_WORKER, "--chdir", SANDBOX_HOME]
    if isolation.setpriv is not None:
        argv += [isolation.setpriv, "--reuid", str(isolation.uid), "--regid", str(isolation.gid),
                 "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return argv


def _child_setup(isolation: Isolation, group: Group | None, settings: Settings, cpu_s: int) -> Callable[[], None]:
    """What the child does between fork and exec: rlimits, join its control group, become a
    subreaper, give up root (unless a root bubblewrap does it), and no-new-privileges."""
    memory = settings.sandbox_memory_mb * 1024 * 1024
    drop_here = isolation.drop and isolation.bwrap is None
    subreaper = group is None and isolation.bwrap is None

    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        if group is not None:
            group.join()
        if subreaper:  # orphans of the tree re-parent to the worker, where kill_tree finds them
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        if drop_here:
            for capability in range(isolation.cap_last + 1):
                _prctl(PR_CAPBSET_DROP, capability)
            os.setgroups([])
            os.setresgid(isolation.gid, isolation.gid, isolation.gid)
            os.setresuid(isolation.uid, isolation.uid, isolation.uid)  # clears every capability
        if isolation.bwrap is None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which resets it
        _prctl(PR_SET_NO_NEW_PRIVS, 1)

    return setup


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
                preexec_fn=_child_setup(isolation, launch.group, self.settings, self._cpu_seconds()),
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


def protect_host_environment() -> None:
    """Make this process non-dumpable, so a same-user worker cannot read our environment (API
    keys) through /proc/<ppid>/environ or ptrace us. Linux only; a no-op elsewhere."""
    if _LIBC is None:
        return
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError):
        _warn_once("could not make the server non-dumpable; local workers may read its environment")
