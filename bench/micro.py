"""Micro-benchmarks: start-up, sandbox start and cell overhead, the sub-call round trip, fan-out
and context-load throughput. Each appends rows to ``session.micro`` (micro, system, value, unit,
detail; or an error), which the report shows as its micro table.

The sandbox-level figures reuse ``bench/daytona_micro.py``'s ``measure()`` (any provider) and
``bench/docker_micro.py``'s; the reference's environments are measured by its driver.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import reference
from bench.common import MB, DriverProcess, spread
from bench.mcp_client import McpServer, server_env, time_to_initialize
from bench.report import cell
from bench.scenarios import Task
from bench.store_micro import generate
from bench.subcall_micro import micro_cli_wall, micro_cpu_subcall, micro_loop_stall, micro_overload
from bench.systems import DRIVER_TIMEOUT_S, EMULATOR_API_KEY, EMULATOR_SNAPSHOT, Session, run_system, warm_up
from rlm_mcp.config import Settings
from rlm_mcp.sandbox import ContextFile, SandboxProvider
from rlm_mcp.sandbox.local import LocalProvider

FANOUT = 256


def _error(micro: str, system: str, exc: BaseException) -> dict[str, Any]:
    return {"micro": micro, "system": system, "error": f"{type(exc).__name__}: {exc}"}


async def micro_initialize(session: Session) -> None:
    n = 2 if session.args.quick else 5
    home = Path(tempfile.mkdtemp(prefix="home-", dir=session.work))
    try:
        env = server_env(session.model.api_base, home)
        times = [await asyncio.to_thread(time_to_initialize, env) for _ in range(n)]
        session.micro.append({"micro": "server start to initialize result (stdio)", "system": "rlm-mcp",
                              "value": spread(times), "unit": "s",
                              "detail": f"{n} process starts, raw JSON-RPC initialize"})
        firsts, warms = [], []
        for _ in range(n):
            server = McpServer(env)
            async with server.running():
                await server.prepare_client("rlm_complete", "rlm_get_result")  # the client's first-use cost
                firsts.append(await warm_up(session, server, "local"))
                warms.append(await warm_up(session, server, "local"))
        session.micro.append({"micro": "first rlm_complete on a fresh server (trivial task, local sandbox)",
                              "system": "rlm-mcp", "value": spread(firsts), "unit": "s",
                              "detail": "sent right after initialize: waits (off the event loop) for what is left "
                                        "of the model client's warm-up (litellm only for models off the direct path), and starts a sandbox"})
        session.micro.append({"micro": "the same call again on that (warm) server", "system": "rlm-mcp",
                              "value": spread(warms), "unit": "s",
                              "detail": f"first/warm ratio {statistics.median(firsts) / statistics.median(warms):.2f} "
                                        "(medians)"})
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def micro_sandbox(session: Session) -> None:
    # Imported here: they need the daytona and docker extras, which a local-only run does without.
    from bench import daytona_micro

    cells, starts = (10, 2) if session.args.quick else (30, 5)
    path = session.work / "micro-context.txt"
    path.write_text("lorem ipsum " * 100_000, encoding="utf-8")  # 1.2 MB, as daytona_micro uses
    context = ContextFile(path, "text")
    providers: list[tuple[str, SandboxProvider]] = []
    if session.can_run("rlm-mcp/local"):
        providers.append(("rlm-mcp/local", LocalProvider(Settings())))
    if session.can_run("rlm-mcp/daytona-emulator") and session.emulator is not None:
        from rlm_mcp.sandbox.daytona import DaytonaProvider

        providers.append(("rlm-mcp/daytona-emulator", DaytonaProvider(Settings(
            daytona_api_url=session.emulator.api_url, daytona_api_key=EMULATOR_API_KEY,
            daytona_snapshot=EMULATOR_SNAPSHOT))))
    for name, provider in providers:
        try:
            r = await daytona_micro.measure(provider, context, cells, starts)
            _sandbox_rows(session, name, r, cells, starts)
        except Exception as exc:
            session.micro.append(_error("sandbox", name, exc))
        finally:
            await provider.aclose()
    if session.can_run("rlm-mcp/docker"):
        await _docker(session, cells, starts)
    for environment in ("local", "docker"):
        system = f"reference/{environment}"
        if not session.wants(system):
            continue
        if system in session.unavailable:
            session.micro.append({"micro": "sandbox", "system": system, "error": session.unavailable[system]})
            continue
        await asyncio.to_thread(_reference, session, environment, cells if environment == "local" else 10,
                                starts if environment == "local" else 2)


def _sandbox_rows(session: Session, name: str, r: dict[str, float], cells: int, starts: int) -> None:
    detail = f"median of {starts} starts / {cells} cells; 1.2 MB context"
    session.micro.append({"micro": "sandbox start", "system": name, "value": r["start_s"], "unit": "s",
                          "detail": detail})
    session.micro.append({"micro": "per-cell overhead (empty cell)", "system": name, "value": r["cell_ms"],
                          "unit": "ms", "detail": detail})
    session.micro.append({"micro": "llm_query round trip, sandbox level (cell with one call minus empty cell)",
                          "system": name, "value": r["llm_query_rtt_ms"], "unit": "ms",
                          "detail": detail + ("; an in-process handler answers at once (no model client)"
                                              if name.startswith("rlm-mcp")
                                              else "; its LM handler and OpenAI client to the model server at 0 ms")})
    if "batched_100_ms" in r:
        session.micro.append({"micro": "llm_query_batched of 100, instant handler", "system": name,
                              "value": r["batched_100_ms"], "unit": "ms", "detail": detail})


async def _docker(session: Session, cells: int, starts: int) -> None:
    from bench import docker_micro

    home = Path(tempfile.mkdtemp(prefix="docker-micro-", dir=session.work))
    try:
        r = await docker_micro.measure(starts, cells, cells, home)
    except Exception as exc:
        session.micro.append(_error("sandbox", "rlm-mcp/docker", exc))
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
        session.micro.append({"micro": micro, "system": system, "value": value, "unit": unit,
                              "detail": detail + ("; an in-process handler answers at once" if "llm" in micro else "")})


def _reference(session: Session, environment: str, cells: int, starts: int) -> None:
    workspace = Path(tempfile.mkdtemp(prefix="ref-ws-", dir=session.work))
    spec = {"mode": "micro", "base_url": session.model.api_base, "api_key": "sk-bench", "model": "micro",
            "environment": environment, "image": reference.IMAGE, "cells": cells, "starts": starts,
            "workspace_dir": str(workspace)}
    spec_path = session.work / f"ref-micro-{environment}.json"
    spec_path.write_text(json.dumps(spec))
    driver = DriverProcess(reference.driver_command(spec_path), env=reference.driver_env(), cwd=str(session.work))
    system = f"reference/{environment}"
    saved, session.model.latency_s = session.model.latency_s, 0.0  # its llm_query goes to the model server
    try:
        while True:
            event = driver.next_event(DRIVER_TIMEOUT_S)
            if event["event"] == "ready":
                driver.go()
            elif event["event"] == "result":
                if event.get("ok"):
                    _sandbox_rows(session, system, event, cells, starts)
                else:
                    session.micro.append({"micro": "sandbox", "system": system, "error": event.get("error")})
            elif event["event"] == "done":
                break
    except Exception as exc:
        session.micro.append(_error("sandbox", system, exc))
    finally:
        session.model.latency_s = saved
        driver.close()
        shutil.rmtree(workspace, ignore_errors=True)


async def _scripted(session: Session, name: str, policy: str, reply: str, systems: tuple[str, ...],
                    latency_s: float | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Run one scripted root reply (a single cell) on each system; (system, repeat) pairs."""
    tiny = session.work / f"{name}-context.txt"
    tiny.write_text("x", encoding="utf-8")
    task = Task(name, policy, name, "", context_path=tiny, repeats=1)
    out = []
    saved = session.model.latency_s
    try:
        if latency_s is not None:
            session.model.latency_s = latency_s
        for system in systems:
            if not session.can_run(system):
                continue
            session.model.script(policy, [reply])
            before = len(session.records)
            await run_system(session, task, system)
            rec = session.records.pop(before)  # reported as a micro figure, not a task row
            rep = rec["repeats"][0] if rec["repeats"] else {"error": rec.get("skipped") or "no result"}
            out.append((system, rep))
    finally:
        session.model.latency_s = saved
    return out


