"""What a benchmark run runs: scenario and system names, the selection flags resolved to them,
the services those systems need, and the task data (needles, documents) written for them.

Everything here is pure apart from :func:`build_tasks` writing its data files, so the selection
rules have unit tests (tests/bench/test_bench_systems.py) without starting anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import common
from bench.common import MB

QUERY = "What is the secret code hidden in the context? Answer with the code only."
COUNT_QUERY = "How many secret codes appear across all the documents? Answer with a number."

TASK_SCENARIOS = ("needle-1mb", "needle-10mb", "needle-100mb", "docs-1000", "recursive-depth2")
MICRO_SCENARIOS = ("micro-initialize", "micro-sandbox", "micro-subcall", "micro-fanout", "micro-load-1gb",
                   "micro-cpu-subcall", "micro-loop-stall", "overload-429", "micro-cli-wall")
ALL_SCENARIOS = TASK_SCENARIOS + MICRO_SCENARIOS
SYSTEMS = ("rlm-mcp/local", "rlm-mcp/docker", "rlm-mcp/daytona-emulator", "rlm-mcp-api/local",
           "reference/local", "reference/docker")
REFERENCE_SYSTEMS = ("reference/local", "reference/docker")

# What each system needs started or built before it can run (systems not listed need nothing
# beyond the model server, which every run starts).
SANDBOX_IMAGE = "rlm-mcp sandbox image"
DAYTONA_EMULATOR = "Daytona emulator"
REFERENCE_VENV = "reference virtualenv"
REFERENCE_IMAGE = "reference Docker image"
SERVICES: dict[str, tuple[str, ...]] = {
    "rlm-mcp/docker": (SANDBOX_IMAGE,),
    "rlm-mcp/daytona-emulator": (DAYTONA_EMULATOR,),
    "reference/local": (REFERENCE_VENV,),
    "reference/docker": (REFERENCE_VENV, REFERENCE_IMAGE),
}


class SelectionError(ValueError):
    """A --systems or --scenarios entry that names nothing; the message lists the valid names."""


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or name.startswith(wanted)


def check_names(kind: str, wanted: Iterable[str], known: Sequence[str]) -> None:
    """Raise :class:`SelectionError` for any entry that is neither a name nor a prefix of one."""
    unknown = [w for w in wanted if not any(_matches(name, w) for name in known)]
    if unknown:
        raise SelectionError(f"unknown {kind} {', '.join(repr(u) for u in unknown)}: use names or prefixes of "
                             f"{', '.join(known)}")


def resolve_systems(wanted: Sequence[str] | None, reference: bool) -> tuple[str, ...]:
    """The full system names a run drives, in :data:`SYSTEMS` order: every system when ``wanted``
    is empty, else those a ``wanted`` entry names or is a prefix of (``rlm-mcp`` selects
    ``rlm-mcp/*`` and ``rlm-mcp-api/*``); reference systems only when ``reference`` is true.

    Every later question ("is this system in the run?", "does the run need the emulator?") is
    asked of these full names; asking with a shortened name (``rlm-mcp/daytona``) is what once
    left the Daytona emulator unstarted."""
    check_names("system", wanted or (), SYSTEMS)
    return tuple(s for s in SYSTEMS
                 if (reference or s not in REFERENCE_SYSTEMS) and (not wanted or any(_matches(s, w) for w in wanted)))


def services_needed(systems: Iterable[str]) -> frozenset[str]:
    """What must be started or built for ``systems`` (full names, see :func:`resolve_systems`)."""
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SelectionError(f"not a full system name: {', '.join(unknown)} (one of {', '.join(SYSTEMS)})")
    return frozenset(service for s in systems for service in SERVICES.get(s, ()))


def selected(scenarios: Sequence[str] | None, name: str) -> bool:
    return not scenarios or any(_matches(name, s) for s in scenarios)


def named(scenarios: Sequence[str] | None, name: str) -> bool:
    return bool(scenarios) and name in (scenarios or ())


# ----- tasks and their data ----------------------------------------------------------------------


@dataclass
class Task:
    name: str
    policy: str  # the scripted model server's policy, chosen by model name
    query: str
    expected: str
    context_path: Path | None = None
    documents_dir: Path | None = None
    max_depth: int = 1
    size_note: str = ""
    systems: tuple[str, ...] = SYSTEMS
    repeats: int = 3


def build_tasks(scenarios: Sequence[str] | None, quick: bool, repeats: int | None, work: Path) -> list[Task]:
    """The selected task scenarios, with their data written under ``work``."""
    small, big = repeats or 3, repeats or 2
    if quick:
        small = big = repeats or 1
    tasks: list[Task] = []
    for name, size in {"needle-1mb": 1, "needle-10mb": 10, "needle-100mb": 100}.items():
        if not selected(scenarios, name) or (quick and size > 1 and not named(scenarios, name)):
            continue  # quick mode: the 1 MB needle only, unless a bigger one is asked for by name
        path = work / f"{name}.txt"
        code = f"NDL-{size}M-7Q"
        common.write_haystack(path, size * MB, code)
        tasks.append(Task(name, "needle", QUERY, code, context_path=path, size_note=f"{size} MB",
                          repeats=big if size >= 100 else small))
    if selected(scenarios, "docs-1000"):
        count = 100 if quick else 1000
        directory = work / "docs"
        needles = common.write_documents(directory, count)
        tasks.append(Task("docs-1000", "count", COUNT_QUERY, str(needles), documents_dir=directory,
                          size_note=f"{count:,} files" + (" (quick mode; 1,000 in the full run)" if quick else ""),
                          systems=("rlm-mcp/local", "reference/local"), repeats=small))
    if selected(scenarios, "recursive-depth2"):
        size = 1 if quick else 2
        path = work / "recursive.txt"
        common.write_haystack(path, size * MB, "DEEP-2R")
        tasks.append(Task("recursive-depth2", "recursive", QUERY, "DEEP-2R", context_path=path, max_depth=2,
                          size_note=f"{size} MB, max_depth=2", systems=("rlm-mcp/local", "reference/local"),
                          repeats=small))
    return tasks
