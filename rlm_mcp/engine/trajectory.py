"""Trajectory files: one JSONL file per RLM (root or child), in the reference RLMLogger format.

Line 1 is ``{"type": "metadata", ...}`` with the reference's field names plus ours (run id,
limits, status, usage), rewritten when the run ends; every further line is one
``{"type": "iteration", ...}``. The context is never written: prompts are logged as the
messages added since the previous iteration (the reference repeats the whole history and every
variable's repr, which made its logs grow with the square of the run and the size of the input).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlm_mcp.engine.replies import prose
from rlm_mcp.errors import RunNotFound, quoted
from rlm_mcp.private import open_private, private_dir
from rlm_mcp.sandbox.leftovers import process_start
from rlm_mcp.sandbox.processes import pid_alive

if TYPE_CHECKING:
    from rlm_mcp.engine.models import Completion
    from rlm_mcp.sandbox import CellResult

EXCERPT_CHARS = 1_000
RUN_ID = re.compile(r"run-\d{8}-\d{6}-[0-9a-f]{6}(?:\.\d{1,6}){0,8}")


def check_run_id(run_id: object) -> str:
    """``run_id`` if it has the shape of a run id (a root run or a child RLM), else RunNotFound.
    Checked before any file name is built from it."""
    if isinstance(run_id, str) and RUN_ID.fullmatch(run_id):
        return run_id
    raise RunNotFound(f"{quoted(run_id)} is not a run id (they look like run-20260101-120000-a1b2c3, with "
                      "'.1', '.2'... for child RLMs): use the run_id that rlm_complete returned")


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters with a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [+{len(text) - limit:,} chars]"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def process_identity(pid: int | None = None) -> str:
    """``"<pid>:<start time>"`` of a process (this one by default); the start time, in clock
    ticks since boot from /proc, tells a dead server from an unrelated process that got its pid
    later. Just ``"<pid>"`` where /proc is missing."""
    pid = os.getpid() if pid is None else pid
    start = process_start(pid)
    return f"{pid}:{start}" if start else str(pid)


def process_gone(identity: str) -> bool:
    """Whether the process named by :func:`process_identity` has ended."""
    pid_text, _, _ = identity.partition(":")
    if not pid_text.isdigit():
        return True
    pid = int(pid_text)
    if not pid_alive(pid):
        return True
    return ":" in identity and process_identity(pid) != identity


class TrajectoryWriter:
    """Appends iteration lines as they happen; ``finish`` rewrites the metadata line."""

    def __init__(self, path: Path, metadata: dict[str, Any]) -> None:
        self.path = path
        # "server" says which process wrote it: a later server can tell a run whose server died
        # (status still "running") from one still running in another server on the same data dir.
        self.metadata = {"type": "metadata", **metadata, "status": "running", "started_at": now_iso(),
                         "server": process_identity()}
        private_dir(path.parent)  # trajectories quote the context: for this user only
        self._file = open_private(path)
        self._write(self.metadata)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._file.flush()

    def iteration(self, record: dict[str, Any]) -> None:
        self._write({"type": "iteration", "timestamp": now_iso(), **record})

    def finish(self, **outcome: Any) -> None:
        """Close the file and rewrite line 1 with the outcome (status, answer, usage...)."""
        if self._file.closed:
            return
        self._file.close()
        self.metadata.update(outcome, finished_at=now_iso())
        rewrite_metadata(self.path, self.metadata)


def rewrite_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Replace line 1 of a trajectory file; readers see the old file or the new one, whole."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with path.open("r", encoding="utf-8") as source, open_private(temporary) as target:
            source.readline()
            target.write(json.dumps(metadata, ensure_ascii=False, default=str) + "\n")
            shutil.copyfileobj(source, target)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_metadata(path: Path) -> dict[str, Any]:
    """Line 1 of a trajectory file (``{}`` when it is empty or not a metadata line)."""
    with path.open(encoding="utf-8") as handle:
        line = handle.readline()
    try:
        record = json.loads(line) if line.strip() else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) and record.get("type") == "metadata" else {}


def read_trajectory(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metadata, iterations) of a trajectory file."""
    metadata: dict[str, Any] = {}
    iterations: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("type") == "metadata":
                metadata = record
            else:
                iterations.append(record)
    return metadata, iterations


def unique_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S-") + os.urandom(3).hex()


