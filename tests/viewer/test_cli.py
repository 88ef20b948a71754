"""``rlm-mcp run --verbose --view``, ``rlm-mcp runs`` and ``rlm-mcp view`` as a person types them:
the console script in a subprocess, the real engine against the scripted model server, and the
page it writes opened in chromium."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from rlm_mcp.testing.model_server import ScriptedModelServer
from tests.conftest import haystack
from tests.server.test_transports import PROCESS_TIMEOUT_S, REPO, RLM_MCP, server_env
from tests.viewer.conftest import Viewer

QUESTION = "What is the secret code?"


def rlm_mcp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RLM_MCP, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT_S, stdin=subprocess.DEVNULL)


def test_run_verbose_prints_iterations_view_opens_the_page_and_runs_lists_it(
        model_server: ScriptedModelServer, tmp_path: Path, viewer: Viewer):
    # The browser the system names ($BROWSER, as webbrowser reads it): a script that notes the URL.
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$1\" >> '{opened}'\n", encoding="utf-8")
    browser.chmod(browser.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "home"
    env = server_env(model_server, home, BROWSER=str(browser), RLM_MCP_LOG_LEVEL="WARNING")
    context = tmp_path / "input.txt"
    context.write_text(haystack(600_000, "CLI-8"), encoding="utf-8")

    run = rlm_mcp(env, "run", QUESTION, "--context", str(context), "--verbose", "--view")
    assert run.returncode == 0, run.stderr
    assert "CLI-8" in run.stdout and len(run.stdout.strip().splitlines()) == 1  # stdout: the answer only
    err = run.stderr
    assert "── iteration 1 (root)" in err and ">>> code" in err and "--- output" in err
    assert "sub-calls" in err and "FINAL ANSWER:" in err and "CLI-8" in err
    assert "\033[" not in err  # no colour: stderr is not a terminal
    run_id = next(line.split("/")[-1].removesuffix(".jsonl") for line in err.splitlines()
                  if line.startswith("rlm-mcp: trajectory: "))
    page = home / "views" / f"{run_id}.html"
    assert opened.read_text(encoding="utf-8").split() == [page.as_uri()]
    assert stat.S_IMODE(page.parent.stat().st_mode) == 0o700  # excerpts of the input are in it

    listed = rlm_mcp(env, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    (summary,) = json.loads(listed.stdout)
    assert summary["run_id"] == run_id and summary["status"] == "completed" and summary["query"] == QUESTION
    table = rlm_mcp(env, "runs")
    assert table.returncode == 0 and run_id in table.stdout and "completed" in table.stdout

    # view by run id, to a chosen file, without a browser; then by trajectory path.
    out = tmp_path / "pages" / "mine.html"
    by_id = rlm_mcp(env, "view", run_id, "--out", str(out), "--no-open")
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout.strip() == str(out) and out.is_file()
    trajectory = home / "trajectories" / f"{run_id}.jsonl"
    by_path = rlm_mcp(env, "view", str(trajectory), "--no-open")
    assert by_path.returncode == 0 and by_path.stdout.strip() == str(page)
    assert opened.read_text(encoding="utf-8").split() == [page.as_uri()]  # --no-open opened nothing

    viewer.open(out)
    assert viewer.page.locator("h1 .mono").inner_text() == run_id
    assert "CLI-8" in viewer.page.locator("header pre.answer").inner_text()
    assert viewer.page.locator("header .badge").first.inner_text() == "completed"
    viewer.screenshot("cli-view")
    viewer.assert_clean()


def test_view_of_an_unknown_or_hostile_run_says_what_to_do(model_server: ScriptedModelServer, tmp_path: Path):
    env = server_env(model_server, tmp_path / "home")
    for target, expected in (("run-20260101-120000-abcdef", "rlm-mcp runs"),
                             ("/etc/passwd", "is not a trajectory"),
                             ("../run-20260101-120000-abcdef", "is not a run id"),
                             (str(tmp_path / "missing.jsonl"), "no trajectory")):
        result = rlm_mcp(env, "view", target, "--no-open")
        assert result.returncode == 2, (target, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    empty = rlm_mcp(env, "runs")
    assert empty.returncode == 0 and empty.stdout == "" and "no runs" in empty.stderr
    assert not os.path.exists(tmp_path / "home" / "views")
