"""Process facts shared by the store and the sandbox backends (standard library only): whether a
pid lives, the descendants of a process, and control groups that bound and kill a process tree.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
KILL_ROUNDS = 200  # passes over a group/tree; a fork bomb is bounded by the pids limit meanwhile
_GROUP_NUMBERS = itertools.count(1)  # process-wide: several providers may share one prefix


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (owned by anyone)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill would terminate it; callers fall back on other evidence (age)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but belongs to another user
    return True


# ----- process trees without a control group ------------------------------------------------------


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so cut at the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            parents[int(name)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` in the process tree (not ``pid`` itself)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and everything below it. ``root`` must be a child subreaper
    (PR_SET_CHILD_SUBREAPER), so that orphans, double-forked daemons included, stay below it
    instead of moving to init. Everything is stopped first (a stopped process cannot fork), the
    descendants are killed before the root (their orphans would otherwise escape to init)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(root, signal.SIGSTOP)
    stopped: set[int] = set()
    for _ in range(KILL_ROUNDS):
        fresh = descendants(root) - stopped
        if not fresh:
            break
        for pid in fresh:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= fresh
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(root, signal.SIGKILL)


# ----- control groups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupLimits:
    """What one sandbox may use as a whole."""

    memory_bytes: int
    pids: int
    cpus: float  # CPU time per second of wall time; 0 = unlimited


@dataclass
class Group:
    """One sandbox's control group (one directory per cgroup v1 hierarchy, or one for v2)."""

    version: int
    dirs: list[Path]
    _procs: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._procs = [os.fsencode(d / "cgroup.procs") for d in self.dirs]
        # Where join() writes: cgroup v1's "tasks" with "0" moves the calling thread without the
        # kernel's global threadgroup lock, whose RCU grace period costs 5-15 ms per sandbox start.
        # In a child between fork and exec the calling thread is the whole process.
        self._join = [os.fsencode(d / ("tasks" if self.version == 1 else "cgroup.procs")) for d in self.dirs]

    def join(self) -> None:
        """Move the calling process, single-threaded (between fork and exec), into the group."""
        for path in self._join:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self._procs:
            found |= _read_pids(Path(os.fsdecode(path)))
        return found

    def kill_all(self) -> None:
        """SIGKILL every process in the group, including any forked while this runs."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                (self.dirs[0] / "cgroup.kill").write_text("1")  # Linux 5.14+: atomic
        for _ in range(KILL_ROUNDS):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)  # let the kernel finish the exits before the next look
        log.warning("processes of sandbox group %s survived SIGKILL", self.dirs[0])

    def remove(self) -> None:
        """Kill what is left and delete the group's directories."""
        self.kill_all()
        for directory in self.dirs:
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:  # EBUSY while the last exits are accounted
                    if exc.errno != errno.EBUSY:
                        log.warning("cannot remove sandbox group %s: %s", directory, exc)
                        break
                    time.sleep(0.002)

    def limit_events(self) -> dict[str, int]:
        """Counters of limits hit so far: {'memory': kills or failures, 'pids': refused forks}."""
        events: dict[str, int] = {}
        for directory in self.dirs:
            if self.version == 1:
                oom = _read_keyed(directory / "memory.oom_control").get("oom_kill")
                if oom is None and (directory / "memory.failcnt").exists():
                    oom = _read_int(directory / "memory.failcnt")
                if oom is not None:
                    events["memory"] = oom
                if (directory / "pids.events").exists():
                    events["pids"] = _read_keyed(directory / "pids.events").get("max", 0)
            else:
                events["memory"] = _read_keyed(directory / "memory.events").get("oom_kill", 0)
                events["pids"] = _read_keyed(directory / "pids.events").get("max", 0)
        return events


def _read_pids(path: Path) -> set[int]:
    try:
        return {int(line) for line in path.read_text().split()}
    except (OSError, ValueError):
        return set()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
    except OSError:
        pass
    return values


