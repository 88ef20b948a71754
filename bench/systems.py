"""The systems under test and how each is driven, one fresh process per scenario serving all its
repeats:

* ``rlm-mcp/<sandbox>``: the ``rlm-mcp`` command over stdio, driven by the MCP SDK client
  (:func:`run_mcp`); ``daytona-emulator`` points its Daytona backend at the loopback emulator;
* ``rlm-mcp-api/local``: ``ContextStore`` + ``RlmEngine`` in ``bench/engine_driver.py``
  (:func:`run_api`), to isolate engine overhead from MCP;
* ``reference/<env>``: the reference ``rlms`` in its own virtualenv (:func:`run_reference`).

:class:`Session` holds what a run shares (model server, work directory, the resolved systems,
the services started for them) and collects one record per scenario and system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import common, reference
from bench.common import MEM_DOCKER, MEM_INPROC, MEM_LOCAL, DockerMemoryWatch, DriverProcess, ProcessTreeWatch, spread
from bench.mcp_client import McpServer, server_env
from bench.scenarios import (DAYTONA_EMULATOR, REFERENCE_IMAGE, REFERENCE_VENV, SANDBOX_IMAGE, Task,
                             services_needed)
from rlm_mcp.testing.model_server import ScriptedModelServer

if TYPE_CHECKING:  # imported when started: it needs aiohttp and the daytona extra, which local runs do not
    from rlm_mcp.testing.daytona_emulator import DaytonaEmulator

log = logging.getLogger("bench")

DRIVER_TIMEOUT_S = 900.0
SANDBOX_IMAGE_TAG = "rlm-mcp-sandbox:latest"
EMULATOR_API_KEY = "bench"
EMULATOR_SNAPSHOT = "rlm-mcp-sandbox"


@dataclass
class Session:
    args: argparse.Namespace
    model: ScriptedModelServer
    work: Path
    machine: dict[str, Any]
    systems: tuple[str, ...]  # full names, from scenarios.resolve_systems
    records: list[dict[str, Any]] = field(default_factory=list)
    micro: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # system -> reason
    emulator: DaytonaEmulator | None = None

    def wants(self, system: str) -> bool:
        return system in self.systems

    def can_run(self, system: str) -> bool:
        return system in self.systems and system not in self.unavailable

    def stats(self) -> dict[str, int]:
        s = self.model.stats
        return {"model_calls": s.calls, "root_calls": s.root_calls, "sub_calls": s.sub_calls,
                "max_in_flight": s.max_in_flight, "prompt_chars": s.prompt_chars}

    def record(self, task: Task, system: str, repeats: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        ok = [r for r in repeats if r.get("ok")]
        rec: dict[str, Any] = {
            "scenario": task.name, "system": system, "size_note": task.size_note, "policy": task.policy,
            "repeats": repeats, "n": len(repeats),
            "wall_s": spread(r.get("wall_s") for r in ok),
            "subcalls": _median(r.get("sub_calls") for r in ok),
            "max_in_flight": max((r.get("max_in_flight") or 0 for r in ok), default=None),
            "prompt_chars": _median(r.get("prompt_chars") for r in ok),
            "trajectory_bytes": _median(r.get("trajectory_bytes") for r in ok),
            "correct": sum(1 for r in ok if r.get("correct")),
            "expected": task.expected,
            "error": next((r.get("error") for r in repeats if not r.get("ok")), None),
            "subcall_errors": max((r.get("subcall_errors") or 0 for r in ok), default=0),
            "subcall_error_sample": next((r["subcall_error_sample"] for r in ok if r.get("subcall_error_sample")),
                                         None),
        }
        rec.update(extra)
        self.records.append(rec)
        wall = rec["wall_s"]
        log.info("  %-26s %-26s %s  correct %d/%d%s", task.name, system,
                 f"median {wall['median']:.2f} s" if wall else "no result", rec["correct"], len(repeats),
                 f"  ERROR {rec['error']}" if rec["error"] else "")
        return rec

    def skip(self, task_name: str, system: str, reason: str, size_note: str = "") -> None:
        self.records.append({"scenario": task_name, "system": system, "size_note": size_note, "repeats": [],
                             "n": 0, "wall_s": None, "skipped": reason})
        log.info("  %-26s %-26s cannot run: %s", task_name, system, reason)

    def close(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ----- services ---------------------------------------------------------------------------------


async def start_services(session: Session) -> None:
    """Start or build what the selected systems need; a service that fails marks the systems
    needing it unavailable (their rows say why) instead of ending the run."""
    needed = services_needed(session.systems)
    if REFERENCE_VENV in needed:
        try:
            _, version = await asyncio.to_thread(reference.ensure_venv, session.args.reinstall_reference)
            session.machine["rlms_version"] = version
        except Exception as exc:
            reason = f"reference install failed: {exc}"
            session.unavailable.update({"reference/local": reason, "reference/docker": reason})
    if REFERENCE_IMAGE in needed and "reference/docker" not in session.unavailable:
        try:
            image = await asyncio.to_thread(reference.ensure_image)
            session.notes.append(f"reference docker environment runs image `{image}` (built here: see "
                                 "bench/reference.py; Docker Hub's python:3.11-slim is unreachable)")
        except Exception as exc:
            session.unavailable["reference/docker"] = str(exc)
    if SANDBOX_IMAGE in needed:
        found = await asyncio.to_thread(subprocess.run, ["docker", "image", "inspect", SANDBOX_IMAGE_TAG],
                                        capture_output=True, check=False)
        if found.returncode:
            session.unavailable["rlm-mcp/docker"] = (f"image {SANDBOX_IMAGE_TAG} missing "
                                                     "(bash tests/tools/ci-setup-docker.sh)")
    if DAYTONA_EMULATOR in needed:
        try:
            from rlm_mcp.testing.daytona_emulator import DaytonaEmulator

            session.emulator = DaytonaEmulator(api_key=EMULATOR_API_KEY, memory_gb=4).start()
        except Exception as exc:
            session.unavailable["rlm-mcp/daytona-emulator"] = f"Daytona emulator did not start: {exc}"


def emulator_env(emulator: DaytonaEmulator) -> dict[str, str]:
    """The server environment pointing rlm-mcp's Daytona backend at the emulator."""
    return {"DAYTONA_API_URL": emulator.api_url, "DAYTONA_API_KEY": EMULATOR_API_KEY,
            "RLM_MCP_DAYTONA_SNAPSHOT": EMULATOR_SNAPSHOT}


