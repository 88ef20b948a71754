"""How local sandboxes are isolated on this host, decided once per provider: the uid to run as,
bubblewrap (its argv), control groups, the Python the worker runs with, and what the child does
between fork and exec (rlimits, capabilities, no-new-privileges). The transport and the sandbox
that use it are in :mod:`rlm_mcp.sandbox.local`."""

from __future__ import annotations

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlm_mcp.config import Settings
from rlm_mcp.sandbox.channel import WORKER_SCRIPT
from rlm_mcp.sandbox.leftovers import dead_owner_in_name, owner_dir_name
from rlm_mcp.sandbox.processes import Group, GroupMaker

log = logging.getLogger(__name__)

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc/alternatives", "/etc/ssl")
SANDBOX_HOME = "/tmp"  # with bubblewrap: the only writable place, a size-limited tmpfs
SANDBOX_WORKER = "/run/rlm-mcp/worker.py"  # where bubblewrap shows worker.py
FILE_SIZE_LIMIT = 4 * 1024**3  # RLIMIT_FSIZE: the only bound on disk use without bubblewrap

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
                              preexec_fn=child_setup(isolation, None, settings, cpu_s=60), cwd="/")
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


def child_setup(isolation: Isolation, group: Group | None, settings: Settings, cpu_s: int) -> Callable[[], None]:
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


def protect_host_environment() -> None:
    """Make this process non-dumpable, so a same-user worker cannot read our environment (API
    keys) through /proc/<ppid>/environ or ptrace us. Linux only; a no-op elsewhere."""
    if _LIBC is None:
        return
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError):
        _warn_once("could not make the server non-dumpable; local workers may read its environment")
