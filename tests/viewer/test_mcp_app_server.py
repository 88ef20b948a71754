"""The MCP App as the server offers it: the ``ui://`` resource and the tools' ``_meta`` seen through
the SDK's real client, and the tool results of a real run rendered by the app inside the test host
page (tests/viewer/mcp_host.html) in chromium."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from mcp import Client

from rlm_mcp.config import Settings
from rlm_mcp.server import Services, build_server
from rlm_mcp.viewer import APP_RESOURCE_URI, MCP_APP_MIME, VIEW_FORMAT, app_html
from tests.conftest import haystack
from tests.viewer.conftest import Viewer
from tests.viewer.test_browser import WAIT_MS, host_log, start_host

UI_TOOLS = ("rlm_complete", "rlm_get_result", "rlm_get_trajectory")


async def _session(settings: Settings) -> dict[str, Any]:
    """One stdio-like session (no viewer URL known): what a host would see and fetch."""
    services = Services.create(settings)
    try:
        async with Client(build_server(services), read_timeout_seconds=120) as client:
            resources = (await client.list_resources()).resources
            read = await client.read_resource(APP_RESOURCE_URI)
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            loaded = await client.call_tool("rlm_load_context", {"text": haystack(400_000, "APP-4")})
            done = await client.call_tool("rlm_complete", {"query": "What is the secret code?", "wait_s": 120,
                                                           "handle": loaded.structured_content["handle"]})
            run_id = done.structured_content["run_id"]
            result = await client.call_tool("rlm_get_result", {"run_id": run_id, "wait_s": 0})
            trajectory = await client.call_tool("rlm_get_trajectory", {"run_id": run_id})
            view = await client.call_tool("rlm_get_run_view", {"run_id": run_id})
            again = await client.call_tool("rlm_get_run_view", {"run_id": run_id,
                                                                "etag": view.structured_content["etag"]})
            hostile = await client.call_tool("rlm_get_run_view", {"run_id": "../../etc/passwd"})
            return {"resources": resources, "read": read, "tools": tools, "done": done, "result": result,
                    "trajectory": trajectory, "view": view, "again": again, "hostile": hostile}
    finally:
        await services.aclose()


def _in_thread(settings: Settings) -> dict[str, Any]:
    # Playwright's sync API keeps an event loop marked running in the test's thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _session(settings)).result(timeout=300)


def test_the_server_offers_the_app_resource_links_it_from_its_tools_and_renders_a_real_run(
        settings: Settings, viewer: Viewer):
    seen = _in_thread(settings)
    # The resource: listed with the MCP Apps MIME type, read back as the app's HTML.
    (resource,) = [r for r in seen["resources"] if str(r.uri) == APP_RESOURCE_URI]
    assert resource.mime_type == MCP_APP_MIME == "text/html;profile=mcp-app"
    (content,) = seen["read"].contents
    assert content.mime_type == MCP_APP_MIME and content.text == app_html()
    assert content.meta == {"ui": {"prefersBorder": True}}
    # The tools that show a run link the app; the app's data tool is for the app only.
    for name in UI_TOOLS:
        assert seen["tools"][name].meta["ui"] == {"resourceUri": APP_RESOURCE_URI}, name
    view_tool = seen["tools"]["rlm_get_run_view"]
    assert view_tool.meta["ui"] == {"resourceUri": APP_RESOURCE_URI, "visibility": ["app"]}
    assert "ui" not in (seen["tools"]["rlm_load_context"].meta or {})
    # Results are unchanged for hosts without the extension, plus the command that shows the run.
    done = seen["done"].structured_content
    assert done["status"] == "completed" and "APP-4" in done["answer"]
    assert done["view_command"] == f"rlm-mcp view {done['run_id']}" and done.get("view_url") is None
    assert seen["trajectory"].structured_content["view_command"] == done["view_command"]
    assert seen["result"].structured_content["view_command"] == done["view_command"]
    # The view tool: the view-model, then "unchanged" for the same etag; bad ids are refused.
    view = seen["view"].structured_content
    assert view["format"] == VIEW_FORMAT and view["run_id"] == done["run_id"] and view["running"] is False
    assert view["root"]["answer"] == done["answer"]
    assert seen["again"].structured_content == {"run_id": done["run_id"], "etag": view["etag"], "unchanged": True}
    assert seen["hostile"].is_error and "is not a run id" in seen["hostile"].content[0].text

    # The host page gets exactly what the server returned: rlm_complete's result, then the view.
    tool_result = {"content": [c.model_dump(mode="json", by_alias=True, exclude_none=True)
                               for c in seen["done"].content],
                   "structuredContent": done}
    app = start_host(viewer, [view], tool_result)
    app.locator("html[data-ready]").wait_for(timeout=WAIT_MS)
    assert app.locator("h1 .mono").inner_text() == done["run_id"]
    assert app.locator("header pre.answer").inner_text() == done["answer"]
    assert app.locator("header .badge").first.inner_text() == "completed"
    assert app.locator("#main > .iters .it-row").count() == len(view["root"]["iterations"])
    call = next(m for m in host_log(viewer.page) if m.get("method") == "tools/call")
    assert call["params"] == {"name": "rlm_get_run_view", "arguments": {"run_id": done["run_id"]}}
    viewer.screenshot("mcp-app-real-server")
    viewer.assert_clean()