async def micro_fanout(session: Session) -> None:
    """One cell asking llm_query_batched for FANOUT tiny prompts: how many are in flight."""
    reply = ("```repl\nr = llm_query_batched(['ping %d' % i for i in range(" + str(FANOUT) + ")])\n"
             "answer['content'] = str(len(r))\nanswer['ready'] = True\n```")
    for system, rep in await _scripted(session, "micro-fanout", "fanout", reply, ("rlm-mcp/local", "reference/local")):
        ok = rep.get("wall_s") is not None and rep.get("answer") == str(FANOUT)
        session.micro.append({"micro": f"most sub-calls in flight ({FANOUT} prompts in one llm_query_batched, "
                                       f"{session.args.latency_ms:g} ms each)", "system": system,
                              "value": rep.get("max_in_flight") if ok else None, "unit": "calls",
                              "detail": (f"whole run {rep['wall_s']:.2f} s, {rep.get('sub_calls')} sub-calls"
                                         if ok else cell(rep.get("error") or f"answer {rep.get('answer')!r}"))})


async def micro_subcall(session: Session) -> None:
    """20 sequential llm_query calls timed inside the cell, model answering at once: the whole
    sub-call path (sandbox -> host -> model client -> HTTP -> back) per call."""
    reply = ("```repl\nimport time\nt = time.perf_counter()\nfor i in range(20):\n    r = llm_query('ping')\n"
             "answer['content'] = '%.3f' % ((time.perf_counter() - t) / 20 * 1000)\nanswer['ready'] = True\n```")
    systems = ("rlm-mcp/local", "rlm-mcp/docker", "reference/local", "reference/docker")
    for system, rep in await _scripted(session, "micro-subcall", "rtt", reply, systems, latency_s=0.0):
        try:
            value: float | None = float(rep.get("answer") or "")
        except ValueError:
            value = None
        session.micro.append({"micro": "llm_query round trip end to end (model server at 0 ms)", "system": system,
                              "value": value, "unit": "ms",
                              "detail": "mean of 20 sequential llm_query calls timed inside one cell: sandbox to "
                                        "host, model client, HTTP to the model server and back" if value is not None
                              else cell(rep.get("error") or f"answer {rep.get('answer')!r}")})


