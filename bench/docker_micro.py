"""Micro-benchmarks of the Docker sandbox backend.

    python bench/docker_micro.py [--starts 10] [--cells 200] [--calls 200] [--json]

Measures, with the hardened defaults and the image in RLM_MCP_DOCKER_IMAGE:
  cold start   create + attach + start a container, worker ready with its context (median)
  warm take    sandbox start() when a started container waits in the warm pool (median)
  per cell     execute() of a trivial cell, host to worker and back (median)
  llm_query    one llm_query round trip seen from inside the cell, host handler instant (median)
Targets: cold <= 0.6 s, warm <= 50 ms, per cell <= 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from rlm_mcp.config import Settings
from rlm_mcp.sandbox import ContextFile, SandboxSpec
from rlm_mcp.sandbox.docker import DockerProvider

TARGETS = {"cold_start_s": 0.6, "warm_take_s": 0.050, "per_cell_s": 0.010}


async def instant(op: str, prompt: str, model: str | None) -> str:
    return "ok"


async def measure(starts: int, cells: int, calls: int, home: Path) -> dict[str, float]:
    context = home / "context.txt"
    context.write_text("lorem ipsum " * 100_000, encoding="utf-8")
    spec = SandboxSpec(context=ContextFile(context), handler=instant)
    settings = Settings.from_env()
    results: dict[str, float] = {}

    cold = DockerProvider(Settings(**{**settings.__dict__, "home": home, "docker_pool_size": 0}))
    try:
        await cold.warm_up()  # connect, check the image and reap once, outside the timings
        durations = []
        for _ in range(starts):
            sandbox = cold.create(spec)
            began = time.perf_counter()
            await sandbox.start()
            durations.append(time.perf_counter() - began)
            await sandbox.close()
        results["cold_start_s"] = statistics.median(durations)

        async with cold.create(spec) as sandbox:
            durations = []
            for _ in range(cells):
                began = time.perf_counter()
                result = await sandbox.execute("pass", timeout=30)
                durations.append(time.perf_counter() - began)
                assert result.error is None, result.render()
            results["per_cell_s"] = statistics.median(durations)
            result = await sandbox.execute(
                "import time, statistics\n_t = []\n"
                f"for _ in range({calls}):\n"
                "    _s = time.perf_counter(); llm_query('ping'); _t.append(time.perf_counter() - _s)\n"
                "print(statistics.median(_t))", timeout=120)
            assert result.error is None, result.render()
            results["llm_query_round_trip_s"] = float(result.stdout)
    finally:
        await cold.aclose()

    warm = DockerProvider(Settings(**{**settings.__dict__, "home": home, "docker_pool_size": 2}))
    try:
        durations = []
        for _ in range(starts):
            await warm.warm_up()
            sandbox = warm.create(spec)
            began = time.perf_counter()
            await sandbox.start()
            durations.append(time.perf_counter() - began)
            await sandbox.close()
        results["warm_take_s"] = statistics.median(durations)
    finally:
        await warm.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlm-docker-bench-") as home:
        results = asyncio.run(measure(args.starts, args.cells, args.calls, Path(home)))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, value in results.items():
        target = TARGETS.get(name)
        verdict = ("" if target is None
                   else f" (target <= {target * 1000:.0f} ms: {'ok' if value <= target else 'MISSED'})")
        print(f"{name:24} {value * 1000:9.2f} ms{verdict}")


if __name__ == "__main__":
    main()
