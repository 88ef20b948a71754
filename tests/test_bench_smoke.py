"""The benchmark runner in its quickest mode: one small needle through rlm-mcp over MCP, no
reference install. Guards the runner and its JSON shape; the full benchmark is `python -m bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_results_with_every_figure(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "needle-1mb", "--systems", "rlm-mcp/local",
         "--no-reference", "--out", str(tmp_path), "--work-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.md").read_text().startswith("# rlm-mcp vs reference")
    assert {"machine", "config", "scenarios", "targets", "micro", "notes"} <= set(report)
    (record,) = report["scenarios"]
    assert (record["scenario"], record["system"], record["n"]) == ("needle-1mb", "rlm-mcp/local", 1)
    for key in ("wall_s", "process_peak_mb", "sandbox_peak_mb", "subcalls", "max_in_flight", "prompt_chars",
                "trajectory_bytes", "correct", "load_s"):
        assert record[key] is not None, key
    assert record["correct"] == 1 and record["subcalls"] >= 1 and record["prompt_chars"] > 1_000_000
    assert set(record["wall_s"]) == {"min", "median", "max", "n"}
    assert any(t["verdict"] == "NOT MEASURED" for t in report["targets"])  # no reference in this mode
