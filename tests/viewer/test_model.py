"""The view-model: trajectories written by the real engine (and by hand) read into bounded JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_mcp.engine.trajectory import TrajectoryWriter
from rlm_mcp.errors import ConfigError, RunNotFound
from rlm_mcp.testing.synthetic import write_run
from rlm_mcp.viewer import (
    MCP_APP_MIME,
    VIEW_FORMAT,
    app_html,
    build_view,
    iter_nodes,
    render_html,
    run_summaries,
    script_json,
    view_etag,
)
from rlm_mcp.viewer.model import CAPS, FLOORS, cut
from tests.viewer.conftest import HOSTILE, iteration_record, metadata, tree_run

MARKER = re.compile(r"\.\.\. \[\+([\d,]+) chars\]\Z")


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def test_a_finished_engine_run_becomes_a_view_with_its_outcome_usage_and_sub_calls(engine_runs):
    run = engine_runs["finished"]
    view = build_view(run.directory, run.run_id)
    root = view["root"]
    assert (view["format"], view["running"]) == (VIEW_FORMAT, False)
    assert (root["status"], root["answer"]) == ("completed", "VIEW-7")
    assert len(root["iterations"]) == run.result.iterations
    assert root["totals"]["subcalls"] == run.result.subcalls > 0
    assert root["usage"] == {model: usage.model_dump() for model, usage in run.result.usage.items()}
    assert root["sandbox"] == "local" and root["model"] == "openai/needle"
    first_block = root["iterations"][0]["blocks"][0]
    assert first_block["code"] and first_block["stdout"] and first_block["dur"] is not None
    # The same view from the file's path
    assert build_view(run.path)["root"]["iterations"] == root["iterations"]


def test_the_view_never_holds_the_context_and_every_string_is_bounded(engine_runs):
    run = engine_runs["finished"]
    view = build_view(run.directory, run.run_id)
    text = json.dumps(view)
    assert len(text) < 60_000  # the context is 900,000 characters; sub-call prompts carried 400,000 each
    longest_cap = max(CAPS.values())
    for value in strings(view):
        match = MARKER.search(value)
        assert len(value) <= longest_cap + 30, value[:80]
        if match:  # a cut string says how much was cut
            assert int(match.group(1).replace(",", "")) > 0


def test_a_second_cut_keeps_one_marker_that_counts_both_cuts():
    engine_excerpt = "a" * 500 + "... [+1,500 chars]"  # the engine cut 2,000 characters to 500
    assert cut(engine_excerpt, 100) == "a" * 100 + "... [+1,900 chars]"
    assert cut(engine_excerpt, 600) == engine_excerpt
    assert cut("short", 10) == "short"


def test_a_failed_run_shows_its_error_and_the_iterations_before_it(engine_runs):
    run = engine_runs["failed"]
    root = build_view(run.directory, run.run_id)["root"]
    assert root["status"] == "failed"
    assert "upstream exploded" in root["error"] or "after 2 attempts" in root["error"]
    assert root["iterations"][0]["blocks"][0]["stdout"] == "before the failure\n"


def test_a_limit_run_names_the_limit_and_marks_the_answer_now_call(engine_runs):
    run = engine_runs["limit"]
    root = build_view(run.directory, run.run_id)["root"]
    assert (root["status"], root["limit"], root["answer"]) == ("limit_reached", "max_iterations", "best guess")
    assert [it["answer_now"] for it in root["iterations"]] == [False, False, True]


def test_child_rlms_hang_under_their_parent_and_calls_link_to_them(engine_runs):
    run = engine_runs["children"]
    view = build_view(run.directory, run.run_id)
    root = view["root"]
    children = root["children"]
    assert len(children) == 3 and all(child["status"] == "completed" for child in children)
    linked = [call["child"] for it in root["iterations"] for block in it["blocks"] for call in block["calls"]
              if "child" in call]
    assert sorted(linked) == sorted(child["id"] for child in children)
    # Tokens of a child call are the child's own, and the tree's total matches the engine's count.
    assert root["totals"]["tokens"] == run.result.input_tokens + run.result.output_tokens


def test_grandchildren_nest_under_their_parent_child(tmp_path):
    path = tree_run(tmp_path)
    view = build_view(path)
    ids = [[child["id"] for child in node["children"]] for node in iter_nodes(view)]
    run_id = view["run_id"]
    assert ids[0] == [f"{run_id}.1", f"{run_id}.2"]
    assert [node["id"] for node in iter_nodes(view)] == [run_id, f"{run_id}.1", f"{run_id}.2", f"{run_id}.2.3"]


def test_a_run_in_progress_reads_with_a_half_written_last_line(tmp_path):
    writer = TrajectoryWriter(tmp_path / "run-1.jsonl", metadata("run-1", "run-1", "q"))
    writer.iteration(iteration_record(1))
    with (tmp_path / "run-1.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"type": "iteration", "iteration": 2, "respo')  # the writer is mid-line
    view = build_view(tmp_path, "run-1")
    assert view["running"] is True
    assert view["root"]["status"] == "running"
    assert (len(view["root"]["iterations"]), view["root"]["partial_tail"], view["root"]["bad_lines"]) == (1, True, 0)


def test_the_etag_changes_when_a_file_of_the_tree_changes(tmp_path):
    path = tree_run(tmp_path)
    run_id = path.name.removesuffix(".jsonl")
    before = view_etag(tmp_path, run_id)
    assert view_etag(tmp_path, run_id) == before == build_view(path)["etag"]
    with (tmp_path / f"{run_id}.2.3.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"type": "iteration", "iteration": 2}) + "\n")
    assert view_etag(tmp_path, run_id) != before


def test_garbage_lines_and_wrong_types_are_skipped_not_fatal(tmp_path):
    lines = [
        json.dumps({"type": "metadata", "run_id": "run-x", "status": "completed", "query": ["not", "a", "string"],
                    "usage": {"m": {"calls": "many", "input_tokens": float("inf")}}, "limits": "none"}),
        "not json at all",
        json.dumps([1, 2, 3]),
        json.dumps({"type": "iteration", "iteration": "one", "response": 42, "code_blocks": {"not": "a list"},
                    "usage": None, "iteration_time": "slow"}),
        json.dumps({"type": "iteration", "code_blocks": [None, {"code": None, "result": {"rlm_calls": [None, 5]}}]}),
    ]
    (tmp_path / "run-x.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    view = build_view(tmp_path, "run-x")
    root = view["root"]
    assert root["bad_lines"] == 2 and len(root["iterations"]) == 2
    assert root["usage"] == {"m": {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": None}}
    assert root["iterations"][1]["blocks"][1]["calls"][0]["prompt"] == ""
    json.dumps(view, allow_nan=False)  # still valid JSON for the page
    nan_limit = {"type": "metadata", "limits": {"timeout_s": float("nan")}}
    (tmp_path / "run-y.jsonl").write_text(json.dumps(nan_limit) + "\n")
    assert build_view(tmp_path, "run-y")["root"]["limits"] == {"timeout_s": None}


@pytest.mark.parametrize("run_id", ["../etc/passwd", "a/b", "", "run*", ".."])
def test_a_run_id_that_could_leave_the_directory_is_refused(tmp_path, run_id):
    with pytest.raises(ConfigError, match="is not a run id"):
        build_view(tmp_path, run_id)


def test_a_missing_run_says_how_to_find_one(tmp_path):
    with pytest.raises(RunNotFound, match="rlm-mcp runs"):
        build_view(tmp_path, "run-nope")
    with pytest.raises(ConfigError, match="not a trajectory"):
        build_view(tmp_path / "notes.txt")


def test_a_very_large_run_is_cut_to_the_budget(tmp_path):
    path = write_run(tmp_path, iterations=200, subcalls=4_000, children=5)
    small = build_view(path, budget_chars=200_000)
    large = build_view(path, budget_chars=50_000_000)
    assert small["excerpts"]["shrunk"] and not large["excerpts"]["shrunk"]
    assert all(small["excerpts"]["caps"][kind] >= FLOORS[kind] for kind in CAPS)
    assert len(json.dumps(small)) < len(json.dumps(large)) / 2
    assert sum(len(node["iterations"]) for node in iter_nodes(small)) == 200 + 5 * 3


def test_script_json_cannot_close_its_script_element():
    text = script_json({"a": HOSTILE, "b": "x & y <!-- -->"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"a": HOSTILE, "b": "x & y <!-- -->"}


def test_rendered_pages_hold_data_only_as_inert_json(engine_runs):
    run = engine_runs["hostile"]
    page = render_html(build_view(run.directory, run.run_id))
    assert HOSTILE not in page  # every < of the run's strings is escaped in the embedded JSON
    assert page.count("<script") == 3  # config, data and the viewer's own script
    assert "script-src 'sha256-" in page and "connect-src 'none'" in page
    served = render_html(None, data_url="/runs/x/view.json")
    assert "connect-src 'self'" in served and '"mode":"served"' in served
    assert '"mode":"mcp-app"' in app_html() and MCP_APP_MIME == "text/html;profile=mcp-app"
    with pytest.raises(ConfigError):
        render_html(None, data_url="javascript:alert(1)")


def test_run_summaries_list_root_runs_newest_first(engine_runs):
    directory = engine_runs["finished"].directory
    summaries = run_summaries(directory, limit=100)
    ids = [s["run_id"] for s in summaries]
    assert engine_runs["children"].run_id in ids and not any("." in run_id for run_id in ids)
    finished = next(s for s in summaries if s["run_id"] == engine_runs["finished"].run_id)
    assert (finished["status"], finished["query"]) == ("completed", "What is the secret code?")
    assert run_summaries(directory, limit=2) == summaries[:2]
    assert run_summaries(Path("/nonexistent/dir")) == []


def test_export_writes_the_page_and_opens_it_in_the_browser_the_system_names(tmp_path):
    path = tree_run(tmp_path / "runs")
    recorder = tmp_path / "browser.py"
    recorder.write_text("import pathlib, sys\npathlib.Path(sys.argv[1]).write_text(sys.argv[2])\n", encoding="utf-8")
    opened = tmp_path / "opened.txt"
    page = tmp_path / "out" / "page.html"
    code = ("import sys\nfrom rlm_mcp.viewer import build_view, export_run\n"
            "export_run(build_view(sys.argv[1]), sys.argv[2], open_browser=True)\n")
    # A process of its own: webbrowser reads $BROWSER once per process.
    env = {**os.environ, "BROWSER": f"{sys.executable} {recorder} {opened} %s"}
    env.pop("DISPLAY", None)
    subprocess.run([sys.executable, "-c", code, str(path), str(page)], env=env, check=True, timeout=120)
    assert opened.read_text(encoding="utf-8") == page.resolve().as_uri()
    assert "rlm-view-data" in page.read_text(encoding="utf-8")
    assert not list(page.parent.glob(".view-*"))  # no temporary file left behind


# ----- fields the engine records for the viewer (and the reference visualizer) -------------------

def test_engine_trajectories_carry_the_reference_field_names_and_sub_call_start_times(engine_runs):
    for name in ("finished", "children"):
        run = engine_runs[name]
        lines = [json.loads(line) for line in run.path.read_text(encoding="utf-8").splitlines()]
        iterations = [line for line in lines[1:] if line["type"] == "iteration"]
        assert iterations and all("iteration_time" in it and "final_answer" in it for it in iterations)
        cells = [block["result"] for it in iterations for block in it["code_blocks"]]
        assert cells and all({"stdout_dropped", "stderr_dropped", "notices"} <= set(cell) for cell in cells)
        calls = [call for cell in cells for call in cell["rlm_calls"]]
        assert calls, name
        for call in calls:
            assert {"prompt", "response", "prompt_tokens", "completion_tokens", "execution_time"} <= set(call)
            assert isinstance(call["prompt_tokens"], int) and isinstance(call["completion_tokens"], int)
            assert 0 <= call["start_s"] <= run.result.elapsed_s
        plain = [call for call in calls if "child_run_id" not in call["usage_summary"]]
        assert all(call["prompt_tokens"] > 0 and call["completion_tokens"] > 0 for call in plain)
    # The view turns the start times into the in-flight chart's data.
    view = build_view(engine_runs["finished"].path)
    starts = [call["start"] for it in view["root"]["iterations"] for block in it["blocks"] for call in block["calls"]]
    assert starts and all(isinstance(start, float) for start in starts)


def test_a_running_run_whose_server_died_is_shown_failed_and_a_live_one_stays_running(tmp_path):
    from rlm_mcp.engine.runs import SERVER_STOPPED
    from rlm_mcp.engine.trajectory import read_metadata, rewrite_metadata

    live = TrajectoryWriter(tmp_path / "run-alive.jsonl", metadata("run-alive", "run-alive", "still going"))
    live.iteration(iteration_record(1))
    dead = TrajectoryWriter(tmp_path / "run-dead.jsonl", metadata("run-dead", "run-dead", "orphaned"))
    dead.iteration(iteration_record(1))
    # The process that wrote it has ended: an identity whose pid is taken by nobody.
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    rewrite_metadata(dead.path, {**read_metadata(dead.path), "server": f"{finished.stdout.strip()}:1"})
    view = build_view(tmp_path, "run-dead")
    assert view["root"]["status"] == "failed" and view["root"]["error"] == SERVER_STOPPED
    assert view["running"] is False  # the page stops polling
    assert read_metadata(dead.path)["status"] == "running"  # shown, not rewritten: the next server settles it
    alive = build_view(tmp_path, "run-alive")
    assert alive["root"]["status"] == "running" and alive["running"] is True
    statuses = {summary["run_id"]: summary["status"] for summary in run_summaries(tmp_path)}
    assert statuses == {"run-dead": "failed", "run-alive": "running"}
    live.finish(status="completed")
