"""Shared pieces of the benchmark suite: test data, memory watchers, figures, the machine line.

Memory methods (the table says which applies where):

* a process's own peak: ``VmHWM`` from ``/proc/<pid>/status`` (the kernel's high-water mark of
  its resident set), read just before the process ends;
* sandbox worker processes (local sandboxes; Daytona-emulator sandboxes, which are local
  processes too): a thread polls the process tree under a root pid every 20 ms through
  ``/proc/<pid>/task/*/children`` and keeps the highest ``VmHWM`` any worker reported. VmHWM is
  monotonic, so a poll only misses growth in the last 20 ms of a worker's life;
* Docker containers: the container's memory cgroup high-water mark,
  ``/sys/fs/cgroup/memory/docker/<id>/memory.max_usage_in_bytes`` (what ``docker stats`` calls
  ``max_usage`` on cgroup v1; it includes page cache charged to the container), polled every
  50 ms while the container lives; the highest value of any matching container is kept.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

MB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
FILLER = "lorem ipsum dolor sit amet, consectetur adipiscing elit. "
CGROUP_DOCKER = Path("/sys/fs/cgroup/memory/docker")

# How a row's sandbox peak was taken (the report names the method per row).
MEM_LOCAL = "worker VmHWM (/proc poll)"
MEM_DOCKER = "container max_usage (cgroup)"
MEM_INPROC = "in the process (local REPL)"


# ----- test data ---------------------------------------------------------------------------------


def needle_sentence(code: str) -> str:
    # The sentence the scripted model's policies look for (rlm_mcp.testing.model_server).
    return f" The secret code is {code}. "


def write_haystack(path: Path, size_bytes: int, code: str, at: float = 0.66) -> None:
    """``size_bytes`` of ASCII filler with the needle sentence inserted at fraction ``at``."""
    block = (FILLER * (MB // len(FILLER) + 1))[:MB]

    def emit(fh: Any, count: int) -> None:
        while count > 0:
            piece = block[:min(MB, count)]
            fh.write(piece)
            count -= len(piece)

    cut = int(size_bytes * at)
    with open(path, "w", encoding="ascii") as fh:
        emit(fh, cut)
        fh.write(needle_sentence(code))
        emit(fh, size_bytes - cut)


def write_documents(directory: Path, count: int, every: int = 7) -> int:
    """``count`` small text files; every ``every``-th holds one needle. Returns the needles."""
    directory.mkdir(parents=True, exist_ok=True)
    needles = 0
    for i in range(count):
        body = f"Document {i:05d}.\n" + FILLER * (20 + i % 40)
        if i % every == 3:
            cut = len(body) // 2
            body = body[:cut] + needle_sentence(f"DOC{i:05d}") + body[cut:]
            needles += 1
        (directory / f"doc{i:05d}.txt").write_text(body, encoding="ascii")
    return needles


# ----- processes and memory ----------------------------------------------------------------------


def vmhwm_kb(pid: int) -> int | None:
    """Peak resident set of a live process, KiB (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                found.extend(int(p) for p in fh.read().split())
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


class ProcessTreeWatch:
    """Polls the tree under ``root_pid``; keeps the highest VmHWM of processes whose command
    line contains ``marker`` (e.g. the sandbox worker script)."""

    def __init__(self, root_pid: int, marker: str = "worker.py", interval: float = 0.02) -> None:
        self.root_pid = root_pid
        self.marker = marker
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="proc-watch")
        self._matches: dict[int, bool] = {}  # pid -> worker

    def __enter__(self) -> ProcessTreeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in descendants(self.root_pid):
                # Only positives are cached: right after fork a worker still shows its parent's
                # command line until it execs.
                match = self._matches.get(pid) or self.marker in cmdline(pid)
                if match:
                    self._matches[pid] = True
                    kb = vmhwm_kb(pid)
                    if kb is not None:
                        self.peaks[pid] = max(self.peaks.get(pid, 0), kb)
            self._stop.wait(self.interval)

    @property
    def peak_mb(self) -> float | None:
        return max(self.peaks.values()) / 1024 if self.peaks else None

    @property
    def count(self) -> int:
        return len(self.peaks)


class DockerMemoryWatch:
    """Polls the memory cgroups of running containers accepted by ``accept(container)``
    (docker-py container object, inspected once per id) and keeps each one's max_usage."""

    def __init__(self, accept: Callable[[Any], bool], interval: float = 0.05) -> None:
        self.accept = accept
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._verdicts: dict[str, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="docker-watch")
        self._client: Any = None
        self.available = CGROUP_DOCKER.is_dir()

    def __enter__(self) -> DockerMemoryWatch:
        if self.available:
            import docker

            self._client = docker.from_env()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self._client is not None:
            self._client.close()

    def _verdict(self, cid: str) -> bool:
        if cid not in self._verdicts:
            try:
                self._verdicts[cid] = bool(self.accept(self._client.containers.get(cid)))
            except Exception:  # gone already, or not inspectable
                return False
        return self._verdicts[cid]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ids = [p.name for p in CGROUP_DOCKER.iterdir() if p.is_dir()]
            except OSError:
                ids = []
            for cid in ids:
                if not self._verdict(cid):
                    continue
                try:
                    value = int((CGROUP_DOCKER / cid / "memory.max_usage_in_bytes").read_text())
                except (OSError, ValueError):
                    continue
                self.peaks[cid] = max(self.peaks.get(cid, 0), value)
            self._stop.wait(self.interval)

    @property
    def peak_mb(self) -> float | None:
        return max(self.peaks.values()) / MB if self.peaks else None

    @property
    def count(self) -> int:
        return len(self.peaks)


# ----- figures -----------------------------------------------------------------------------------


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def run_command(args: list[str], timeout: float = 30) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib,
        "kernel": platform.release(), "python": platform.python_version(),
        "docker": run_command(["docker", "version", "--format", "{{.Server.Version}}"]) or None,
        "rlm_mcp_commit": run_command(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['cpu'] or 'unknown CPU'}, {info['cores']} cores, {info['memory_gib']} GiB RAM, "
            f"Linux {info['kernel']}, Python {info['python']}, Docker {info['docker'] or 'absent'}, "
            f"rlm-mcp {info['rlm_mcp_commit']}, rlms {info.get('rlms_version') or 'not installed'}; "
            f"load average at start {info['load_avg_at_start']}")


class DriverProcess:
    """A driver subprocess speaking JSON lines: it prints ``{"event": "ready"}`` before each
    repeat and waits for ``go``; then prints ``{"event": "result", ...}``; finally
    ``{"event": "done", ...}``. Lines that are not JSON objects are ignored (stray output)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, env=env, cwd=cwd)
        self.stderr_tail: list[str] = []
        self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip())
            del self.stderr_tail[:-40]

    def next_event(self, timeout: float) -> dict[str, Any]:
        """The next JSON event; raises TimeoutError / RuntimeError (process ended)."""
        assert self.proc.stdout is not None
        result: list[str] = []

        def read() -> None:
            while True:
                line = self.proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    return
                if line.lstrip().startswith("{"):
                    result.append(line)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            self.kill()
            raise TimeoutError(f"driver gave no event within {timeout:g} s")
        if not result:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"driver ended (exit {self.proc.returncode}): " + " | ".join(self.stderr_tail[-8:]))
        return json.loads(result[0])

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self, timeout: float = 30) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            self.kill()


def protocol_stdout() -> Any:
    """In a driver: a private handle on the real stdout for protocol lines; fd 1 then points at
    stderr so that anything else printing cannot corrupt the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)
    return proto