@dataclass
class GroupMaker:
    """Creates per-sandbox groups below the server's own groups, with limits on the whole."""

    version: int
    parents: dict[str, Path]  # controller -> parent directory (v2: the same directory for all)
    prefix: str  # of the groups' names: it names the owner, so a later server can reap them

    @classmethod
    def discover(cls, prefix: str) -> tuple["GroupMaker | None", str]:
        """A maker for this host, or None and the reason why control groups cannot be used."""
        try:
            own = _own_groups()
            mounts = _cgroup_mounts()
        except OSError as exc:
            return None, f"cannot read the process's control groups ({exc})"
        v1 = {c: mounts[c] for c in CONTROLLERS if c in mounts}
        if len(v1) == len(CONTROLLERS):
            parents = {}
            for controller, (mount_root, mount_point) in v1.items():
                parents[controller] = _inside(mount_point, mount_root, own.get(controller, "/"))
            maker = cls(1, parents, prefix)
            reason = maker._probe()
            return (maker, "") if not reason else (None, reason)
        if "" in mounts and "" in own:
            mount_root, mount_point = mounts[""]
            maker = cls(2, {c: _inside(mount_point, mount_root, own[""]) for c in CONTROLLERS}, prefix)
            try:
                reason = maker._delegate_v2()
            except OSError as exc:
                reason = f"cannot read the server's cgroup v2 group ({exc.strerror or exc})"
            return (maker, "") if not reason else (None, reason)
        missing = [c for c in CONTROLLERS if c not in v1]
        return None, f"the cgroup controllers {', '.join(missing)} are not mounted"

    def _probe(self) -> str:
        """'' if a group can be made and limited here; else why not."""
        try:
            group = self.create(GroupLimits(memory_bytes=64 * 1024**2, pids=8, cpus=0.5))
        except OSError as exc:
            return f"cannot create a control group under {self.parents['memory']} ({exc.strerror or exc})"
        group.remove()
        return ""

    def _delegate_v2(self) -> str:
        """cgroup v2 allows controllers for child groups only in a group without processes: when
        the server's group is delegated to it (writable, and holding nothing but this process,
        as under ``systemd-run --scope -p Delegate=yes``), move the server into a leaf
        ``rlm-mcp-server`` and enable the controllers for its siblings, the sandboxes."""
        own = self.parents["memory"]
        if own.name == f"{self.prefix}server":  # moved there by an earlier provider of this process
            own = own.parent
            self.parents = dict.fromkeys(CONTROLLERS, own)
        available = set((own / "cgroup.controllers").read_text().split()) if (own / "cgroup.controllers").exists() else set()
        missing = [c for c in CONTROLLERS if c not in available]
        if missing:
            return f"cgroup v2 does not delegate {', '.join(missing)} to {own}"
        enabled = set((own / "cgroup.subtree_control").read_text().split())
        if not set(CONTROLLERS) <= enabled:
            others = _read_pids(own / "cgroup.procs") - {os.getpid()}
            if others:
                return (f"the server's cgroup v2 group {own} holds other processes, so it cannot "
                        "delegate controllers to sandbox groups (run the server in its own delegated group)")
            try:
                leaf = own / f"{self.prefix}server"
                leaf.mkdir(exist_ok=True)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
                (own / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
            except OSError as exc:
                return f"cannot delegate cgroup v2 controllers under {own} ({exc.strerror or exc})"
        return self._probe()

    def create(self, limits: GroupLimits) -> Group:
        """A new group with ``limits``; raises OSError when the host refuses."""
        leaf = f"{self.prefix}{next(_GROUP_NUMBERS)}"
        made: list[Path] = []
        try:
            for parent in dict.fromkeys(self.parents.values()):  # v2: one directory for all
                (parent / leaf).mkdir()
                made.append(parent / leaf)
            where = {controller: parent / leaf for controller, parent in self.parents.items()}
            for filename, value in self._settings(limits):
                controller = filename.partition(".")[0]
                optional = filename in ("memory.swappiness", "memory.memsw.limit_in_bytes", "memory.swap.max")
                try:
                    (where[controller] / filename).write_text(value)
                except OSError:
                    if not optional:  # no swap accounting or swappiness: swap is then off or unlimited
                        raise
        except OSError:
            Group(self.version, made).remove()
            raise
        return Group(self.version, made)

    def _settings(self, limits: GroupLimits) -> list[tuple[str, str]]:
        memory, quota = str(limits.memory_bytes), int(limits.cpus * CPU_PERIOD_US)
        if self.version == 1:
            settings = [("memory.limit_in_bytes", memory),
                        ("memory.memsw.limit_in_bytes", memory),  # swap counts too (no swapping past the limit)
                        ("memory.swappiness", "0"),
                        ("pids.max", str(limits.pids))]
            if quota > 0:
                settings += [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))]
            return settings
        settings = [("memory.max", memory), ("memory.swap.max", "0"), ("pids.max", str(limits.pids))]
        if quota > 0:
            settings.append(("cpu.max", f"{quota} {CPU_PERIOD_US}"))
        return settings

    def reap_stale(self, is_stale: Callable[[str], bool]) -> int:
        """Kill and delete the groups whose name ``is_stale`` (left by servers that are gone);
        returns how many."""
        reaped = 0
        for parent in dict.fromkeys(self.parents.values()):
            with contextlib.suppress(OSError):
                for entry in parent.iterdir():
                    if entry.is_dir() and is_stale(entry.name):
                        Group(self.version, [entry]).remove()
                        reaped += 1
        return reaped


def _own_groups() -> dict[str, str]:
    """controller -> this process's group path ('' is the cgroup v2 hierarchy)."""
    groups: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                groups[controller] = path
    return groups


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """controller -> (root of the hierarchy shown by the mount, mount point); '' for cgroup v2."""
    mounts: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            root, point = _unescape(fields[3]), _unescape(fields[4])
            if tail[0] == "cgroup2":
                mounts.setdefault("", (root, point))
            elif tail[0] == "cgroup":
                for option in tail[2].split(","):
                    if option in CONTROLLERS:
                        mounts.setdefault(option, (root, point))
    return mounts


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _inside(mount_point: str, mount_root: str, group: str) -> Path:
    """The directory of ``group`` under a mount whose root is ``mount_root`` (containers mount a
    sub-tree of the hierarchy at /sys/fs/cgroup/...)."""
    relative = os.path.relpath(group, mount_root) if mount_root != "/" else group.lstrip("/")
    if relative.startswith(".."):
        relative = ""  # our group is above the mount's root: use the mount's root
    return Path(mount_point) / relative if relative not in ("", ".") else Path(mount_point)
