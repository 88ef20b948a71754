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
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EXCERPT_CHARS = 1_000


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters with a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [+{len(text) - limit:,} chars]"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class TrajectoryWriter:
    """Appends iteration lines as they happen; ``finish`` rewrites the metadata line."""

    def __init__(self, path: Path, metadata: dict[str, Any]) -> None:
        self.path = path
        self.metadata = {"type": "metadata", **metadata, "status": "running", "started_at": now_iso()}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", encoding="utf-8")
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
        temporary = self.path.with_suffix(".jsonl.tmp")
        with self.path.open("r", encoding="utf-8") as source, temporary.open("w", encoding="utf-8") as target:
            source.readline()
            target.write(json.dumps(self.metadata, ensure_ascii=False, default=str) + "\n")
            for line in source:
                target.write(line)
        os.replace(temporary, self.path)


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