def backend(sandbox: str) -> str:
    """The rlm-mcp ``sandbox`` argument for a system's sandbox part."""
    return "daytona" if sandbox == "daytona-emulator" else sandbox


# ----- scenarios -------------------------------------------------------------------------------


async def run_task(session: Session, task: Task) -> None:
    log.info("scenario %s%s", task.name, f" ({task.size_note})" if task.size_note else "")
    for system in task.systems:
        if not session.wants(system):
            continue
        if system in session.unavailable:
            session.skip(task.name, system, session.unavailable[system], task.size_note)
            continue
        await run_system(session, task, system)


async def run_system(session: Session, task: Task, system: str) -> None:
    kind, _, where = system.partition("/")
    if kind == "rlm-mcp":
        await run_mcp(session, task, where)
    elif kind == "rlm-mcp-api":
        await asyncio.to_thread(run_api, session, task)
    else:
        await asyncio.to_thread(run_reference, session, task, where)


# ----- rlm-mcp over MCP ------------------------------------------------------------------------


async def run_mcp(session: Session, task: Task, sandbox: str) -> None:
    system = f"rlm-mcp/{sandbox}"
    model = session.model
    repeats: list[dict[str, Any]] = []
    load_s = first_call_s = peak = None
    watch: Any = None
    home = Path(tempfile.mkdtemp(prefix="home-", dir=session.work))
    try:
        extra: dict[str, str] = {}
        if sandbox == "daytona-emulator":
            if session.emulator is None:
                raise RuntimeError("the Daytona emulator was not started for this run")
            extra = emulator_env(session.emulator)
        server = McpServer(server_env(model.api_base, home, model=f"openai/{task.policy}", **extra))
        async with server.running():
            if server.pid is None:
                raise RuntimeError("could not find the rlm-mcp server process")
            watch = sandbox_watch(sandbox, server.pid)
            with watch:
                first_call_s = await warm_up(session, server, sandbox)
                began = time.perf_counter()
                info = await server.call("rlm_load_context", path=str(task.context_path or task.documents_dir))
                load_s = time.perf_counter() - began
                for _ in range(task.repeats):
                    model.reset_stats()
                    began = time.perf_counter()
                    try:
                        result = await asyncio.wait_for(server.complete(
                            query=task.query, handle=info["handle"], sandbox=backend(sandbox),
                            max_depth=task.max_depth), DRIVER_TIMEOUT_S)
                    except Exception as exc:
                        repeats.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    wall = time.perf_counter() - began
                    answer = (result.get("answer") or "").strip()
                    repeats.append({"ok": result["status"] == "completed", "wall_s": wall, "answer": answer,
                                    "correct": answer == task.expected, "status": result["status"],
                                    "error": result.get("error"), "server_subcalls": result.get("subcalls"),
                                    "server_elapsed_s": result.get("elapsed_s"),
                                    "trajectory_bytes": trajectory_bytes(result.get("trajectory_path"),
                                                                         result["run_id"]),
                                    **session.stats()})
                peak = server.peak_mb()
    except Exception as exc:
        log.debug("mcp run failed", exc_info=True)
        repeats.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    session.record(task, system, repeats, load_s=load_s, first_call_s=first_call_s, process_peak_mb=peak,
                   process_label="server VmHWM",
                   sandbox_peak_mb=watch.peak_mb if watch else None, sandboxes_seen=watch.count if watch else 0,
                   sandbox_memory_method=MEM_DOCKER if sandbox == "docker" else MEM_LOCAL)


