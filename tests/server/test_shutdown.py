"""A stdio server stops within a host's patience: Claude Code sends SIGINT and, ~100 ms later,
SIGTERM; other hosts close stdin. Each test starts ``rlm-mcp`` with a run held inside a REPL
cell (its llm_query waits on a gate in the scripted model server), stops it, and checks the
exit time and code, the trajectory, and that the sandbox's processes are gone."""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from rlm_mcp.engine.runs import SERVER_STOPPED
from rlm_mcp.sandbox.docker import LABEL, LABEL_VALUE, OWNER_LABEL
from rlm_mcp.testing.model_server import ScriptedModelServer
from tests.docker_support import docker_engine  # noqa: F401
from tests.server.test_transports import RLM_MCP, server_env

# The requirement is 100 ms. On this shared 2-core machine a stop measured 25-40 ms from the
# signal to the exit status (python /tmp harness, 10 runs); the margin covers a loaded CI
# runner's scheduling, not slowness of ours: the server logs its own stop time, asserted tighter.
EXIT_BUDGET_S = 0.100
LOAD_MARGIN_S = 0.150
OWN_STOP_BUDGET_MS = 60  # what the server itself reports ("stopped (...) in N ms")
WAIT_S = 60  # any wait for the server or the gate


@dataclass
class HeldRun:
    proc: subprocess.Popen[str]
    home: Path
    run_id: str
    sandbox_pids: set[int]
    stderr: Path


def descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (read from /proc: children, their children...)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.fixture
def held_run(tmp_path: Path) -> Iterator[Callable[..., HeldRun]]:
    """Start rlm-mcp over stdio with one run waiting inside a cell; release the gate at the end."""
    entered, release = threading.Event(), threading.Event()
    procs: list[subprocess.Popen[str]] = []

    def gate(messages: list[dict[str, Any]]) -> str:
        entered.set()
        release.wait(WAIT_S)
        return "released"

    with ScriptedModelServer() as models:
        def start(**env_extra: str) -> HeldRun:
            models.script("needle", ["```repl\nprint(llm_query('hold on'))\n```", gate])
            home = tmp_path / "home"
            stderr = tmp_path / "server.stderr"
            proc = subprocess.Popen(RLM_MCP, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=stderr.open("w"), text=True,
                                    env=server_env(models, home, **env_extra))
            procs.append(proc)
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()

            def call(request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method,
                                             "params": params}) + "\n")
                proc.stdin.flush()
                deadline = time.monotonic() + WAIT_S
                while True:
                    message = json.loads(lines.get(timeout=max(0.01, deadline - time.monotonic())))
                    if message.get("id") == request_id:
                        assert "error" not in message, message
                        return message["result"]

            call(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                   "clientInfo": {"name": "shutdown-test", "version": "1"}})
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
            proc.stdin.flush()
            started = call(2, "tools/call", {"name": "rlm_complete",
                                             "arguments": {"query": "q", "context": "some text", "wait_s": 0}})
            assert started["structuredContent"]["status"] in ("running", "queued"), started
            assert entered.wait(WAIT_S), "the run never reached its llm_query"
            return HeldRun(proc, home, started["structuredContent"]["run_id"], descendants(proc.pid), stderr)

        try:
            yield start
        finally:
            release.set()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(WAIT_S)


def stop_and_time(run: HeldRun, stop: Callable[[subprocess.Popen[str]], None]) -> tuple[int, float]:
    begun = time.monotonic()
    stop(run.proc)
    code = run.proc.wait(WAIT_S)
    return code, time.monotonic() - begun


