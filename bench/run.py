"""Benchmark suite: rlm-mcp and the reference RLM implementation (PyPI ``rlms``), side by side.

One command runs every scenario against one scripted OpenAI-compatible model server (started
here on 127.0.0.1, 50 ms per call by default) and writes ``bench/results/latest.md`` and
``latest.json`` plus dated copies::

    python -m bench                       # everything (~20 min on 2 cores)
    python -m bench --quick               # small sizes, 1 repeat (~3 min)
    python -m bench --scenarios needle-1mb,micro-initialize --repeats 2
    python -m bench --systems rlm-mcp --no-reference

Systems: ``rlm-mcp/<sandbox>`` is the ``rlm-mcp`` command over stdio driven by the MCP SDK client
(rlm_load_context once, then rlm_complete per repeat); ``rlm-mcp-api/local`` is the Python API
(ContextStore + RlmEngine) in its own process, to isolate engine overhead from MCP;
``reference/<env>`` is ``rlm.RLM(...).completion()`` in the reference's own virtualenv. Every
server/driver process is fresh per scenario and serves all repeats of it. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, reference  # noqa: E402
from bench.common import MB, DockerMemoryWatch, DriverProcess, ProcessTreeWatch, spread  # noqa: E402
from bench.mcp_client import McpServer, server_env, time_to_initialize  # noqa: E402
from rlm_mcp.testing.model_server import ScriptedModelServer  # noqa: E402

log = logging.getLogger("bench")

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
QUERY = "What is the secret code hidden in the context? Answer with the code only."
COUNT_QUERY = "How many secret codes appear across all the documents? Answer with a number."
FANOUT = 256
DRIVER_TIMEOUT_S = 900.0

TASK_SCENARIOS = ("needle-1mb", "needle-10mb", "needle-100mb", "docs-1000", "recursive-depth2")
MICRO_SCENARIOS = ("micro-initialize", "micro-sandbox", "micro-subcall", "micro-fanout", "micro-load-1gb")
ALL_SCENARIOS = TASK_SCENARIOS + MICRO_SCENARIOS
SYSTEMS = ("rlm-mcp/local", "rlm-mcp/docker", "rlm-mcp/daytona-emulator", "rlm-mcp-api/local",
           "reference/local", "reference/docker")

MEM_LOCAL = "worker VmHWM (/proc poll)"
MEM_DOCKER = "container max_usage (cgroup)"
MEM_INPROC = "in the process (local REPL)"


@dataclass
class Task:
    name: str
    policy: str
    query: str
    expected: str
    context_path: Path | None = None
    documents_dir: Path | None = None
    max_depth: int = 1
    size_note: str = ""
    systems: tuple[str, ...] = SYSTEMS
    repeats: int = 3


@dataclass
class Bench:
    args: argparse.Namespace
    model: ScriptedModelServer
    work: Path
    machine: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    micro: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # system -> reason
    emulator: Any = None

    # ----- helpers ---------------------------------------------------------------------------

    def wants_system(self, system: str) -> bool:
        if system.startswith("reference") and not self.args.reference:
            return False
        return not self.args.systems or any(system.startswith(s) for s in self.args.systems)

    def stats(self) -> dict[str, int]:
        s = self.model.stats
        return {"model_calls": s.calls, "root_calls": s.root_calls, "sub_calls": s.sub_calls,
                "max_in_flight": s.max_in_flight, "prompt_chars": s.prompt_chars}

    def record(self, task: Task, system: str, repeats: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        ok = [r for r in repeats if r.get("ok")]
        rec = {
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

    # ----- rlm-mcp over MCP ------------------------------------------------------------------

    async def run_mcp(self, task: Task, sandbox: str) -> None:
        system = f"rlm-mcp/{sandbox}"
        home = Path(tempfile.mkdtemp(prefix="home-", dir=self.work))
        extra: dict[str, str] = {}
        if sandbox == "daytona-emulator":
            extra = {"DAYTONA_API_URL": self.emulator.api_url, "DAYTONA_API_KEY": "bench",
                     "RLM_MCP_DAYTONA_SNAPSHOT": "rlm-mcp-sandbox"}
        env = server_env(self.model.api_base, home, model=f"openai/{task.policy}", **extra)
        server = McpServer(env)
        repeats: list[dict[str, Any]] = []
        load_s = first_call_s = None
        peak = None
        watch: Any = None
        try:
            async with server.running():
                assert server.pid is not None, "could not find the rlm-mcp server process"
                watch = self._sandbox_watch(sandbox, server.pid)
                with watch:
                    first_call_s = await self.warm_up(server, sandbox)
                    began = time.perf_counter()
                    path = task.context_path or task.documents_dir
                    info = await server.call("rlm_load_context", path=str(path))
                    load_s = time.perf_counter() - began
                    for _ in range(task.repeats):
                        self.model.reset_stats()
                        began = time.perf_counter()
                        try:
                            result = await asyncio.wait_for(server.complete(
                                query=task.query, handle=info["handle"],
                                sandbox="daytona" if sandbox == "daytona-emulator" else sandbox,
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
                                        "trajectory_bytes": _trajectory_bytes(result.get("trajectory_path"),
                                                                              result["run_id"]),
                                        **self.stats()})
                    peak = server.peak_mb()
        except Exception as exc:
            log.debug("mcp run failed", exc_info=True)
            repeats.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            shutil.rmtree(home, ignore_errors=True)
        self.record(task, system, repeats, load_s=load_s, first_call_s=first_call_s, process_peak_mb=peak,
                    process_label="server VmHWM",
                    sandbox_peak_mb=watch.peak_mb if watch else None, sandboxes_seen=watch.count if watch else 0,
                    sandbox_memory_method=MEM_DOCKER if sandbox == "docker" else MEM_LOCAL)

    async def warm_up(self, server: McpServer, sandbox: str) -> float:
        """One trivial run (one root call answering FINAL) before the timed repeats: the server
        imports litellm and connects its sandbox backend on first use, as the reference driver
        has imported its modules before its timed calls. Returns that first call's seconds."""
        self.model.script("warmup", ["FINAL(ok)"])
        began = time.perf_counter()
        result = await server.complete(query="warm up", context="x", model="openai/warmup",
                                       sandbox="daytona" if sandbox == "daytona-emulator" else sandbox)
        if result["status"] != "completed":
            raise RuntimeError(f"warm-up run ended {result['status']}: {result.get('error')}")
        return time.perf_counter() - began

    def _sandbox_watch(self, sandbox: str, server_pid: int) -> Any:
        if sandbox == "docker":
            def owned(container: Any) -> bool:
                return container.labels.get("rlm-mcp.owner", "").split(":")[1:2] == [str(server_pid)]
            return DockerMemoryWatch(owned)
        if sandbox == "daytona-emulator":  # emulated sandboxes are processes of this runner
            return ProcessTreeWatch(os.getpid(), marker="worker.py")
        return ProcessTreeWatch(server_pid, marker="worker.py")

    # ----- drivers (rlm-mcp Python API, reference) ---------------------------------------------

    def run_driver(self, task: Task, system: str, command: list[str], env: dict[str, str],
                   watch: Any, sandbox_method: str | None, process_label: str) -> None:
        repeats: list[dict[str, Any]] = []
        load_s = peak = first_call_s = None
        driver = DriverProcess(command, env=env, cwd=str(self.work))
        done = 0
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
                        self.model.script("warmup", ["FINAL(ok)"])
                        driver.go()
                    elif kind == "warmed":
                        first_call_s = event.get("first_call_s")
                    elif kind == "ready":
                        self.model.reset_stats()
                        driver.go()
                    elif kind == "result":
                        done += 1
                        answer = (event.get("answer") or "").strip()
                        rep = {"ok": bool(event.get("ok")), "wall_s": event.get("wall_s"), "answer": answer,
                               "correct": answer == task.expected, "error": event.get("error"),
                               "trajectory_bytes": event.get("trajectory_bytes"),
                               "subcall_errors": event.get("subcall_errors"),
                               "subcall_error_sample": event.get("subcall_error_sample"), **self.stats()}
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
        self.record(task, system, repeats, load_s=load_s, first_call_s=first_call_s, process_peak_mb=peak,
                    process_label=process_label,
                     sandbox_peak_mb=(watch.peak_mb if watch is not None else None),
                     sandboxes_seen=(watch.count if watch is not None else 0),
                     sandbox_memory_method=sandbox_method)

    def run_api(self, task: Task) -> None:
        home = Path(tempfile.mkdtemp(prefix="home-", dir=self.work))
        spec = {"api_base": self.model.api_base, "model": f"openai/{task.policy}", "sandbox": "local",
                "home": str(home), "context_path": str(task.context_path) if task.context_path else None,
                "documents_dir": str(task.documents_dir) if task.documents_dir else None, "query": task.query,
                "max_depth": task.max_depth, "repeats": task.repeats}
        spec_path = self.work / f"api-{task.name}.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "RLM_MCP_LOG_LEVEL": "WARNING"}
        try:
            self.run_driver(task, "rlm-mcp-api/local", [sys.executable, "-m", "bench.engine_driver", str(spec_path)],
                            {**env, "PYTHONPATH": str(common.REPO)}, ProcessTreeWatch(0, marker="worker.py"),
                            MEM_LOCAL, "driver VmHWM")
        finally:
            shutil.rmtree(home, ignore_errors=True)

    def run_reference(self, task: Task, environment: str) -> None:
        system = f"reference/{environment}"
        if system in self.unavailable:
            self.skip(task.name, system, self.unavailable[system], task.size_note)
            return
        logs = Path(tempfile.mkdtemp(prefix="ref-logs-", dir=self.work))
        workspace = Path(tempfile.mkdtemp(prefix="ref-ws-", dir=self.work))
        spec = {"mode": "task", "base_url": self.model.api_base, "api_key": "sk-bench", "model": task.policy,
                "environment": environment, "image": reference.IMAGE, "query": task.query,
                "context_path": str(task.context_path) if task.context_path else None,
                "documents_dir": str(task.documents_dir) if task.documents_dir else None,
                "max_depth": task.max_depth, "repeats": task.repeats, "log_dir": str(logs),
                "workspace_dir": str(workspace)}
        spec_path = self.work / f"ref-{task.name}-{environment}.json"
        spec_path.write_text(json.dumps(spec))
        watch = None
        method = MEM_INPROC
        if environment == "docker":
            watch = DockerMemoryWatch(lambda c: c.attrs.get("Config", {}).get("Image") == reference.IMAGE)
            method = MEM_DOCKER
        try:
            self.run_driver(task, system, reference.driver_command(spec_path), reference.driver_env(), watch,
                            method, "driver VmHWM")
        finally:
            shutil.rmtree(logs, ignore_errors=True)
            shutil.rmtree(workspace, ignore_errors=True)

    # ----- scenarios -------------------------------------------------------------------------

    async def run_task(self, task: Task) -> None:
        log.info("scenario %s%s", task.name, f" ({task.size_note})" if task.size_note else "")
        for system in task.systems:
            if not self.wants_system(system):
                continue
            if system in self.unavailable:
                self.skip(task.name, system, self.unavailable[system], task.size_note)
                continue
            kind, _, where = system.partition("/")
            if kind == "rlm-mcp":
                await self.run_mcp(task, where)
            elif kind == "rlm-mcp-api":
                await asyncio.to_thread(self.run_api, task)
            else:
                await asyncio.to_thread(self.run_reference, task, where)

    async def micro_initialize(self) -> None:
        n = 2 if self.args.quick else 5
        home = Path(tempfile.mkdtemp(prefix="home-", dir=self.work))
        env = server_env(self.model.api_base, home)
        times = []
        for _ in range(n):
            times.append(await asyncio.to_thread(time_to_initialize, env))
        s = spread(times)
        self.micro.append({"micro": "server start to initialize result (stdio)", "system": "rlm-mcp",
                           "value": s, "unit": "s", "detail": f"{n} process starts, raw JSON-RPC initialize"})
        firsts = []
        for _ in range(n):
            server = McpServer(env)
            async with server.running():
                firsts.append(await self.warm_up(server, "local"))
        self.micro.append({"micro": "first rlm_complete on a fresh server (trivial task, local sandbox)",
                           "system": "rlm-mcp", "value": spread(firsts), "unit": "s",
                           "detail": "includes the lazy litellm import and a sandbox start; later calls skip the "
                                     "import (timed scenarios run one such warm-up call first)"})
        shutil.rmtree(home, ignore_errors=True)

    async def micro_sandbox(self) -> None:
        from bench import daytona_micro  # colleagues' micro-benchmark: measure() works for any provider
        from rlm_mcp.config import Settings
        from rlm_mcp.sandbox import ContextFile
        from rlm_mcp.sandbox.local import LocalProvider

        cells, starts = (10, 2) if self.args.quick else (30, 5)
        path = self.work / "micro-context.txt"
        path.write_text("lorem ipsum " * 100_000, encoding="utf-8")  # 1.2 MB, as daytona_micro uses
        context = ContextFile(path, "text")
        providers: list[tuple[str, Any]] = []
        if self.wants_system("rlm-mcp/local"):
            providers.append(("rlm-mcp/local", LocalProvider(Settings())))
        docker_ok = self.wants_system("rlm-mcp/docker") and "rlm-mcp/docker" not in self.unavailable
        if self.wants_system("rlm-mcp/daytona") and self.emulator is not None:
            from rlm_mcp.sandbox.daytona import DaytonaProvider
            providers.append(("rlm-mcp/daytona-emulator", DaytonaProvider(Settings(
                daytona_api_url=self.emulator.api_url, daytona_api_key="bench", daytona_snapshot="rlm-mcp-sandbox"))))
        for name, provider in providers:
            try:
                r = await daytona_micro.measure(provider, context, cells, starts)
                self._micro_sandbox_rows(name, r, cells, starts)
            except Exception as exc:
                self.micro.append({"micro": "sandbox", "system": name, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                await provider.aclose()
        if docker_ok:
            await self._micro_docker(cells, starts)
        for environment in ("local", "docker"):
            system = f"reference/{environment}"
            if not self.wants_system(system):
                continue
            if system in self.unavailable:
                self.micro.append({"micro": "sandbox", "system": system, "error": self.unavailable[system]})
                continue
            await asyncio.to_thread(self._reference_micro, environment, cells if environment == "local" else 10,
                                    starts if environment == "local" else 2)

    def _micro_sandbox_rows(self, name: str, r: dict[str, float], cells: int, starts: int) -> None:
        detail = f"median of {starts} starts / {cells} cells; 1.2 MB context"
        self.micro.append({"micro": "sandbox start", "system": name, "value": r["start_s"], "unit": "s",
                           "detail": detail})
        self.micro.append({"micro": "per-cell overhead (empty cell)", "system": name, "value": r["cell_ms"],
                           "unit": "ms", "detail": detail})
        self.micro.append({"micro": "llm_query round trip, sandbox level (cell with one call minus empty cell)",
                           "system": name, "value": r["llm_query_rtt_ms"], "unit": "ms",
                           "detail": detail + ("; an in-process handler answers at once (no model client)"
                                               if name.startswith("rlm-mcp")
                                               else "; its LM handler and OpenAI client to the model server at 0 ms")})
        if "batched_100_ms" in r:
            self.micro.append({"micro": "llm_query_batched of 100, instant handler", "system": name,
                               "value": r["batched_100_ms"], "unit": "ms", "detail": detail})

    async def _micro_docker(self, cells: int, starts: int) -> None:
        from bench import docker_micro  # colleagues' Docker micro-benchmark: cold, warm pool, cell, llm_query

        home = Path(tempfile.mkdtemp(prefix="docker-micro-", dir=self.work))
        try:
            r = await docker_micro.measure(starts, cells, cells, home)
        except Exception as exc:
            self.micro.append({"micro": "sandbox", "system": "rlm-mcp/docker", "error": f"{type(exc).__name__}: {exc}"})
            return
        finally:
            shutil.rmtree(home, ignore_errors=True)
        detail = f"bench/docker_micro.py: median of {starts} starts / {cells} cells; 1.2 MB context"
        rows = [("sandbox start", "rlm-mcp/docker (cold)", r["cold_start_s"], "s"),
                ("sandbox start", "rlm-mcp/docker (warm pool)", r["warm_take_s"], "s"),
                ("per-cell overhead (empty cell)", "rlm-mcp/docker", r["per_cell_s"] * 1000, "ms"),
                ("llm_query round trip, sandbox level (timed inside the cell)", "rlm-mcp/docker",
                 r["llm_query_round_trip_s"] * 1000, "ms")]
        for micro, system, value, unit in rows:
            self.micro.append({"micro": micro, "system": system, "value": value, "unit": unit,
                               "detail": detail + ("; an in-process handler answers at once" if "llm" in micro else "")})

    def _reference_micro(self, environment: str, cells: int, starts: int) -> None:
        workspace = Path(tempfile.mkdtemp(prefix="ref-ws-", dir=self.work))
        spec = {"mode": "micro", "base_url": self.model.api_base, "api_key": "sk-bench", "model": "micro",
                "environment": environment, "image": reference.IMAGE, "cells": cells, "starts": starts,
                "workspace_dir": str(workspace)}
        spec_path = self.work / f"ref-micro-{environment}.json"
        spec_path.write_text(json.dumps(spec))
        driver = DriverProcess(reference.driver_command(spec_path), env=reference.driver_env(), cwd=str(self.work))
        system = f"reference/{environment}"
        saved, self.model.latency_s = self.model.latency_s, 0.0  # its llm_query goes to the model server
        try:
            while True:
                event = driver.next_event(DRIVER_TIMEOUT_S)
                if event["event"] == "ready":
                    driver.go()
                elif event["event"] == "result":
                    if event.get("ok"):
                        self._micro_sandbox_rows(system, event, cells, starts)
                    else:
                        self.micro.append({"micro": "sandbox", "system": system, "error": event.get("error")})
                elif event["event"] == "done":
                    break
        except Exception as exc:
            self.micro.append({"micro": "sandbox", "system": system, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            self.model.latency_s = saved
            driver.close()
            shutil.rmtree(workspace, ignore_errors=True)

    async def _scripted(self, name: str, policy: str, reply: str, systems: tuple[str, ...],
                        latency_s: float | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Run one scripted root reply (a single cell) on each system; (system, repeat) pairs."""
        task = Task(name, policy, name, "", repeats=1)
        tiny = self.work / f"{name}-context.txt"
        tiny.write_text("x", encoding="utf-8")
        task.context_path = tiny
        out = []
        saved = self.model.latency_s
        try:
            if latency_s is not None:
                self.model.latency_s = latency_s
            for system in systems:
                if not self.wants_system(system) or system in self.unavailable:
                    continue
                self.model.script(policy, [reply])
                before = len(self.records)
                kind, _, where = system.partition("/")
                if kind == "rlm-mcp":
                    await self.run_mcp(task, where)
                else:
                    await asyncio.to_thread(self.run_reference, task, where)
                rec = self.records.pop(before)  # reported as a micro figure, not a task row
                rep = rec["repeats"][0] if rec["repeats"] else {"error": rec.get("skipped") or "no result"}
                out.append((system, rep))
        finally:
            self.model.latency_s = saved
        return out

    async def micro_fanout(self) -> None:
        """One cell asking llm_query_batched for FANOUT tiny prompts: how many are in flight."""
        reply = ("```repl\nr = llm_query_batched(['ping %d' % i for i in range(" + str(FANOUT) + ")])\n"
                 "answer['content'] = str(len(r))\nanswer['ready'] = True\n```")
        for system, rep in await self._scripted("micro-fanout", "fanout", reply, ("rlm-mcp/local", "reference/local")):
            ok = rep.get("wall_s") is not None and rep.get("answer") == str(FANOUT)
            self.micro.append({"micro": f"most sub-calls in flight ({FANOUT} prompts in one llm_query_batched, "
                                        f"{self.args.latency_ms:g} ms each)", "system": system,
                               "value": rep.get("max_in_flight") if ok else None, "unit": "calls",
                               "detail": (f"whole run {rep['wall_s']:.2f} s, {rep.get('sub_calls')} sub-calls"
                                          if ok else _cell(rep.get("error") or f"answer {rep.get('answer')!r}"))})

    async def micro_subcall(self) -> None:
        """20 sequential llm_query calls timed inside the cell, model answering at once: the whole
        sub-call path (sandbox -> host -> model client -> HTTP -> back) per call."""
        reply = ("```repl\nimport time\nt = time.perf_counter()\nfor i in range(20):\n    r = llm_query('ping')\n"
                 "answer['content'] = '%.3f' % ((time.perf_counter() - t) / 20 * 1000)\nanswer['ready'] = True\n```")
        systems = ("rlm-mcp/local", "rlm-mcp/docker", "reference/local", "reference/docker")
        for system, rep in await self._scripted("micro-subcall", "rtt", reply, systems, latency_s=0.0):
            try:
                value = float(rep.get("answer") or "")
            except ValueError:
                value = None
            self.micro.append({"micro": "llm_query round trip end to end (model server at 0 ms)", "system": system,
                               "value": value, "unit": "ms",
                               "detail": "mean of 20 sequential llm_query calls timed inside one cell: sandbox to "
                                         "host, model client, HTTP to the model server and back" if value is not None
                               else _cell(rep.get("error") or f"answer {rep.get('answer')!r}")})

    async def micro_load(self) -> None:
        from bench.store_micro import generate  # colleagues' generator: varied UTF-8 text with \r\n

        size_mb = 64 if self.args.quick else 1024
        source = self.work / "load-source.txt"
        await asyncio.to_thread(generate, source, size_mb)
        home = Path(tempfile.mkdtemp(prefix="home-", dir=self.work))
        server = McpServer(server_env(self.model.api_base, home))
        try:
            async with server.running():
                before = server.peak_mb()
                began = time.perf_counter()
                info = await server.call("rlm_load_context", path=str(source))
                elapsed = time.perf_counter() - began
                after = server.peak_mb()
            self.micro.append({"micro": f"rlm_load_context throughput ({size_mb:,} MB file"
                                        + (", quick mode: 1 GB in the full run)" if self.args.quick else ")"),
                               "system": "rlm-mcp", "value": info["bytes"] / MB / elapsed, "unit": "MB/s",
                               "detail": f"{elapsed:.2f} s over MCP; server VmHWM {before:.0f} MB before, "
                                         f"{after:.0f} MB after (growth {after - before:.0f} MB)"})
        except Exception as exc:
            self.micro.append({"micro": "rlm_load_context throughput", "system": "rlm-mcp",
                               "error": f"{type(exc).__name__}: {exc}"})
        finally:
            shutil.rmtree(home, ignore_errors=True)
            source.unlink(missing_ok=True)


# ----- tasks and data ------------------------------------------------------------------------------


def build_tasks(args: argparse.Namespace, work: Path) -> list[Task]:
    small, big = args.repeats or 3, args.repeats or 2
    if args.quick:
        small = big = args.repeats or 1
    tasks: list[Task] = []
    sizes = {"needle-1mb": 1, "needle-10mb": 10, "needle-100mb": 100}
    for name, size in sizes.items():
        if not selected(args, name) or (args.quick and size > 1 and not named(args, name)):
            continue  # quick mode: the 1 MB needle only, unless a bigger one is asked for by name
        actual = size
        path = work / f"{name}.txt"
        code = f"NDL-{size}M-7Q"
        common.write_haystack(path, actual * MB, code)
        note = f"{actual} MB"
        repeats = big if size >= 100 else small
        task = Task(name, "needle", QUERY, code, context_path=path, size_note=note, repeats=repeats)
        if size >= 100 and not args.quick and not args.repeats:
            task.repeats = 2
        tasks.append(task)
    if selected(args, "docs-1000"):
        count = 100 if args.quick else 1000
        directory = work / "docs"
        needles = common.write_documents(directory, count)
        tasks.append(Task("docs-1000", "count", COUNT_QUERY, str(needles), documents_dir=directory,
                          size_note=f"{count:,} files" + (" (quick mode; 1,000 in the full run)" if args.quick else ""),
                          systems=("rlm-mcp/local", "reference/local"), repeats=small))
    if selected(args, "recursive-depth2"):
        size = 1 if args.quick else 2
        path = work / "recursive.txt"
        common.write_haystack(path, size * MB, "DEEP-2R")
        tasks.append(Task("recursive-depth2", "recursive", QUERY, "DEEP-2R", context_path=path, max_depth=2,
                          size_note=f"{size} MB, max_depth=2", systems=("rlm-mcp/local", "reference/local"),
                          repeats=small))
    return tasks


def selected(args: argparse.Namespace, name: str) -> bool:
    return not args.scenarios or any(name == s or name.startswith(s) for s in args.scenarios)


def named(args: argparse.Namespace, name: str) -> bool:
    return bool(args.scenarios) and name in args.scenarios


# ----- report ----------------------------------------------------------------------------------------


def _median(values: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _trajectory_bytes(path: str | None, run_id: str) -> int | None:
    if not path:
        return None
    return sum(p.stat().st_size for p in Path(path).parent.glob(f"{run_id}*") if p.is_file())


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= MB:
        return f"{n / MB:.1f} MB"
    return f"{n / 1024:.1f} KB"


def _num(n: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if n is None else fmt.format(n)


def find(records: list[dict[str, Any]], scenario: str, system: str) -> dict[str, Any] | None:
    return next((r for r in records if r["scenario"] == scenario and r["system"] == system and r.get("wall_s")), None)


def targets(records: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    needle = next((n for n in ("needle-100mb", "needle-10mb", "needle-1mb")
                   if any(r["scenario"] == n for r in records)), None)

    def add(name: str, mine: dict | None, ref: dict | None, key: str, limit: float, what: str, fmt: str,
            compare: str = "ratio") -> None:
        row: dict[str, Any] = {"target": name, "limit": limit, "compare": compare}
        if mine is None or ref is None:
            missing = [label for label, rec, sys_ in (("rlm-mcp", mine, None), ("reference", ref, None)) if rec is None]
            row.update(verdict="NOT MEASURED", detail=f"no result for {' and '.join(missing)}")
        else:
            a, b = _pick(mine, key), _pick(ref, key)
            broken = [(label, rec) for label, rec in (("rlm-mcp", mine), ("reference", ref)) if rec.get("subcall_errors")]
            holds_anyway = (a is not None and b and [label for label, _ in broken] == ["reference"]
                            and a / b <= limit)  # the reference did less work and still used more
            if broken and key in ("prompt_chars", "trajectory_bytes", "wall_median") and not holds_anyway:
                label, rec = broken[0]
                row.update(verdict="NOT COMPARABLE", mine=a, reference=b,
                           detail=f"{fmt.format(a)} vs {fmt.format(b)}, but {label} did less work: up to "
                                  f"{rec['subcall_errors']} sub-calls per run failed ({rec['subcall_error_sample']})")
            elif a is None or b is None or not b:
                row.update(verdict="NOT MEASURED", detail=f"{what} missing")
            else:
                ratio = a / b
                passed = ratio <= limit
                row.update(mine=a, reference=b, ratio=ratio, verdict="PASS" if passed else "FAIL",
                           detail=f"{fmt.format(a)} vs {fmt.format(b)} = {ratio:.3f}x (limit {limit:g}x)"
                           + (" although the reference's run had failed sub-calls" if broken else ""))
        out.append(row)

    if needle:
        label = needle + (" (quick mode)" if quick else "")
        add(f"{label}: rlm-mcp local time <= 0.25x reference local", find(records, needle, "rlm-mcp/local"),
            find(records, needle, "reference/local"), "wall_median", 0.25, "median wall time", "{:.2f} s")
        add(f"{label}: rlm-mcp docker time <= 0.1x reference docker", find(records, needle, "rlm-mcp/docker"),
            find(records, needle, "reference/docker"), "wall_median", 0.1, "median wall time", "{:.2f} s")
        add(f"{label}: server peak memory (local sandbox) <= 0.3x reference process peak (local)",
            find(records, needle, "rlm-mcp/local"), find(records, needle, "reference/local"), "process_peak_mb",
            0.3, "peak memory", "{:.0f} MB")
        add(f"{label}: server peak memory (docker sandbox) <= 0.3x reference process peak (docker)",
            find(records, needle, "rlm-mcp/docker"), find(records, needle, "reference/docker"), "process_peak_mb",
            0.3, "peak memory", "{:.0f} MB")
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        for env in ("local", "docker"):
            mine, ref = find(records, scenario, f"rlm-mcp/{env}"), find(records, scenario, f"reference/{env}")
            if mine is None and ref is None:
                continue
            add(f"{scenario} ({env}): trajectory size <= 0.1x reference", mine, ref, "trajectory_bytes", 0.1,
                "trajectory size", "{:,.0f} B")
            add(f"{scenario} ({env}): prompt chars <= reference (same policy)", mine, ref, "prompt_chars", 1.0,
                "prompt characters", "{:,.0f}", compare="<=")
    return out


def _pick(rec: dict[str, Any], key: str) -> float | None:
    if key == "wall_median":
        return rec["wall_s"]["median"] if rec.get("wall_s") else None
    return rec.get(key)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# rlm-mcp vs reference RLM (`rlms` {report['machine'].get('rlms_version') or '-'}) benchmark",
             "", f"Run {report['started_at']} in {report['duration_s'] / 60:.1f} min: `{report['command']}`", "",
             f"Machine: {common.machine_line(report['machine'])}", "",
             f"Model: scripted OpenAI-compatible server on 127.0.0.1, {report['config']['latency_ms']:g} ms per call. "
             "Wall time: rlm-mcp = `rlm_complete` call to finished result over MCP (context loaded once before, "
             "load time in its own column); API = `RlmEngine.run`; reference = `RLM.completion()` (reading the "
             "file into a Python object timed apart as its load).", "",
             "## Scenarios", "",
             "| scenario | system | n | wall s min / median / max | vs ref (median) | load s | process peak MB | "
             "sandbox peak MB | sub-calls | most in flight | prompt chars | trajectory | correct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    records = report["scenarios"]
    for rec in records:
        name = rec["scenario"] + (f" ({rec['size_note']})" if rec.get("size_note") else "")
        if rec.get("skipped"):
            lines.append(f"| {name} | {rec['system']} | 0 | {rec['system'].split('/')[0]} cannot run: "
                         f"{rec['skipped']} | | | | | | | | | |")
            continue
        wall = rec.get("wall_s")
        if not wall:
            lines.append(f"| {name} | {rec['system']} | {rec['n']} | FAILED: {_cell(rec.get('error'))} "
                         "| | | | | | | | | |")
            continue
        env = rec["system"].split("/", 1)[1]
        ref = find(records, rec["scenario"], f"reference/{env}") if not rec["system"].startswith("reference") else None
        vs = f"{wall['median'] / ref['wall_s']['median']:.3f}x" if ref else "-"
        sandbox = "in process" if rec.get("sandbox_memory_method") == MEM_INPROC else _num(rec.get("sandbox_peak_mb"))
        if rec.get("sandbox_memory_method") == MEM_DOCKER and rec.get("sandbox_peak_mb") is not None:
            sandbox += " (cgroup)"
        lines.append(
            f"| {name} | {rec['system']} | {rec['n']} | {wall['min']:.2f} / {wall['median']:.2f} / {wall['max']:.2f} "
            f"| {vs} | {_num(rec.get('load_s'), '{:.2f}')} | {_num(rec.get('process_peak_mb'))} | {sandbox} "
            f"| {_num(rec.get('subcalls'))} | {_num(rec.get('max_in_flight'))} | {_num(rec.get('prompt_chars'))} "
            f"| {_size(rec.get('trajectory_bytes'))} | {rec['correct']}/{rec['n']}"
            + (f" ({_cell(rec['error'])})" if rec.get("error") else "")
            + (f"; up to {rec['subcall_errors']} failed sub-calls per run: {_cell(rec['subcall_error_sample'])[:120]}"
               if rec.get("subcall_errors") else "") + " |")
    lines += ["", "## Targets (ratios measured in this run)", "", "| target | measured | verdict |", "|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['detail']} | **{t['verdict']}** |")
    lines += ["", "## Micro-benchmarks", "", "| measurement | system | value | detail |", "|---|---|---|---|"]
    for m in report["micro"]:
        if m.get("error"):
            lines.append(f"| {m['micro']} | {m['system']} | cannot run | {_cell(m['error'])} |")
            continue
        value = m["value"]
        if isinstance(value, dict):
            shown = f"{value['min']:.2f} / {value['median']:.2f} / {value['max']:.2f} {m['unit']} (min/med/max)"
        elif value is None:
            shown = "-"
        else:
            digits = 3 if m["unit"] == "s" else 2
            shown = f"{value:,.{digits}f} {m['unit']}" if m["unit"] != "calls" else f"{value:,} {m['unit']}"
        lines.append(f"| {m['micro']} | {m['system']} | {shown} | {_cell(m.get('detail', ''))} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _cell(text: Any) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")[:300]


# ----- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small work (1 MB needle only unless named, 100 documents, 64 MB load) and 1 repeat")
    parser.add_argument("--scenarios", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help=f"comma-separated names or prefixes of: {', '.join(ALL_SCENARIOS)}")
    parser.add_argument("--systems", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help=f"comma-separated names or prefixes of: {', '.join(SYSTEMS)}")
    parser.add_argument("--repeats", type=int, help="repeats per scenario (default 3; 2 for 100 MB; quick 1)")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the reference implementation (no venv install)")
    parser.add_argument("--reinstall-reference", action="store_true", help="recreate bench/.venv-reference")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="model server latency per call")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    parser.add_argument("--work-dir", type=Path, help="where test data goes (default: a temporary directory)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    info = common.machine()
    work = Path(tempfile.mkdtemp(prefix="rlm-bench-", dir=args.work_dir))
    notes: list[str] = []
    model = ScriptedModelServer(latency_s=args.latency_ms / 1000)
    bench = Bench(args, model, work, info, notes=notes)
    try:
        with model:
            await setup(bench)
            tasks = build_tasks(args, work)
            for task in tasks:
                await bench.run_task(task)
            for name, fn in (("micro-initialize", bench.micro_initialize), ("micro-sandbox", bench.micro_sandbox),
                             ("micro-subcall", bench.micro_subcall), ("micro-fanout", bench.micro_fanout),
                             ("micro-load-1gb", bench.micro_load)):
                if selected(args, name):
                    log.info("scenario %s", name)
                    try:
                        await fn()
                    except Exception as exc:
                        log.error("%s failed: %s", name, exc)
                        log.debug("%s", traceback.format_exc())
                        bench.micro.append({"micro": name, "system": "-", "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if bench.emulator is not None:
            bench.emulator.stop()
        shutil.rmtree(work, ignore_errors=True)
    info["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    notes.extend(standing_notes(args, bench))
    return {"started_at": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "duration_s": time.time() - started, "command": "python -m bench " + " ".join(sys.argv[1:]),
            "machine": info, "config": {"quick": args.quick, "latency_ms": args.latency_ms,
                                        "repeats": args.repeats, "scenarios": args.scenarios,
                                        "systems": args.systems, "reference": args.reference},
            "scenarios": bench.records, "targets": targets(bench.records, args.quick), "micro": bench.micro,
            "unavailable": bench.unavailable, "notes": notes}


async def setup(bench: Bench) -> None:
    args = bench.args
    if args.reference and (bench.wants_system("reference/local") or bench.wants_system("reference/docker")):
        try:
            python, version = await asyncio.to_thread(reference.ensure_venv, args.reinstall_reference)
            bench.machine["rlms_version"] = version
        except Exception as exc:
            reason = f"reference install failed: {exc}"
            bench.unavailable.update({"reference/local": reason, "reference/docker": reason})
        if "reference/docker" not in bench.unavailable and bench.wants_system("reference/docker"):
            try:
                image = await asyncio.to_thread(reference.ensure_image)
                bench.notes.append(f"reference docker environment runs image `{image}` (built here: see "
                                   "bench/reference.py; Docker Hub's python:3.11-slim is unreachable)")
            except Exception as exc:
                bench.unavailable["reference/docker"] = str(exc)
    if bench.wants_system("rlm-mcp/docker"):
        import subprocess
        image = "rlm-mcp-sandbox:latest"
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode:
            bench.unavailable["rlm-mcp/docker"] = f"image {image} missing (bash sandboxes/ci-setup-docker.sh)"
    if bench.wants_system("rlm-mcp/daytona"):
        try:
            from tests.daytona_emulator import DaytonaEmulator
            bench.emulator = DaytonaEmulator(api_key="bench", memory_gb=4).start()
        except Exception as exc:
            bench.unavailable["rlm-mcp/daytona-emulator"] = f"Daytona emulator did not start: {exc}"


def standing_notes(args: argparse.Namespace, bench: Bench) -> list[str]:
    notes = [
        "daytona-emulator rows run rlm-mcp's Daytona backend (the real `daytona` SDK) against "
        "tests/daytona_emulator.py on loopback, NOT Daytona's cloud: no network round trips, sandboxes are "
        "local processes.",
        "Memory: process peak = VmHWM from /proc/<pid>/status of the rlm-mcp server (or driver) process, read "
        "at the end of the scenario (all repeats; the server also loaded the context). Local/emulated sandbox "
        "peak = highest VmHWM of any worker process (descendants running worker.py, /proc polled every 20 ms). "
        "Docker sandbox peak = highest memory.max_usage_in_bytes of the run's containers (cgroup v1, polled "
        "every 50 ms; includes page cache). The reference's local REPL runs inside its own process, so its "
        "process peak includes the sandbox.",
        "Sub-calls, most in flight and prompt chars come from the model server's counters, reset before each "
        "repeat (prompt chars = characters of all messages of all requests, root and sub-calls). Trajectory = "
        "bytes of the run's JSONL files (rlm-mcp: the run's and its children's files; reference: its "
        "RLMLogger(log_dir=...) output).",
        "Repeats: 3 (1 and 10 MB needles, documents, recursion), 2 for the 100 MB needle; rlm-mcp serves every "
        "repeat from one server process, the reference runs every repeat in one driver process.",
        "The scripted model server now disables Nagle's algorithm; before, every call on a kept-alive "
        "connection waited ~40 ms for a delayed ACK, so older figures (design notes section 2) include that "
        "artifact for both implementations.",
        "The reference's Docker image has no pip: its start-up `pip install dill requests` fails at once (the "
        "packages come from Debian), so its Docker figures exclude any package download.",
        "First rlm_complete on a fresh server pays the lazy litellm import (see micro table); timed repeats "
        "follow one warm-up run, as the reference's timed calls follow its imports.",
        f"Load average at start {bench.machine.get('load_avg_at_start')}, at end "
        f"{bench.machine.get('load_avg_at_end')}: other work on this 2-core machine (concurrent test runs) adds "
        "noise to wall times; compare ratios within the run.",
    ]
    if args.quick:
        notes.append("QUICK MODE: smaller work (only the 1 MB needle unless a bigger one is named in --scenarios; "
                     "100 documents instead of 1,000; 1 MB recursion instead of 2 MB; a 64 MB load file instead "
                     "of 1 GB; fewer micro iterations) and 1 repeat; targets are then evaluated on the sizes that "
                     "ran and do not stand for the full run.")
    for system, reason in bench.unavailable.items():
        notes.append(f"{system} cannot run: {reason}")
    return notes


def write_results(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if report["config"]["quick"] else "")
    text = markdown(report)
    data = json.dumps(report, indent=1, default=str)
    for name, content in (("latest.md", text), ("latest.json", data), (f"{stamp}.md", text),
                          (f"{stamp}.json", data)):
        (out / name).write_text(content, encoding="utf-8")
    return out / "latest.md", out / "latest.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "LiteLLM", "litellm", "docker", "urllib3", "daytona", "mcp", "aiohttp", "rlm_mcp",
                  "daytona_emulator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    report = asyncio.run(amain(args))
    md, js = write_results(report, args.out)
    print(md.read_text(encoding="utf-8"))
    log.info("wrote %s and %s", md, js)
    return 0


if __name__ == "__main__":
    sys.exit(main())
