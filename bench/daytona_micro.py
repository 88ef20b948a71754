"""Micro-benchmark of the Daytona backend against the loopback emulator (NOT Daytona's cloud).

Measures, for the Daytona backend and for the local backend as a reference: sandbox start
(create + upload + worker ready), per-cell overhead (an empty cell) and the llm_query round
trip (a cell making one call, minus an empty cell). Emulator figures show the backend's own
protocol cost (HTTP + WebSocket on loopback, line relabelling); on Daytona's cloud add the
network round trip per input request and up to ~20 ms of log polling per output line.

Run: python bench/daytona_micro.py [--cells 50] [--starts 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlm_mcp.config import Settings  # noqa: E402
from rlm_mcp.sandbox import ContextFile, SandboxSpec  # noqa: E402
from rlm_mcp.sandbox.daytona import DaytonaProvider  # noqa: E402
from rlm_mcp.sandbox.local import LocalProvider  # noqa: E402
from rlm_mcp.testing.daytona_emulator import DaytonaEmulator  # noqa: E402


async def echo(op: str, prompt: str, model: str | None) -> str:
    return prompt


async def measure(provider: object, context: ContextFile, cells: int, starts: int) -> dict[str, float]:
    spec = SandboxSpec(context=context, handler=echo)
    start_times = []
    for _ in range(starts):
        began = time.perf_counter()
        sandbox = provider.create(spec)  # type: ignore[attr-defined]
        await sandbox.start()
        start_times.append(time.perf_counter() - began)
        await sandbox.close()
    async with provider.create(spec) as sandbox:  # type: ignore[attr-defined]
        empty, calls = [], []
        for _ in range(cells):
            began = time.perf_counter()
            await sandbox.execute("pass", timeout=30)
            empty.append(time.perf_counter() - began)
            began = time.perf_counter()
            await sandbox.execute("llm_query('x')", timeout=30)
            calls.append(time.perf_counter() - began)
        began = time.perf_counter()
        await sandbox.execute("llm_query_batched(['x'] * 100)", timeout=60)
        batch = time.perf_counter() - began
    cell = statistics.median(empty)
    return {"start_s": statistics.median(start_times), "cell_ms": cell * 1000,
            "llm_query_rtt_ms": (statistics.median(calls) - cell) * 1000, "batched_100_ms": batch * 1000}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, DaytonaEmulator(api_key="test") as emulator:
        path = Path(tmp) / "context.txt"
        path.write_text("lorem ipsum " * 100_000, encoding="utf-8")  # 1.2 MB
        context = ContextFile(path, "text")
        settings = Settings(daytona_api_url=emulator.api_url, daytona_api_key="test")
        results = {
            "daytona (emulator)": await measure(DaytonaProvider(settings), context, args.cells, args.starts),
            "local": await measure(LocalProvider(Settings()), context, args.cells, args.starts),
        }
    print(f"medians over {args.cells} cells / {args.starts} starts; Daytona figures are EMULATOR "
          "figures on loopback, not Daytona cloud")
    print(f"{'backend':22} {'start s':>8} {'cell ms':>8} {'llm_query ms':>13} {'100 batched ms':>15}")
    for name, r in results.items():
        print(f"{name:22} {r['start_s']:8.3f} {r['cell_ms']:8.2f} {r['llm_query_rtt_ms']:13.2f} "
              f"{r['batched_100_ms']:15.1f}")


if __name__ == "__main__":
    asyncio.run(main())