async def micro_load(session: Session) -> None:
    size_mb = 64 if session.args.quick else 1024
    source = session.work / "load-source.txt"
    await asyncio.to_thread(generate, source, size_mb)  # varied UTF-8 text with \r\n
    home = Path(tempfile.mkdtemp(prefix="home-", dir=session.work))
    server = McpServer(server_env(session.model.api_base, home))
    try:
        async with server.running():
            before = server.peak_mb()
            began = time.perf_counter()
            info = await server.call("rlm_load_context", path=str(source))
            elapsed = time.perf_counter() - began
            after = server.peak_mb()
        if before is None or after is None:  # the server's /proc entry was unreadable
            raise RuntimeError("could not read the server's VmHWM")
        session.micro.append({"micro": f"rlm_load_context throughput ({size_mb:,} MB file"
                                       + (", quick mode: 1 GB in the full run)" if session.args.quick else ")"),
                              "system": "rlm-mcp", "value": info["bytes"] / MB / elapsed, "unit": "MB/s",
                              "detail": f"{elapsed:.2f} s over MCP; server VmHWM {before:.0f} MB before, "
                                        f"{after:.0f} MB after (growth {after - before:.0f} MB)"})
    except Exception as exc:
        session.micro.append(_error("rlm_load_context throughput", "rlm-mcp", exc))
    finally:
        shutil.rmtree(home, ignore_errors=True)
        source.unlink(missing_ok=True)


MICROS: dict[str, Callable[[Session], Awaitable[None]]] = {
    "micro-initialize": micro_initialize, "micro-sandbox": micro_sandbox, "micro-subcall": micro_subcall,
    "micro-fanout": micro_fanout, "micro-load-1gb": micro_load, "micro-cpu-subcall": micro_cpu_subcall,
    "micro-loop-stall": micro_loop_stall, "overload-429": micro_overload, "micro-cli-wall": micro_cli_wall,
}
