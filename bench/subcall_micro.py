"""Issue 12's figures as benchmark rows: host CPU per sub-call, the event loop's longest stall
during the 100 MB needle run, the 429 overload scenario (fixed vs adaptive limit) and
``rlm-mcp run``'s wall time against its run time. Each appends rows to ``session.micro``.

CPU and loop figures come from fresh processes (``bench/subcall_cost.py`` children): litellm's
knobs and the garbage collector's state are process-wide, and the runner's own threads (the
scripted model server) must not count as the client's CPU.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import subcall_cost
from bench.common import MB, write_documents, write_haystack
from bench.mcp_client import server_env
from bench.scenarios import COUNT_QUERY, QUERY
from bench.systems import Session
from rlm_mcp.testing.model_server import Fault, ScriptedModelServer

REPO = Path(__file__).resolve().parents[1]
OVERLOAD_CAPACITY = 8  # the overload scenario's provider serves this many calls at once


def _error(micro: str, system: str, exc: BaseException) -> dict[str, Any]:
    return {"micro": micro, "system": system, "error": f"{type(exc).__name__}: {exc}"}


async def micro_cpu_subcall(session: Session) -> None:
    """Host CPU per sub-call at 0 ms model latency, 32 in flight: the model client alone
    (rlm-mcp's two paths and the OpenAI SDK the reference's LM handler uses), and the whole
    server side of a 1,000-sub-call run (channel, engine, budget, model client)."""
    calls, documents = (200, 200) if session.args.quick else (600, 1000)

    def measure() -> list[dict[str, Any]]:
        rows = []
        with subcall_cost.model_server(0) as api_base:
            for variant, system in (("rlm-mcp", "rlm-mcp (direct OpenAI-compatible path)"),
                                    ("rlm-mcp-litellm", "rlm-mcp (RLM_MCP_MODEL_CLIENT=litellm)"),
                                    ("openai-sdk", "reference's client (openai.AsyncOpenAI, reused)")):
                try:
                    r = subcall_cost.run_child(["--child", variant, "--api-base", api_base, "--model", "openai/needle",
                                                "--calls", str(calls), "--concurrency", "32", "--warmup", "64"])
                    rows.append({"micro": "host CPU per sub-call, model client only (0 ms model, 32 in flight)",
                                 "system": system, "value": r["cpu_ms_per_call"], "unit": "ms",
                                 "detail": f"{calls} calls after 64 warm-up; longest loop step "
                                           f"{r['steps']['max_step_ms']:.1f} ms CPU, longest full GC "
                                           f"{r['gc']['gen2']['max_ms']:.0f} ms"})
                except Exception as exc:
                    rows.append(_error("host CPU per sub-call, model client only", system, exc))
            for variant, system in (("engine", "rlm-mcp (direct OpenAI-compatible path)"),
                                    ("engine-litellm", "rlm-mcp (RLM_MCP_MODEL_CLIENT=litellm)")):
                try:
                    r = subcall_cost.run_child(["--child-engine", variant, "--api-base", api_base,
                                                "--documents", str(documents)])
                    rows.append({"micro": f"host CPU per sub-call, whole server side ({documents:,} sub-calls, "
                                          "0 ms model, 32 in flight)",
                                 "system": system, "value": r["cpu_ms_per_subcall"], "unit": "ms",
                                 "detail": f"engine run over {documents:,} documents, local sandbox (worker CPU not "
                                           f"counted); wall {r['wall_s']:.2f} s, longest loop step "
                                           f"{r['steps']['max_step_ms']:.1f} ms CPU"})
                except Exception as exc:
                    rows.append(_error("host CPU per sub-call, whole server side", system, exc))
        return rows

    session.micro.extend(await asyncio.to_thread(measure))


async def micro_loop_stall(session: Session) -> None:
    """The event loop's longest stall during a needle run, first in a fresh process (litellm
    warming up in its thread) and then warm."""
    size = 10 if session.args.quick else 100
    for client in ("auto", "litellm"):
        system = "rlm-mcp (direct OpenAI-compatible path)" if client == "auto" else "rlm-mcp (litellm)"
        try:
            r = await asyncio.to_thread(subcall_cost.run_child, [
                "--child-needle", str(size), "--api-base", session.model.api_base, "--model-client", client], 900)
        except Exception as exc:
            session.micro.append(_error(f"event-loop stall, needle {size} MB", system, exc))
            continue
        for run in r["runs"]:
            loop, steps, gen2 = run["loop"], run["steps"], run["gc"]["gen2"]
            session.micro.append({
                "micro": f"event loop: longest stall during the needle-{size}mb run, {run['run']}"
                         + (" (quick mode: 100 MB in the full run)" if session.args.quick else ""),
                "system": system, "value": loop["max_stall_ms"], "unit": "ms",
                "detail": f"lag probe every 2 ms: {loop['stalls_over_10ms']} stalls > 10 ms of {loop['samples']}; "
                          f"longest single step {steps['max_step_ms']:.1f} ms CPU ({steps['max_step'][:60]}); "
                          f"longest full GC {gen2['max_ms']:.0f} ms; load + run {run['wall_s']:.2f} s, "
                          f"{run['subcalls']} sub-calls"})


async def micro_overload(session: Session) -> None:
    """docs-1000 against a provider that serves 8 calls at once and answers 429 (Retry-After
    0.5 s) beyond: the fixed limit of 32 against the adaptive one."""
    from rlm_mcp.config import Settings
    from rlm_mcp.engine import RlmEngine, RunRequest, shape_of
    from rlm_mcp.store import ContextStore

    count = 200 if session.args.quick else 1000
    work = Path(tempfile.mkdtemp(prefix="overload-", dir=session.work))
    needles = await asyncio.to_thread(write_documents, work / "docs", count)
    latency = session.args.latency_ms / 1000
    try:
        for adaptive in (False, True):
            system = "rlm-mcp, adaptive limit" if adaptive else "rlm-mcp, fixed limit (RLM_MCP_ADAPTIVE_CONCURRENCY=false)"
            overload = Fault(429, "rate limited: too many requests in flight", headers={"Retry-After": "0.5"})
            with ScriptedModelServer(latency, max_in_flight=OVERLOAD_CAPACITY, overload=overload) as server:
                settings = Settings(home=work / f"home-{adaptive}", model="openai/count", api_base=server.api_base,
                                    api_key="sk-bench", adaptive_concurrency=adaptive)
                store = ContextStore(settings)
                info = await asyncio.to_thread(store.load_path, str(work / "docs"))
                engine = RlmEngine(settings)
                try:
                    await engine.models.ready()
                    began = time.perf_counter()
                    result = await engine.run(RunRequest(query=COUNT_QUERY, context=store.context_file(info.handle),
                                                         shape=shape_of(info)))
                    wall = time.perf_counter() - began
                except Exception as exc:
                    session.micro.append(_error("overload-429", system, exc))
                    continue
                finally:
                    await engine.sandboxes.aclose()
                    await engine.models.aclose()
                stats = server.stats
            ok = result.answer == str(needles)
            failed = count - result.subcalls
            session.micro.append({
                "micro": f"overload-429: {count:,} sub-calls, provider serves {OVERLOAD_CAPACITY} at once "
                         f"({session.args.latency_ms:g} ms each), 429 + Retry-After 0.5 s beyond",
                "system": system, "value": wall, "unit": "s",
                "detail": f"{stats.refused:,} refused attempts of {stats.sub_calls:,}; {failed:,} sub-calls failed "
                          f"(retries exhausted); most in flight at the provider {stats.max_in_flight}; "
                          f"run {result.status}, answer {'right' if ok else repr(result.answer)}"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def micro_cli_wall(session: Session) -> None:
    """``rlm-mcp run`` on the needle haystack: process wall time against the run time it reports
    (the difference is start-up: interpreter, imports, the context load, litellm's warm-up)."""
    size = 10 if session.args.quick else 100
    work = Path(tempfile.mkdtemp(prefix="cli-", dir=session.work))
    try:
        path = work / "haystack.txt"
        await asyncio.to_thread(write_haystack, path, size * MB, "CLI-9Z")
        env = server_env(session.model.api_base, work / "home")
        command = [sys.executable, "-m", "rlm_mcp", "run", QUERY, "--context", str(path), "--json"]
        walls, runs = [], []
        for _ in range(1 if session.args.quick else 2):
            began = time.perf_counter()
            done = await asyncio.to_thread(subprocess.run, command, env=env, cwd=REPO, capture_output=True,
                                           text=True, timeout=600)
            walls.append(time.perf_counter() - began)
            if done.returncode != 0:
                raise RuntimeError(f"rlm-mcp run exited {done.returncode}: {done.stderr[-500:]}")
            result = json.loads(done.stdout)
            if result.get("answer") != "CLI-9Z":
                raise RuntimeError(f"rlm-mcp run answered {result.get('answer')!r}")
            runs.append(result["elapsed_s"])
        best = min(range(len(walls)), key=lambda i: walls[i])
        session.micro.append({"micro": f"`rlm-mcp run` on the {size} MB needle: process wall minus run time"
                                       + (" (quick mode: 100 MB in the full run)" if session.args.quick else ""),
                              "system": "rlm-mcp/local", "value": walls[best] - runs[best], "unit": "s",
                              "detail": f"wall {walls[best]:.2f} s for a {runs[best]:.2f} s run "
                                        f"(best of {len(walls)}; all walls {', '.join(f'{w:.2f}' for w in walls)})"})
    except Exception as exc:
        session.micro.append(_error("rlm-mcp run wall vs run time", "rlm-mcp/local", exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
