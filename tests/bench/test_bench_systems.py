"""Which systems a benchmark run drives and which services it starts for them, and the
Daytona-emulator system run end to end (it once never started the emulator: the runner asked
whether ``rlm-mcp/daytona`` was selected, which ``--systems rlm-mcp/daytona-emulator`` is not,
then died on ``None.api_url``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import parse_args
from bench.scenarios import (
    DAYTONA_EMULATOR,
    REFERENCE_IMAGE,
    REFERENCE_VENV,
    SANDBOX_IMAGE,
    SYSTEMS,
    SelectionError,
    resolve_systems,
    services_needed,
)

REPO = Path(__file__).resolve().parents[2]


def test_selecting_the_daytona_emulator_system_needs_the_emulator() -> None:
    systems = resolve_systems(["rlm-mcp/daytona-emulator"], reference=False)
    assert systems == ("rlm-mcp/daytona-emulator",)
    assert services_needed(systems) == {DAYTONA_EMULATOR}


@pytest.mark.parametrize("wanted", [["rlm-mcp/daytona"], ["rlm-mcp"], None])
def test_prefixes_and_the_default_select_the_emulator_system_and_start_it(wanted: list[str] | None) -> None:
    systems = resolve_systems(wanted, reference=False)
    assert "rlm-mcp/daytona-emulator" in systems
    assert DAYTONA_EMULATOR in services_needed(systems)


def test_local_systems_need_no_service() -> None:
    systems = resolve_systems(["rlm-mcp/local", "rlm-mcp-api"], reference=True)
    assert systems == ("rlm-mcp/local", "rlm-mcp-api/local")
    assert services_needed(systems) == frozenset()


def test_rlm_mcp_prefix_selects_every_rlm_mcp_system_but_no_reference() -> None:
    assert resolve_systems(["rlm-mcp"], reference=True) == (
        "rlm-mcp/local", "rlm-mcp/docker", "rlm-mcp/daytona-emulator", "rlm-mcp-api/local")


def test_reference_systems_need_their_venv_and_image_unless_no_reference() -> None:
    assert services_needed(resolve_systems(["reference/local"], reference=True)) == {REFERENCE_VENV}
    assert services_needed(resolve_systems(["reference"], reference=True)) == {REFERENCE_VENV, REFERENCE_IMAGE}
    assert resolve_systems(["reference"], reference=False) == ()
    everything = resolve_systems(None, reference=False)
    assert everything == tuple(s for s in SYSTEMS if not s.startswith("reference/"))
    assert services_needed(everything) == {SANDBOX_IMAGE, DAYTONA_EMULATOR}


def test_unknown_system_names_the_valid_ones() -> None:
    with pytest.raises(SelectionError) as caught:
        resolve_systems(["rlm-mcp/local", "daytona-emulator"], reference=False)
    assert "'daytona-emulator'" in str(caught.value) and "rlm-mcp/daytona-emulator" in str(caught.value)
    with pytest.raises(SelectionError, match="not a full system name: rlm-mcp/daytona"):
        services_needed(["rlm-mcp/daytona"])  # the shortened name the runner once asked with


@pytest.mark.parametrize("flags", [["--systems", "rlm-mcp/kubernetes"], ["--scenarios", "needle-5mb"],
                                   ["--repeats", "0"]])
def test_bad_selection_flags_exit_with_a_usage_error(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(flags)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m bench") and flags[1] in err


def test_quick_benchmark_on_the_daytona_emulator_finds_the_needle(tmp_path: Path) -> None:
    """The real daytona SDK in rlm-mcp's server against the emulator the runner starts."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "needle-1mb", "--systems",
         "rlm-mcp/daytona-emulator", "--no-reference", "--out", str(tmp_path), "--work-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["unavailable"] == {}
    (record,) = report["scenarios"]
    assert (record["scenario"], record["system"], record["n"]) == ("needle-1mb", "rlm-mcp/daytona-emulator", 1)
    assert record["error"] is None and record["correct"] == 1 and record["subcalls"] >= 1
    # Emulated sandboxes are worker processes of the runner: their peak was seen.
    assert record["sandboxes_seen"] >= 1 and record["sandbox_peak_mb"] > 0