async def warm_up(session: Session, server: McpServer, sandbox: str) -> float:
    """One trivial run (one root call answering FINAL) before the timed repeats: the server
    imports litellm and connects its sandbox backend on first use, as the reference driver
    has imported its modules before its timed calls. Returns that first call's seconds."""
    session.model.script("warmup", ["FINAL(ok)"])
    began = time.perf_counter()
    result = await server.complete(query="warm up", context="x", model="openai/warmup", sandbox=backend(sandbox))
    if result["status"] != "completed":
        raise RuntimeError(f"warm-up run ended {result['status']}: {result.get('error')}")
    return time.perf_counter() - began


def sandbox_watch(sandbox: str, server_pid: int) -> ProcessTreeWatch | DockerMemoryWatch:
    if sandbox == "docker":
        def owned(container: Any) -> bool:
            return bool(container.labels.get("rlm-mcp.owner", "").split(":")[1:2] == [str(server_pid)])
        return DockerMemoryWatch(owned)
    if sandbox == "daytona-emulator":  # emulated sandboxes are processes of this runner
        return ProcessTreeWatch(os.getpid(), marker="worker.py")
    return ProcessTreeWatch(server_pid, marker="worker.py")


def trajectory_bytes(path: str | None, run_id: str) -> int | None:
    """Bytes of a run's JSONL files: its own and its child runs' (named after its run id)."""
    if not path:
        return None
    return sum(p.stat().st_size for p in Path(path).parent.glob(f"{run_id}*") if p.is_file())


# ----- driver processes (rlm-mcp Python API, reference) ------------------------------------------


