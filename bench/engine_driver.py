"""Drives rlm-mcp's Python API (ContextStore + RlmEngine, no MCP) for the benchmark runner.

Isolates the engine's own overhead from the MCP layer. Usage: ``python -m bench.engine_driver
SPEC.json``; speaks the runner's JSON-lines protocol (see bench.common.DriverProcess).
Spec fields: api_base, model, sandbox, home, context_path or documents_dir, query, max_depth,
repeats.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import protocol_stdout, vmhwm_kb  # noqa: E402

PROTO = protocol_stdout()


def emit(event: str, **fields: object) -> None:
    PROTO.write(json.dumps({"event": event, **fields}) + "\n")
    PROTO.flush()


def trajectory_bytes(path: str | None, run_id: str) -> int:
    if not path:
        return 0
    return sum(p.stat().st_size for p in Path(path).parent.glob(f"{run_id}*") if p.is_file())


async def run(spec: dict) -> None:
    from rlm_mcp.config import Settings
    from rlm_mcp.engine import RlmEngine, RunRequest, shape_of
    from rlm_mcp.store import ContextStore

    settings = Settings.from_env({**os.environ, "RLM_MCP_HOME": spec["home"], "RLM_MCP_MODEL": spec["model"],
                                  "RLM_MCP_API_BASE": spec["api_base"], "RLM_MCP_SANDBOX": spec["sandbox"]})
    store = ContextStore(settings)
    began = time.perf_counter()
    info = await asyncio.to_thread(store.load_path, spec.get("context_path") or spec["documents_dir"])
    emit("loaded", load_s=time.perf_counter() - began, characters=info.characters)
    engine = RlmEngine(settings)
    limits = settings.limits.with_overrides(max_depth=spec.get("max_depth"))
    try:
        # One trivial run first (the runner scripts a FINAL reply for model "warmup"), as the MCP
        # path does: litellm is imported lazily on the first model call.
        emit("warmup")
        if sys.stdin.readline().strip() != "go":
            return
        tiny = store.load_text("x", name="warm-up")
        began = time.perf_counter()
        warm = await engine.run(RunRequest(query="warm up", context=store.context_file(tiny.handle),
                                           shape=shape_of(tiny), model="openai/warmup", sandbox=spec["sandbox"]))
        emit("warmed", first_call_s=time.perf_counter() - began, status=warm.status)
        for _ in range(spec["repeats"]):
            emit("ready")
            if sys.stdin.readline().strip() != "go":
                return
            request = RunRequest(query=spec["query"], context=store.context_file(info.handle), shape=shape_of(info),
                                 sandbox=spec["sandbox"], limits=limits)
            began = time.perf_counter()
            try:
                result = await engine.run(request)
            except Exception as exc:
                emit("result", ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
                continue
            wall = time.perf_counter() - began
            emit("result", ok=result.status == "completed", answer=result.answer, status=result.status,
                 error=result.error, wall_s=wall, subcalls=result.subcalls,
                 engine_max_in_flight=result.max_subcalls_in_flight,
                 trajectory_bytes=trajectory_bytes(result.trajectory_path, result.run_id))
    finally:
        await engine.sandboxes.aclose()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        emit("hello")
        asyncio.run(run(spec))
    finally:
        emit("done", vmhwm_kb=vmhwm_kb(os.getpid()))


if __name__ == "__main__":
    main()