PAGE_BUDGET_CHARS = 60_000  # ~15k tokens: well under hosts' ~25k-token tool-output limit
MAX_PAGE_ITERATIONS = 20


def summarize_iteration(record: dict[str, Any], detail: str) -> dict[str, Any]:
    """A bounded view of one iteration line: reasoning excerpt, code, output, sub-calls, usage."""
    full = detail == "full"
    code_chars, output_chars = (6_000, 6_000) if full else (1_200, 800)
    blocks = []
    for block in record.get("code_blocks") or []:
        result = block.get("result") or {}
        calls = result.get("rlm_calls") or []
        view: dict[str, Any] = {
            "code": excerpt(block.get("code") or "", code_chars),
            "output": excerpt(((result.get("stdout") or "") + (
                "\n[stderr] " + result["stderr"] if result.get("stderr") else "")).strip(), output_chars),
            "subcalls": len(calls),
            "execution_time": result.get("execution_time"),
        }
        if result.get("final_answer") is not None:
            view["final_answer"] = excerpt(str(result["final_answer"]), output_chars)
        if full and calls:
            view["first_subcalls"] = [{"model": c.get("root_model"), "prompt": excerpt(c.get("prompt") or "", 300),
                                       "response": excerpt(c.get("response") or "", 300)} for c in calls[:3]]
        blocks.append(view)
    return {
        "iteration": record.get("iteration"),
        "reasoning": excerpt(prose(record.get("response") or ""), 2_000 if full else 600),
        "code_blocks": blocks,
        "subcalls": sum(b["subcalls"] for b in blocks),
        "final_answer": record.get("final_answer"),
        "usage": record.get("usage"),
        "iteration_time": record.get("iteration_time"),
    }


def trajectory_page(path: Path, offset: int = 0, limit: int = 5, detail: str = "summary") -> dict[str, Any]:
    """A page of a run's trajectory whose JSON stays under PAGE_BUDGET_CHARS."""
    metadata, iterations = read_trajectory(path)
    limit = max(1, min(limit, MAX_PAGE_ITERATIONS))
    offset = max(0, offset)
    shown: list[dict[str, Any]] = []
    used = 0
    for record in iterations[offset:offset + limit]:
        view = summarize_iteration(record, detail)
        size = len(json.dumps(view, ensure_ascii=False, default=str))
        if shown and used + size > PAGE_BUDGET_CHARS:
            break
        shown.append(view)
        used += size
    next_offset = offset + len(shown)
    children = sorted(p.name for p in path.parent.glob(path.name.removesuffix(".jsonl") + ".*.jsonl"))
    return {
        "run_id": metadata.get("run_id", path.stem),
        "status": metadata.get("status"),
        "answer": excerpt(str(metadata["answer"]), 4_000) if metadata.get("answer") is not None else None,
        "root_model": metadata.get("root_model"),
        "total_iterations": len(iterations),
        "offset": offset,
        "next_offset": next_offset if next_offset < len(iterations) else None,
        "iterations": shown,
        "child_trajectories": children[:50],
        "path": str(path),
    }


def cell_record(code: str, result: CellResult, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """One code block of an iteration line: its output and the sub-calls it made."""
    return {"code": code, "result": {
        "stdout": result.stdout, "stderr": (result.stderr + ("\n" + result.error if result.error else "")).strip(),
        "locals": result.locals, "execution_time": round(result.elapsed, 4),
        "final_answer": result.final, "rlm_calls": calls,
        "state_lost": result.state_lost, "timed_out": result.timed_out,
        "stdout_dropped": result.stdout_dropped, "stderr_dropped": result.stderr_dropped,
        "notices": list(result.notices)}}


def iteration_record(iteration: int, new_messages: list[dict[str, str]], reply: Completion,
                     cells: list[dict[str, Any]], final: str | None, elapsed: float,
                     compaction: dict[str, Any] | None, part: int) -> dict[str, Any]:
    """One iteration line: the messages added since the last one, the reply, its code blocks."""
    record: dict[str, Any] = {
        "iteration": iteration, "prompt": new_messages, "response": reply.text,
        "code_blocks": cells, "final_answer": final, "iteration_time": round(elapsed, 4),
        "usage": {"model": reply.model, "input_tokens": reply.input_tokens,
                  "output_tokens": reply.output_tokens, "cost_usd": reply.cost_usd}}
    if compaction is not None:
        record["compaction"] = compaction
    if part > 1:
        record["part"] = part
    return record
