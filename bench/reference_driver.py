"""Drives the reference RLM implementation (PyPI ``rlms``) for the benchmark runner.

Executed with the reference's own virtualenv (bench/.venv-reference/bin/python), never imported
by rlm-mcp. Usage: ``python reference_driver.py SPEC.json``; speaks the runner's JSON-lines
protocol on stdout (see bench.common.DriverProcess).

Spec fields: mode ("task" | "micro"), base_url, api_key, model, environment ("local" | "docker"),
image (docker), context_path or documents_dir or context_text, query, max_depth, log_dir, repeats,
cells (micro).

A task repeat times ``RLM.completion()`` only: reading the context into a Python object is
timed apart (``load_s``): the reference's API takes the context in memory. The trajectory is
the reference's own JSONL log (``RLMLogger(log_dir=...)``), measured in bytes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import protocol_stdout, vmhwm_kb  # noqa: E402  (stdlib only)

PROTO = protocol_stdout()


def emit(event: str, **fields: object) -> None:
    PROTO.write(json.dumps({"event": event, **fields}) + "\n")
    PROTO.flush()


def wait_go() -> bool:
    emit("ready")
    return sys.stdin.readline().strip() == "go"


def load_context(spec: dict) -> object:
    if spec.get("context_path"):
        return Path(spec["context_path"]).read_text(encoding="utf-8")
    if spec.get("documents_dir"):
        return [p.read_text(encoding="utf-8") for p in sorted(Path(spec["documents_dir"]).iterdir()) if p.is_file()]
    return spec.get("context_text", "")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def failed_subcalls(trajectory: object) -> tuple[int, str | None]:
    """Sub-calls (llm_query / child RLMs) of the root whose reply is an error string."""
    count, sample = 0, None
    if not isinstance(trajectory, dict):
        return 0, None
    for iteration in trajectory.get("iterations") or []:
        for block in iteration.get("code_blocks") or []:
            for call in (block.get("result") or {}).get("rlm_calls") or []:
                response = call.get("response") if isinstance(call, dict) else None
                if isinstance(response, str) and response.startswith("Error"):
                    count += 1
                    sample = sample or response[:200]
    return count, sample


def run_tasks(spec: dict) -> None:
    from rlm import RLM
    from rlm.logger import RLMLogger

    env_kwargs = {"image": spec["image"]} if spec["environment"] == "docker" else {}
    backend_kwargs = {"model_name": spec["model"], "base_url": spec["base_url"], "api_key": spec["api_key"]}
    for index in range(spec["repeats"]):
        if not wait_go():
            return
        log_dir = Path(spec["log_dir"]) / f"repeat{index}"
        began = time.perf_counter()
        context = load_context(spec)
        load_s = time.perf_counter() - began
        try:
            rlm = RLM(backend="openai", backend_kwargs=dict(backend_kwargs), environment=spec["environment"],
                      environment_kwargs=dict(env_kwargs), max_depth=spec.get("max_depth", 1),
                      max_iterations=spec.get("max_iterations", 30), logger=RLMLogger(log_dir=str(log_dir)))
            began = time.perf_counter()
            completion = rlm.completion(context, root_prompt=spec["query"])
            wall = time.perf_counter() - began
            errors, sample = failed_subcalls(completion.metadata)
            emit("result", ok=True, answer=completion.response, wall_s=wall, load_s=load_s,
                 trajectory_bytes=dir_bytes(log_dir), subcall_errors=errors, subcall_error_sample=sample)
        except Exception as exc:  # reported, not raised: the runner records it in the table
            emit("result", ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:],
                 load_s=load_s)
        del context


def run_micro(spec: dict) -> None:
    """Sandbox start, per-cell overhead and the llm_query round trip of the reference's envs."""
    from rlm.clients import get_client
    from rlm.core.lm_handler import LMHandler
    from rlm.environments import get_environment

    if not wait_go():
        return
    client = get_client("openai", {"model_name": spec["model"], "base_url": spec["base_url"],
                                   "api_key": spec["api_key"]})
    handler = LMHandler(client)
    handler.start()
    context = "lorem ipsum " * 100_000  # 1.2 MB, as bench/daytona_micro.py uses
    env_kwargs = {"image": spec["image"]} if spec["environment"] == "docker" else {}
    starts, empty, calls = [], [], []
    try:
        for _ in range(spec.get("starts", 3)):
            began = time.perf_counter()
            env = get_environment(spec["environment"], {**env_kwargs, "lm_handler_address": handler.address,
                                                         "context_payload": context})
            starts.append(time.perf_counter() - began)
            env.cleanup()
        env = get_environment(spec["environment"], {**env_kwargs, "lm_handler_address": handler.address,
                                                     "context_payload": context})
        try:
            for _ in range(spec.get("cells", 10)):
                began = time.perf_counter()
                result = env.execute_code("pass")
                empty.append(time.perf_counter() - began)
                began = time.perf_counter()
                result = env.execute_code("r = llm_query('x')")
                calls.append(time.perf_counter() - began)
            if result.stderr.strip():
                raise RuntimeError(f"llm_query cell failed: {result.stderr[-500:]}")
        finally:
            env.cleanup()
        cell = statistics.median(empty)
        emit("result", ok=True, start_s=statistics.median(starts), cell_ms=cell * 1000,
             llm_query_rtt_ms=(statistics.median(calls) - cell) * 1000)
    except Exception as exc:
        emit("result", ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
    finally:
        handler.stop()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("OPENAI_API_KEY", spec["api_key"])
    if spec.get("workspace_dir"):
        os.environ["RLM_DOCKER_WORKSPACE_DIR"] = spec["workspace_dir"]
    try:
        import rlm  # noqa: F401
        version = None
        try:
            from importlib.metadata import version as _version
            version = _version("rlms")
        except Exception:
            pass
        emit("hello", rlms_version=version)
        if spec["mode"] == "micro":
            run_micro(spec)
        else:
            run_tasks(spec)
    finally:
        emit("done", vmhwm_kb=vmhwm_kb(os.getpid()))


if __name__ == "__main__":
    main()