def assert_stopped_cleanly(run: HeldRun, code: int, took_s: float, why: str) -> None:
    log = run.stderr.read_text(errors="replace")
    assert code == 0, f"exit code {code}\n{log[-3000:]}"
    assert took_s < EXIT_BUDGET_S + LOAD_MARGIN_S, f"exited {took_s * 1000:.0f} ms after the stop\n{log[-3000:]}"
    stopped = [line for line in log.splitlines() if f"stopped ({why}) in" in line]
    assert stopped, log[-3000:]
    assert int(stopped[-1].rsplit(" in ", 1)[1].split()[0]) <= OWN_STOP_BUDGET_MS, stopped[-1]
    assert run.sandbox_pids, "the held run had no sandbox process to stop"
    assert not [pid for pid in run.sandbox_pids if alive(pid)], "sandbox processes outlived the server"
    path = run.home / "trajectories" / f"{run.run_id}.jsonl"
    meta = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert (meta["status"], meta["error"]) == ("cancelled", SERVER_STOPPED)
    assert meta["finished_at"]


def test_sigint_stops_a_server_with_a_run_in_a_cell_within_100_ms(held_run):
    run = held_run()
    code, took = stop_and_time(run, lambda proc: proc.send_signal(signal.SIGINT))
    assert_stopped_cleanly(run, code, took, "SIGINT")


def test_sigterm_stops_it_the_same_way(held_run):
    run = held_run()
    code, took = stop_and_time(run, lambda proc: proc.send_signal(signal.SIGTERM))
    assert_stopped_cleanly(run, code, took, "SIGTERM")


def test_closing_stdin_stops_a_server_with_a_run_in_a_cell_within_100_ms(held_run):
    run = held_run()
    code, took = stop_and_time(run, lambda proc: proc.stdin.close() if proc.stdin else None)
    assert_stopped_cleanly(run, code, took, "stdin closed")


async def test_after_a_stop_the_next_server_reports_the_run_cancelled_because_the_server_stopped(held_run):
    run = held_run()
    stop_and_time(run, lambda proc: proc.send_signal(signal.SIGINT))
    with ScriptedModelServer() as models:
        params = StdioServerParameters(command=RLM_MCP[0], args=RLM_MCP[1:], env=server_env(models, run.home))
        with (run.home.parent / "second.stderr").open("w") as errlog:
            async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=WAIT_S) as client:
                result = await client.call_tool("rlm_get_result", {"run_id": run.run_id, "wait_s": 0})
    seen = result.structured_content
    assert (seen["status"], seen["error"]) == ("cancelled", SERVER_STOPPED)
    assert "rlm_complete" in seen["next_step"]  # what to do: start it again


def reaper_of(home: Path) -> int | None:
    """The pid of the detached reaper a stopped server with data dir ``home`` started."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"rlm_mcp.sandbox.reaper" in cmdline and f"RLM_MCP_HOME={home}".encode() in environ:
            return int(entry)
    return None


def test_sigint_with_a_docker_run_exits_fast_and_the_reaper_removes_its_container(held_run, docker_engine):  # noqa: F811
    run = held_run(RLM_MCP_SANDBOX="docker")
    ours = {"label": f"{LABEL}={LABEL_VALUE}"}

    def containers() -> list[str]:
        return [c.name for c in docker_engine.containers.list(all=True, filters=ours)
                if c.labels.get(OWNER_LABEL, "").split(":")[1:2] == [str(run.proc.pid)]]

    assert containers(), "the held docker run has no container"
    code, took = stop_and_time(run, lambda proc: proc.send_signal(signal.SIGINT))
    log = run.stderr.read_text(errors="replace")
    assert code == 0 and took < EXIT_BUDGET_S + LOAD_MARGIN_S, f"{code}, {took * 1000:.0f} ms\n{log[-3000:]}"
    reaper = reaper_of(run.home)
    assert reaper is not None, "no reaper was started for the container"
    fd = os.pidfd_open(reaper)
    try:  # a wait on the reaper's exit, not a poll of the engine
        ready, _, _ = select.select([fd], [], [], WAIT_S)
    finally:
        os.close(fd)
    assert ready, f"the reaper ({reaper}) did not finish within {WAIT_S} s"
    assert containers() == []
    meta = json.loads((run.home / "trajectories" / f"{run.run_id}.jsonl").read_text().splitlines()[0])
    assert (meta["status"], meta["error"]) == ("cancelled", SERVER_STOPPED)
