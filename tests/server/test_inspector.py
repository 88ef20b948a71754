"""rlm-mcp driven by a real third-party client: the MCP Inspector's CLI mode (Node 22).

tests/tools/install-inspector.sh puts Node 22 and the Inspector under .ci-cache/inspector (fast
when already there). Without npm the tests skip with the reason; in CI (CI=true) any failure to
install fails them instead. Every Inspector call starts its own ``rlm-mcp`` over stdio, so
handles and runs carry from one call to the next through the data dir, as they do for a host
that restarts the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import haystack
from tests.server.test_transports import REPO, RLM_MCP, TOKEN, TOOLS, free_port, server_env
from tests.support import unavailable

pytestmark = pytest.mark.inspector

INSTALLER = REPO / "tests" / "tools" / "install-inspector.sh"
INSTALL_TIMEOUT_S = 900
CALL_TIMEOUT_S = 120



@pytest.fixture(scope="module")
def inspector() -> list[str]:
    """The command that runs the Inspector: [node, launcher entry] (add --cli and arguments)."""
    bash = shutil.which("bash")
    if bash is None:
        unavailable("bash not found (tests/tools/install-inspector.sh needs it)")
    try:
        done = subprocess.run([bash, str(INSTALLER)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        unavailable(f"installing the Inspector took over {INSTALL_TIMEOUT_S} s")
    if done.returncode == 127:
        unavailable("npm not found: the MCP Inspector needs Node >= 22 from npm (tests/tools/install-inspector.sh)")
    if done.returncode != 0:
        unavailable(f"tests/tools/install-inspector.sh failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    node, entry = done.stdout.strip().splitlines()[-2:]
    assert Path(node).is_file() and Path(entry).is_file(), done.stdout
    return [node, entry]


@pytest.fixture
def run_inspector(inspector, tmp_path):
    """Run ``inspector --cli ...``; returns its parsed JSON output."""

    def run(*args: str) -> dict[str, Any]:
        # The catalog the Inspector keeps lives in the test's tmp dir, not in ~/.mcp-inspector.
        env = {**os.environ, "MCP_CATALOG_PATH": str(tmp_path / "inspector-catalog.json")}
        done = subprocess.run([*inspector, "--cli", *args], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=CALL_TIMEOUT_S)
        assert done.returncode == 0, f"{done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        return json.loads(done.stdout)

    return run


@pytest.fixture
def stdio_server(model_server, tmp_path) -> list[str]:
    """``-e`` options with what the server needs, then the command that starts it over stdio."""
    env = server_env(model_server, tmp_path / "home")
    keys = ("RLM_MCP_MODEL", "RLM_MCP_API_BASE", "OPENAI_API_KEY", "RLM_MCP_HOME", "LITELLM_LOCAL_MODEL_COST_MAP")
    options = [part for key in keys for part in ("-e", f"{key}={env[key]}")]
    return [*options, *RLM_MCP]


def call_tool(run_inspector: Any, server: list[str], tool: str, **arguments: Any) -> dict[str, Any]:
    tool_args = [f"{key}={value}" for key, value in arguments.items()]
    out = run_inspector(*server, "--method", "tools/call", "--tool-name", tool,
                        *(["--tool-arg", *tool_args] if tool_args else []))
    assert out["isError"] is False, out
    return out


def test_inspector_lists_all_eight_tools(run_inspector, stdio_server):
    listed = run_inspector(*stdio_server, "--method", "tools/list")
    tools = {tool["name"]: tool for tool in listed["tools"]}
    assert set(tools) == TOOLS
    assert all(tool["description"] and tool["inputSchema"]["type"] == "object" for tool in tools.values())
    assert tools["rlm_complete"]["annotations"]["openWorldHint"] is True


def test_inspector_loads_text_and_gets_a_handle(run_inspector, stdio_server):
    out = call_tool(run_inspector, stdio_server, "rlm_load_context", text="hello")
    handle = out["structuredContent"]["handle"]
    assert re.fullmatch(r"ctx_[0-9a-f]{16}", handle)
    assert handle in out["content"][0]["text"]
    assert out["structuredContent"]["characters"] == 5


def test_inspector_drives_load_complete_and_trajectory_across_server_restarts(run_inspector, stdio_server, tmp_path):
    path = tmp_path / "haystack.txt"
    path.write_text(haystack(900_000, "INSP-9"), encoding="utf-8")
    handle = call_tool(run_inspector, stdio_server, "rlm_load_context", path=str(path))["structuredContent"]["handle"]
    done = call_tool(run_inspector, stdio_server, "rlm_complete", handle=handle, query="What is the secret code?")
    assert (done["structuredContent"]["status"], done["structuredContent"]["answer"]) == ("completed", "INSP-9")
    run_id = done["structuredContent"]["run_id"]
    page = call_tool(run_inspector, stdio_server, "rlm_get_trajectory", run_id=run_id, limit=1)["structuredContent"]
    assert (page["run_id"], page["total_iterations"], page["next_offset"]) == (run_id, 2, 1)


def test_inspector_over_streamable_http_with_the_bearer_token(run_inspector, model_server, tmp_path):
    from tests.server.test_transports import Served

    port = free_port()
    served = Served(["--transport", "http", "--port", str(port)],
                    server_env(model_server, tmp_path / "home", RLM_MCP_AUTH_TOKEN=TOKEN))
    try:
        served.wait_ready()
        listed = run_inspector(f"http://127.0.0.1:{port}/mcp", "--transport", "http",
                               "--header", f"Authorization: Bearer {TOKEN}", "--method", "tools/list")
        assert {tool["name"] for tool in listed["tools"]} == TOOLS
    finally:
        served.stop()
