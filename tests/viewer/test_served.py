"""The viewer served by ``rlm-mcp serve --transport http`` next to ``/mcp``: the walls (token, the
/runs-only cookie, Host and Origin) over real HTTP, and a run in progress followed in chromium."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from rlm_mcp.server.pages import cookie_value
from rlm_mcp.testing.model_server import ScriptedModelServer
from tests.server.test_transports import TOKEN, Served, bearer_client, free_port, server_env
from tests.viewer.conftest import Viewer, repl

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips (or fails, under CI=true) with the reason
    expect = None

WAIT_S = 60


@pytest.fixture
def served(model_server: ScriptedModelServer, tmp_path: Path) -> Iterator[tuple[Served, str]]:
    port = free_port()
    server = Served(["--transport", "http", "--port", str(port)],
                    server_env(model_server, tmp_path / "home", RLM_MCP_AUTH_TOKEN=TOKEN)).wait_ready()
    yield server, f"http://127.0.0.1:{port}"
    server.stop()


def call_tools(base: str, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Tool calls through the SDK's streamable HTTP client with the token, in a thread of their
    own (Playwright's sync API keeps an event loop marked running in the test's thread)."""
    async def run() -> list[Any]:
        async with bearer_client(TOKEN) as http:
            async with Client(streamable_http_client(f"{base}/mcp", http_client=http),
                              read_timeout_seconds=WAIT_S) as client:
                results = []
                for name, arguments in calls:
                    result = await client.call_tool(name, arguments)
                    assert not result.is_error, result.content[0].text
                    results.append(result)
                return results

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(timeout=WAIT_S * 2)


def test_run_pages_refuse_no_token_a_wrong_token_a_foreign_host_and_a_foreign_origin(served):
    server, base = served
    port = urlsplit(base).port
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, timeout=30, follow_redirects=False) as http:
        missing = http.get("/runs")
        assert missing.status_code == 401 and "?token=" in missing.text
        assert http.get("/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/runs/run-20260101-120000-abcdef", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/runs?token=wrong").status_code == 401
        assert http.get("/runs", headers={"Cookie": f"rlm_mcp_runs_{port}={cookie_value('other-token')}"}).status_code == 401
        assert http.get("/runs", headers={"Cookie": f"rlm_mcp_runs_{port}={TOKEN}"}).status_code == 401  # not the token
        # The right token, from an address that is not this server's: DNS rebinding, a foreign page.
        foreign_host = http.get("/runs", headers={**bearer, "Host": f"evil.example:{port}"})
        assert foreign_host.status_code == 403 and "DNS rebinding" in foreign_host.text
        foreign_origin = http.get("/runs", headers={**bearer, "Origin": "http://evil.example"})
        assert foreign_origin.status_code == 403
        assert http.get("/runs", headers={**bearer, "Origin": "null"}).status_code == 403
        # Accepted: the header, and the cookie the link's ?token= is traded for.
        listed = http.get("/runs", headers=bearer)
        assert listed.status_code == 200 and "No runs yet" in listed.text
        assert http.get("/runs", headers={**bearer, "Origin": base}).status_code == 200
        traded = http.get("/runs?token=" + TOKEN)
        assert traded.status_code == 303 and traded.headers["location"] == "/runs"
        cookie = traded.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/runs" in cookie
        assert TOKEN not in cookie
        jar = {f"rlm_mcp_runs_{port}": cookie_value(TOKEN)}
        assert http.get("/runs", cookies=jar).status_code == 200
        # The cookie opens the read-only pages only: /mcp stays header-only.
        mcp = http.post("/mcp", cookies=jar, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                        headers={"Accept": "application/json, text/event-stream"})
        assert mcp.status_code == 401
        # Read-only, and run ids cannot leave the trajectory directory.
        assert http.post("/runs", headers=bearer).status_code == 405
        assert http.get("/runs/..%2F..%2Fetc%2Fpasswd", headers=bearer).status_code == 404
        unknown = http.get("/runs/run-20260101-120000-abcdef", headers=bearer)
        assert unknown.status_code == 404 and "/runs lists" in unknown.text
    assert "Traceback" not in server.log, server.log


def test_a_served_run_in_progress_renders_in_chromium_and_updates_to_its_answer(served, model_server, viewer: Viewer):
    server, base = served
    reached, gate = threading.Event(), threading.Event()

    def held(messages: list[dict[str, Any]]) -> str:
        reached.set()  # the first iteration is in the trajectory: the run is visibly in progress
        assert gate.wait(WAIT_S), "the test never released the run"
        return "Second look.\n" + repl("print('live-second')")

    model_server.script("viewer-live", ["First look.\n" + repl("print('live-first')"), held, "FINAL(live-answer)"])
    try:
        (started,) = call_tools(base, [("rlm_complete", {"query": "Follow me", "context": "x",
                                                         "model": "openai/viewer-live", "wait_s": 0})])
        result = started.structured_content
        assert result["status"] in ("running", "queued")
        view_url = result["view_url"]
        assert view_url == f"{base}/runs/{result['run_id']}" and result.get("view_command") is None
        assert reached.wait(WAIT_S), server.log
        page = viewer.page
        refused = page.goto(view_url)
        assert refused is not None and refused.status == 401
        viewer.problems.clear()  # the 401 is logged by the browser as a failed resource: expected
        viewer.open(f"{view_url}?token={TOKEN}")
        assert page.url == view_url  # the token left the address bar
        (cookie,) = page.context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/runs"
        expect(page.locator("header .badge").first).to_have_text("running", timeout=WAIT_S * 1000)
        expect(page.locator("#main > .iters .it-row")).to_have_count(1)
        assert page.get_attribute("html", "data-polling") == "on"
        gate.set()
        page.wait_for_function("() => document.documentElement.dataset.polling === 'off'", timeout=WAIT_S * 1000)
        expect(page.locator("header pre.answer")).to_have_text("live-answer")
        expect(page.locator("header .badge").first).to_have_text("completed")
        expect(page.locator("#main > .iters .it-row")).to_have_count(3)
        viewer.screenshot("served-over-http")
        viewer.assert_clean()
        # The list page links the run; the trajectory tool carries the same URL.
        page.goto(f"{base}/runs")
        expect(page.locator(f"a[href='/runs/{result['run_id']}']")).to_have_count(1)
        (trajectory,) = call_tools(base, [("rlm_get_trajectory", {"run_id": result["run_id"]})])
        assert trajectory.structured_content["view_url"] == view_url
    finally:
        gate.set()
