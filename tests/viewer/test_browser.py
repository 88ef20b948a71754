"""The viewer page in a real browser (Debian chromium driven by Playwright): static files, served
mode following a run in progress, and the MCP App inside a sandboxed iframe of a test host."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips (or fails, under CI=true) with the reason
    expect = None

from rlm_mcp.engine.trajectory import TrajectoryWriter
from rlm_mcp.testing.synthetic import HOSTILE as SYNTHETIC_HOSTILE
from rlm_mcp.testing.synthetic import write_run
from rlm_mcp.viewer import app_html, build_view, export_run, render_html, view_etag
from tests.viewer.conftest import HOSTILE, Viewer, iteration_record, metadata, tree_run

HOST_PAGE = Path(__file__).with_name("mcp_host.html")
WAIT_MS = 10_000


def static_page(tmp_path: Path, source: Path, run_id: str | None = None) -> Path:
    return export_run(build_view(source, run_id), tmp_path / "view.html")


def rows(page: Any, scope: str = "#main > .iters") -> int:
    return page.locator(f"{scope} .it-row").count()


def test_a_finished_run_shows_outcome_usage_charts_and_iterations(viewer: Viewer, engine_runs, tmp_path):
    run = engine_runs["finished"]
    viewer.open(static_page(tmp_path, run.directory, run.run_id))
    page = viewer.page
    assert page.locator("header .badge").first.inner_text() == "completed"
    assert page.locator("header pre.answer").inner_text() == "VIEW-7"
    assert "openai/needle" in page.locator("table.usage").inner_text()
    assert rows(page) == run.result.iterations
    assert page.locator(".charts svg").count() == 3 and page.locator(".charts rect").count() >= run.result.iterations
    # The engine records when each sub-call started: the in-flight chart is drawn, with its peak.
    inflight = page.locator(".inflight").inner_text()
    assert "Sub-calls in flight" in inflight and "peak" in inflight and "not available" not in inflight
    page.locator(".it-row").first.click()
    body = page.locator(".it-body").first
    assert "print" in body.locator("pre.code").first.inner_text()
    assert body.locator("pre.stdout").count() >= 1
    last = page.locator(".it-row").last
    last.click()
    assert page.locator(".calls .call").count() >= 1  # the needle search fans out sub-calls
    viewer.screenshot("finished-run")
    page.emulate_media(color_scheme="dark")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(21, 23, 27)"
    page.emulate_media(media="print", color_scheme="light")
    assert not page.locator("#toolbar").is_visible()
    viewer.assert_clean()


def test_a_failed_run_shows_its_error_and_what_ran_before(viewer: Viewer, engine_runs, tmp_path):
    run = engine_runs["failed"]
    viewer.open(static_page(tmp_path, run.directory, run.run_id))
    page = viewer.page
    assert page.locator("header .badge").first.inner_text() == "failed"
    assert run.result.error and page.locator("header pre.error").inner_text() == run.result.error
    assert rows(page) == 1
    page.locator(".it-row").first.click()
    assert page.locator("pre.stdout").inner_text().strip() == "before the failure"
    viewer.screenshot("failed-run")
    viewer.assert_clean()


def test_a_limit_and_a_failing_cell_are_flagged(viewer: Viewer, engine_runs, tmp_path):
    limit = engine_runs["limit"]
    viewer.open(static_page(tmp_path, limit.directory, limit.run_id))
    page = viewer.page
    assert page.locator("header .badge", has_text="limit: max_iterations").count() == 1
    assert page.locator(".flag", has_text="answer now").count() == 1
    steps = engine_runs["steps"]
    viewer.open(export_run(build_view(steps.directory, steps.run_id), tmp_path / "steps.html"))
    page.locator(".it-row").nth(2).click()
    assert "ZeroDivisionError" in page.locator(".it-body pre.stderr").inner_text()
    assert page.locator(".it-row").nth(2).locator(".flag.err").count() == 1
    viewer.assert_clean()


def test_child_rlms_expand_into_the_same_view(viewer: Viewer, engine_runs, tmp_path):
    run = engine_runs["children"]
    viewer.open(static_page(tmp_path, run.directory, run.run_id))
    page = viewer.page
    children = page.locator("#main > .children > .child")
    assert children.count() == 3
    children.first.locator(".child-row").click()
    child = children.first.locator(".child-body")
    assert child.locator(".it-row").count() >= 1 and child.locator(".charts svg").count() == 3
    child.locator(".it-row").first.click()
    assert child.locator(".it-body pre.code").count() >= 1
    # A sub-call that started a child links to it.
    page.locator("#main > .iters .it-row").last.click()
    page.locator("button", has_text="open child .2").click()
    assert children.nth(1).locator(".child-body .it-row").count() >= 1
    viewer.screenshot("children")
    viewer.assert_clean()


def test_search_finds_matches_and_opens_where_they_are(viewer: Viewer, engine_runs, tmp_path):
    steps = engine_runs["steps"]
    viewer.open(static_page(tmp_path, steps.directory, steps.run_id))
    page = viewer.page
    page.keyboard.press("/")
    page.keyboard.type("bravo-marker")
    page.wait_for_function("() => document.getElementById('search-count').textContent.includes('in 1 places')",
                           timeout=WAIT_MS)
    page.keyboard.press("Enter")
    # expect(...) retries until the page has acted on the key (a plain read races the handler).
    expect(page.locator("mark.current")).to_have_text("bravo-marker", timeout=WAIT_MS)
    expect(page.locator(".it.open")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator(".it.open .num")).to_have_text("#2", timeout=WAIT_MS)
    # Several places: Enter in the box goes to the first, then n / N step through them.
    page.fill("#search", "-marker")
    page.wait_for_function("() => document.getElementById('search-count').textContent.includes('in 2 places')",
                           timeout=WAIT_MS)
    page.keyboard.press("Enter")
    expect(page.locator("#search-count")).to_have_attribute("data-pos", "1", timeout=WAIT_MS)
    page.keyboard.press("Escape")  # leaves the box: letters are commands again
    page.keyboard.press("n")
    expect(page.locator("#search-count")).to_have_attribute("data-pos", "2", timeout=WAIT_MS)
    expect(page.locator("mark.current")).to_have_text("-marker", timeout=WAIT_MS)
    page.keyboard.press("N")
    expect(page.locator("#search-count")).to_have_attribute("data-pos", "1", timeout=WAIT_MS)
    # In a tree: a word only a grandchild printed opens the child, the grandchild and its iteration.
    viewer.open(export_run(build_view(tree_run(tmp_path / "tree")), tmp_path / "tree.html"))
    page.fill("#search", "xerus-word")
    page.wait_for_function("() => document.getElementById('search-count').textContent.includes('matches')",
                           timeout=WAIT_MS)
    page.locator("#results div").first.click()
    expect(page.locator("mark.current")).to_have_text("xerus-word", timeout=WAIT_MS)
    expect(page.locator(".child.open")).to_have_count(2, timeout=WAIT_MS)  # .2 and .2.3
    viewer.assert_clean()


def test_keyboard_moves_between_iterations_and_opens_them(viewer: Viewer, engine_runs, tmp_path):
    steps = engine_runs["steps"]
    viewer.open(static_page(tmp_path, steps.directory, steps.run_id))
    page = viewer.page

    def current() -> str:
        return page.evaluate("document.querySelector('.nav-row.current').dataset.key")

    page.keyboard.press("j")
    assert current().endswith("#0")
    page.keyboard.press("j")
    page.keyboard.press("ArrowDown")
    assert current().endswith("#2")
    page.keyboard.press("k")
    assert current().endswith("#1")
    page.keyboard.press("Enter")
    assert page.locator(".it.open").count() == 1 and "bravo-marker" in page.locator(".it.open pre.code").inner_text()
    page.keyboard.press("o")
    assert page.locator(".it.open").count() == 0
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "search"
    viewer.assert_clean()


def test_markup_in_code_output_and_answers_stays_text(viewer: Viewer, engine_runs, tmp_path):
    run = engine_runs["hostile"]
    viewer.open(static_page(tmp_path, run.directory, run.run_id))
    page = viewer.page
    for index in range(rows(page)):
        page.locator(".it-row").nth(index).click()
    text = page.locator("body").inner_text()
    assert HOSTILE in page.locator("header pre.answer").inner_text()
    assert text.count("<script>window.__pwned = 1</script>") >= 4  # query, prose, code, output, answer
    assert page.evaluate("window.__pwned") is None
    assert page.locator("script").count() == 3 and page.locator("img").count() == 0
    # The same through a synthetic run (hostile query, code and stdout in the first iteration).
    viewer.open(export_run(build_view(write_run(tmp_path / "synthetic", iterations=3, subcalls=6, children=1,
                                                hostile=True)), tmp_path / "synthetic.html"))
    page.locator(".it-row").first.click()
    assert SYNTHETIC_HOSTILE in page.locator(".it-body pre.stdout").first.inner_text()
    assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
    viewer.screenshot("hostile")
    viewer.assert_clean()


def test_sub_calls_in_flight_are_drawn_when_start_times_are_recorded(viewer: Viewer, tmp_path):
    path = write_run(tmp_path, iterations=20, subcalls=200, children=2, with_start_times=True)
    viewer.open(export_run(build_view(path), tmp_path / "flight.html"))
    chart = viewer.page.locator("header .inflight")
    assert chart.locator("polyline").count() == 1
    assert int(chart.get_attribute("data-peak")) > 1
    viewer.assert_clean()


# ----- served mode --------------------------------------------------------------------------------

class _Served:
    """The page at /, the view-model at /view.json with ETag / If-None-Match, like the server's routes."""

    def __init__(self, directory: Path, run_id: str) -> None:
        self.directory, self.run_id = directory, run_id
        self.answered = {200: 0, 304: 0}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def reply(self, status: int, body: bytes, kind: str, etag: str | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                if etag:
                    self.send_header("ETag", f'"{etag}"')
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/":
                    page = render_html(None, data_url="/view.json", poll_ms=200).encode()
                    self.reply(200, page, "text/html; charset=utf-8")
                elif self.path == "/view.json":
                    etag = view_etag(owner.directory, owner.run_id)
                    if self.headers.get("If-None-Match") == f'"{etag}"':
                        owner.answered[304] += 1
                        self.reply(304, b"", "application/json", etag)
                        return
                    view = build_view(owner.directory, owner.run_id)
                    owner.answered[200] += 1
                    self.reply(200, json.dumps(view).encode(), "application/json", view["etag"])
                else:
                    self.reply(404, b"not found", "text/plain")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_Served":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def running_run(tmp_path: Path) -> Iterator[tuple[TrajectoryWriter, Path]]:
    writer = TrajectoryWriter(tmp_path / "run-live.jsonl", metadata("run-live", "run-live", "A run still going"))
    writer.iteration(iteration_record(1, code="print('first')", stdout="first\n"))
    yield writer, tmp_path
    writer.finish(status="cancelled")


def test_a_run_in_progress_updates_itself_in_served_mode(viewer: Viewer, running_run):
    writer, directory = running_run
    page = viewer.page
    with _Served(directory, "run-live") as served:
        viewer.open(served.url)
        assert page.locator("header .badge").first.inner_text() == "running"
        assert rows(page) == 1 and page.get_attribute("html", "data-polling") == "on"
        page.locator(".it-row").first.click()  # an open iteration stays open across updates
        writer.iteration(iteration_record(2, code="print('second')", stdout="second\n"))
        page.wait_for_function("() => document.querySelectorAll('#main > .iters .it-row').length === 2",
                               timeout=WAIT_MS)
        assert page.locator(".it.open").count() == 1
        writer.finish(status="completed", answer="live-answer", limit=None, error=None, iterations=2, elapsed_s=3.0)
        page.wait_for_function("() => document.documentElement.dataset.polling === 'off'", timeout=WAIT_MS)
        assert page.locator("header pre.answer").inner_text() == "live-answer"
        assert page.locator("header .badge").first.inner_text() == "completed"
        assert served.answered[200] == 3  # first load, the new iteration, the end; unchanged polls got 304
        viewer.screenshot("served-finished")
    viewer.assert_clean()


# ----- MCP App ------------------------------------------------------------------------------------

def start_host(viewer: Viewer, views: list[dict[str, Any]], tool_result: dict[str, Any],
               tool_input: dict[str, Any] | None = None, theme: str = "dark") -> Any:
    page = viewer.page
    page.goto(HOST_PAGE.resolve().as_uri())
    page.evaluate("([html, config]) => startHost(html, config)",
                  [app_html(), {"views": views, "toolResult": tool_result, "theme": theme,
                                "toolInput": tool_input or {"query": "What is the secret code?", "handle": "ctx-1"}}])
    return page.frame_locator("#app")


def host_log(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("hostLog")


def test_the_mcp_app_renders_a_run_inside_a_sandboxed_host_frame(viewer: Viewer, engine_runs):
    run = engine_runs["children"]
    view = build_view(run.directory, run.run_id)
    result = {"content": [{"type": "text", "text": f"Run {run.run_id}: completed"}],
              "structuredContent": {"status": "completed", "run_id": run.run_id, "answer": "DEEP-3"}}
    app = start_host(viewer, [view], result)
    page = viewer.page
    app.locator("html[data-ready]").wait_for(timeout=WAIT_MS)
    assert app.locator("h1 .mono").inner_text() == run.run_id
    assert app.locator("header pre.answer").inner_text() == "DEEP-3"
    assert app.locator("#main > .children > .child").count() == 3
    log = host_log(page)
    methods = [m.get("method") for m in log]
    initialize = log[0]
    assert initialize["method"] == "ui/initialize" and initialize["params"]["protocolVersion"] == "2026-01-26"
    assert set(initialize["params"]) == {"appInfo", "appCapabilities", "protocolVersion"}
    assert methods.index("ui/notifications/initialized") < methods.index("tools/call")
    call = next(m for m in log if m.get("method") == "tools/call")
    assert call["params"] == {"name": "rlm_get_run_view", "arguments": {"run_id": run.run_id}}
    page.wait_for_function("() => hostSizes.length > 0 && hostSizes[hostSizes.length - 1].height > 300",
                           timeout=WAIT_MS)
    assert app.locator("html").get_attribute("data-theme") == "dark"  # the host's theme wins
    app.locator(".child-row").first.click()
    assert app.locator(".child.open .it-row").count() >= 1
    page.wait_for_function("() => document.getElementById('app').getBoundingClientRect().height > 600", timeout=WAIT_MS)
    # Forged messages from a frame that is not the host are ignored.
    renders = app.locator("html").evaluate("() => window.__rlmViewer.renders")
    forged = {"jsonrpc": "2.0", "method": "ui/notifications/tool-result",
              "params": {"structuredContent": {**view, "run_id": "run-forged"}}}
    page.evaluate("(forged) => attack(forged)", forged)
    page.wait_for_function("() => window.forgedSent === true", timeout=WAIT_MS)
    page.evaluate("pingApp(9001)")
    page.wait_for_function("() => window.lastReply && window.lastReply.id === 9001", timeout=WAIT_MS)
    assert app.locator("html").evaluate("() => window.__rlmViewer.renders") == renders
    assert app.locator("h1 .mono").inner_text() == run.run_id
    viewer.screenshot("mcp-app")
    viewer.assert_clean()


def test_the_mcp_app_follows_a_running_run_through_the_host(viewer: Viewer, tmp_path):
    writer = TrajectoryWriter(tmp_path / "run-app.jsonl", metadata("run-app", "run-app", "Following along"))
    writer.iteration(iteration_record(1))
    running = build_view(tmp_path, "run-app")
    writer.iteration(iteration_record(2))
    writer.finish(status="completed", answer="app-answer", limit=None, error=None, iterations=2, elapsed_s=2.0)
    finished = build_view(tmp_path, "run-app")
    assert running["running"] and not finished["running"]
    views = [running, running, finished]  # the second call finds nothing new
    app = start_host(viewer, views, {"content": [{"type": "text", "text": "running"}],
                                     "structuredContent": {"status": "running", "run_id": "run-app"}},
                     theme="light")
    app.locator("html[data-status=completed]").wait_for(timeout=WAIT_MS)
    assert app.locator("header pre.answer").inner_text() == "app-answer"
    assert app.locator("#main > .iters .it-row").count() == 2
    calls = [m for m in host_log(viewer.page) if m.get("method") == "tools/call"]
    assert len(calls) == 3 and calls[1]["params"]["arguments"]["etag"] == running["etag"]
    assert app.locator("html").get_attribute("data-polling") == "off"
    viewer.assert_clean()


def test_the_mcp_app_renders_a_view_model_given_as_the_tool_result(viewer: Viewer, tmp_path):
    view = build_view(tree_run(tmp_path))
    app = start_host(viewer, [], {"content": [{"type": "text", "text": "view"}], "structuredContent": view})
    app.locator("html[data-ready]").wait_for(timeout=WAIT_MS)
    assert app.locator("#main > .children > .child").count() == 2
    assert not [m for m in host_log(viewer.page) if m.get("method") == "tools/call"]
    viewer.assert_clean()


def test_markup_reaching_the_mcp_app_through_the_host_stays_text(viewer: Viewer, engine_runs):
    run = engine_runs["hostile"]
    view = build_view(run.directory, run.run_id)
    app = start_host(viewer, [view], {"content": [{"type": "text", "text": HOSTILE}],
                                      "structuredContent": {"status": "completed", "run_id": run.run_id}},
                     tool_input={"query": HOSTILE})
    app.locator("html[data-ready]").wait_for(timeout=WAIT_MS)
    app.locator(".it-row").first.click()
    assert HOSTILE in app.locator("header pre.query").inner_text()
    assert HOSTILE in app.locator(".it-body .prose").inner_text()
    assert app.locator("html").evaluate("() => window.__pwned") is None
    assert app.locator("img").count() == 0 and app.locator("script").count() == 3
    viewer.assert_clean()


def test_the_mcp_app_shows_a_tool_error_instead_of_a_run(viewer: Viewer):
    error = {"isError": True, "content": [{"type": "text", "text": "no trajectory for run_id 'x'"}]}
    app = start_host(viewer, [], error)
    app.locator("#problem").wait_for(timeout=WAIT_MS)
    assert "no trajectory for run_id 'x'" in app.locator("#problem").inner_text()
    viewer.assert_clean()
