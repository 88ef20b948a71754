"""Benchmark suite: rlm-mcp and the reference RLM implementation (PyPI ``rlms``), side by side.

One command runs every scenario against one scripted OpenAI-compatible model server (started
here on 127.0.0.1, 50 ms per call by default) and writes ``bench/results/latest.md`` and
``latest.json`` plus dated copies::

    python -m bench                       # everything (~20 min on 2 cores)
    python -m bench --quick               # small sizes, 1 repeat (~3 min)
    python -m bench --scenarios needle-1mb,micro-initialize --repeats 2
    python -m bench --systems rlm-mcp --no-reference

This module is the command line and the order of a run; the parts live in
``bench/scenarios.py`` (names, selection, task data), ``bench/systems.py`` (how each system is
started and driven), ``bench/micro.py`` (micro-benchmarks) and ``bench/report.py`` (targets,
tables, result files). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, report, scenarios  # noqa: E402
from bench.micro import MICROS  # noqa: E402
from bench.scenarios import ALL_SCENARIOS, SYSTEMS, SelectionError  # noqa: E402
from bench.systems import Session, run_task, start_services  # noqa: E402
from rlm_mcp.testing.model_server import ScriptedModelServer  # noqa: E402

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small work (1 MB needle only unless named, 100 documents, 64 MB load) and 1 repeat")
    parser.add_argument("--scenarios", type=_names,
                        help=f"comma-separated names or prefixes of: {', '.join(ALL_SCENARIOS)}")
    parser.add_argument("--systems", type=_names,
                        help=f"comma-separated names or prefixes of: {', '.join(SYSTEMS)}")
    parser.add_argument("--repeats", type=int, help="repeats per scenario (default 3; 2 for 100 MB; quick 1)")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the reference implementation (no venv install)")
    parser.add_argument("--reinstall-reference", action="store_true", help="recreate bench/.venv-reference")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="model server latency per call")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    parser.add_argument("--work-dir", type=Path, help="where test data goes (default: a temporary directory)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    try:
        scenarios.check_names("scenario", args.scenarios or (), ALL_SCENARIOS)
        args.resolved_systems = scenarios.resolve_systems(args.systems, args.reference)
    except SelectionError as exc:
        parser.error(str(exc))
    return args


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    info = common.machine()
    work = Path(tempfile.mkdtemp(prefix="rlm-bench-", dir=args.work_dir))
    model = ScriptedModelServer(latency_s=args.latency_ms / 1000)
    session = Session(args, model, work, info, args.resolved_systems)
    try:
        with model:
            await start_services(session)
            for task in scenarios.build_tasks(args.scenarios, args.quick, args.repeats, work):
                await run_task(session, task)
            for name, micro in MICROS.items():
                if not scenarios.selected(args.scenarios, name):
                    continue
                log.info("scenario %s", name)
                try:
                    await micro(session)
                except Exception as exc:
                    log.error("%s failed: %s", name, exc)
                    log.debug("%s", traceback.format_exc())
                    session.micro.append({"micro": name, "system": "-", "error": f"{type(exc).__name__}: {exc}"})
    finally:
        session.close()
        shutil.rmtree(work, ignore_errors=True)
    info["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    notes = session.notes + report.standing_notes(args.quick, info, session.unavailable)
    return {"started_at": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "duration_s": time.time() - started, "command": "python -m bench " + " ".join(sys.argv[1:]),
            "machine": info, "config": {"quick": args.quick, "latency_ms": args.latency_ms,
                                        "repeats": args.repeats, "scenarios": args.scenarios,
                                        "systems": args.systems, "reference": args.reference},
            "scenarios": session.records, "targets": report.targets(session.records, args.quick),
            "micro": session.micro, "unavailable": session.unavailable, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "LiteLLM", "litellm", "docker", "urllib3", "daytona", "mcp", "aiohttp", "rlm_mcp",
                  "daytona_emulator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    result = asyncio.run(amain(args))
    md, js = report.write_results(result, args.out)
    print(md.read_text(encoding="utf-8"))
    log.info("wrote %s and %s", md, js)
    return 0


if __name__ == "__main__":
    sys.exit(main())