def run_driver(session: Session, task: Task, system: str, command: list[str], env: dict[str, str],
               watch: ProcessTreeWatch | DockerMemoryWatch | None, sandbox_method: str | None,
               process_label: str) -> None:
    """Drive one driver process through the JSON-lines protocol of bench.common.DriverProcess."""
    repeats: list[dict[str, Any]] = []
    load_s = peak = first_call_s = None
    driver = DriverProcess(command, env=env, cwd=str(session.work))
    try:
        with watch if watch is not None else contextlib.nullcontext():
            if isinstance(watch, ProcessTreeWatch):
                watch.root_pid = driver.pid
            while True:
                event = driver.next_event(DRIVER_TIMEOUT_S)
                kind = event.get("event")
                if kind == "loaded":
                    load_s = event.get("load_s")
                elif kind == "warmup":
                    session.model.script("warmup", ["FINAL(ok)"])
                    driver.go()
                elif kind == "warmed":
                    first_call_s = event.get("first_call_s")
                elif kind == "ready":
                    session.model.reset_stats()
                    driver.go()
                elif kind == "result":
                    answer = (event.get("answer") or "").strip()
                    rep = {"ok": bool(event.get("ok")), "wall_s": event.get("wall_s"), "answer": answer,
                           "correct": answer == task.expected, "error": event.get("error"),
                           "trajectory_bytes": event.get("trajectory_bytes"),
                           "subcall_errors": event.get("subcall_errors"),
                           "subcall_error_sample": event.get("subcall_error_sample"), **session.stats()}
                    if event.get("load_s") is not None:
                        load_s = event["load_s"]
                        rep["load_s"] = event["load_s"]
                    if event.get("trace") and not event.get("ok"):
                        log.debug("driver trace:\n%s", event["trace"])
                    repeats.append(rep)
                elif kind == "done":
                    peak = (event.get("vmhwm_kb") or 0) / 1024 or None
                    break
    except Exception as exc:
        repeats.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        driver.close()
    session.record(task, system, repeats, load_s=load_s, first_call_s=first_call_s, process_peak_mb=peak,
                   process_label=process_label,
                   sandbox_peak_mb=(watch.peak_mb if watch is not None else None),
                   sandboxes_seen=(watch.count if watch is not None else 0),
                   sandbox_memory_method=sandbox_method)


def run_api(session: Session, task: Task) -> None:
    home = Path(tempfile.mkdtemp(prefix="home-", dir=session.work))
    spec = {"api_base": session.model.api_base, "model": f"openai/{task.policy}", "sandbox": "local",
            "home": str(home), "context_path": str(task.context_path) if task.context_path else None,
            "documents_dir": str(task.documents_dir) if task.documents_dir else None, "query": task.query,
            "max_depth": task.max_depth, "repeats": task.repeats}
    spec_path = session.work / f"api-{task.name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "RLM_MCP_LOG_LEVEL": "WARNING", "PYTHONPATH": str(common.REPO)}
    try:
        run_driver(session, task, "rlm-mcp-api/local", [sys.executable, "-m", "bench.engine_driver", str(spec_path)],
                   env, ProcessTreeWatch(0, marker="worker.py"), MEM_LOCAL, "driver VmHWM")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_reference(session: Session, task: Task, environment: str) -> None:
    system = f"reference/{environment}"
    if system in session.unavailable:
        session.skip(task.name, system, session.unavailable[system], task.size_note)
        return
    logs = Path(tempfile.mkdtemp(prefix="ref-logs-", dir=session.work))
    workspace = Path(tempfile.mkdtemp(prefix="ref-ws-", dir=session.work))
    spec = {"mode": "task", "base_url": session.model.api_base, "api_key": "sk-bench", "model": task.policy,
            "environment": environment, "image": reference.IMAGE, "query": task.query,
            "context_path": str(task.context_path) if task.context_path else None,
            "documents_dir": str(task.documents_dir) if task.documents_dir else None,
            "max_depth": task.max_depth, "repeats": task.repeats, "log_dir": str(logs),
            "workspace_dir": str(workspace)}
    spec_path = session.work / f"ref-{task.name}-{environment}.json"
    spec_path.write_text(json.dumps(spec))
    watch = None
    method = MEM_INPROC
    if environment == "docker":
        watch = DockerMemoryWatch(lambda c: c.attrs.get("Config", {}).get("Image") == reference.IMAGE)
        method = MEM_DOCKER
    try:
        run_driver(session, task, system, reference.driver_command(spec_path), reference.driver_env(), watch,
                   method, "driver VmHWM")
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(workspace, ignore_errors=True)
