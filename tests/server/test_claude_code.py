"""rlm-mcp inside a real MCP host: the Claude Code CLI (pinned npm version, headless ``claude -p``).

tests/tools/install-claude-code.sh puts Node 22 and the CLI under .ci-cache/claude-code. The
CLI's model is rlm_mcp/testing/anthropic_server.py on 127.0.0.1, a scripted Messages API that
plays a host agent (load, complete, poll, page the trajectory, answer) and parses each tool
result as Claude Code delivers it. rlm-mcp runs as the CLI's stdio MCP server, its own models on
the scripted OpenAI-compatible server. Every CLI run is traced with strace: no process of the
tree (the CLI, rlm-mcp, its sandbox) may connect anywhere but those two servers, nor try DNS.

Without npm or strace the tests skip with the reason; under CI=true they fail instead.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from rlm_mcp.testing.anthropic_server import ANSWER_PREFIX, HostAgent, ScriptedAnthropicServer, conversation
from rlm_mcp.testing.model_server import ScriptedModelServer, secret_needle
from rlm_mcp.viewer import VIEW_TOOL
from tests.conftest import haystack
from tests.server.test_transports import REPO, RLM_MCP, TOOLS, server_env
from tests.support import unavailable

pytestmark = pytest.mark.claude_code

INSTALLER = REPO / "tests" / "tools" / "install-claude-code.sh"
INSTALL_TIMEOUT_S = 900
CLI_TIMEOUT_S = 240
CODE = "CC-4217"
QUESTION = "What is the secret code?"
# What Claude Code needs to talk to nothing but the endpoint it is given.
QUIET = {"DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
         "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
# The viewer's data tool is app-only (_meta ui.visibility ["app"]): Claude Code does not offer it.
MCP_TOOLS = {f"mcp__rlm__{name}" for name in TOOLS if name != VIEW_TOOL}



@pytest.fixture(scope="module")
def claude() -> str:
    """The pinned Claude Code binary (installed on first use)."""
    bash = shutil.which("bash")
    if bash is None:
        unavailable("bash not found (tests/tools/install-claude-code.sh needs it)")
    try:
        done = subprocess.run([bash, str(INSTALLER)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        unavailable(f"installing Claude Code took over {INSTALL_TIMEOUT_S} s")
    if done.returncode == 127:
        unavailable("npm not found: Claude Code comes from npm (tests/tools/install-claude-code.sh)")
    if done.returncode != 0:
        unavailable(f"tests/tools/install-claude-code.sh failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    binary = done.stdout.strip().splitlines()[-1]
    assert Path(binary).is_file(), done.stdout
    return binary


@pytest.fixture(scope="module")
def strace(claude: str) -> str:
    """strace, which the Claude Code installer adds when it is missing (hence the dependency)."""
    path = shutil.which("strace")
    if path is None:
        unavailable("strace not found: it proves that no connection leaves 127.0.0.1 "
                    "(tests/tools/install-claude-code.sh installs it with apt-get)")
    return path


# ----- the network check ----------------------------------------------------------------------

SOCKADDR = re.compile(r'sa_family=(AF_INET6?), sin6?_port=htons\((\d+)\), '
                      r'(?:sin_addr=inet_addr\("([^"]+)"\)|sin6_flowinfo=[^,]+, inet_pton\(AF_INET6, "([^"]+)")')


@dataclass(frozen=True)
class Destination:
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.address)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return address.is_loopback


def destinations(strace_log: str) -> set[Destination]:
    """Every IPv4/IPv6 address a traced process connected or sent a datagram to."""
    found = set()
    for line in strace_log.splitlines():
        if not re.search(r"\b(connect|sendto|sendmsg|sendmmsg)\(", line):
            continue
        for family, port, v4, v6 in SOCKADDR.findall(line):
            found.add(Destination(v4 or v6, int(port)))
    return found


def traced(strace: str, log: Path, command: list[str]) -> list[str]:
    return [strace, "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-e", "signal=none",
            "-o", str(log), *command]


def assert_only_reached(log: Path, allowed_ports: set[int]) -> set[Destination]:
    reached = destinations(log.read_text(errors="replace"))
    stray = {d for d in reached if not d.loopback or d.port not in allowed_ports or d.port == 53}
    assert not stray, f"connections beyond the scripted servers on 127.0.0.1 ({sorted(allowed_ports)}): {stray}"
    return reached


def test_the_network_check_sees_a_connection_attempt_outside_loopback(strace, tmp_path):
    """The detector itself: an attempt to reach a TEST-NET address (which fails) is caught."""
    log = tmp_path / "strace.log"
    probe = ("import socket; s = socket.socket(); s.settimeout(0.2)\n"
             "try: s.connect(('192.0.2.7', 9))\nexcept OSError: pass")
    subprocess.run(traced(strace, log, [shutil.which("python3") or "python3", "-c", probe]), check=True, timeout=60)
    assert Destination("192.0.2.7", 9) in destinations(log.read_text())
    with pytest.raises(AssertionError, match="192.0.2.7"):
        assert_only_reached(log, {9})


# ----- the host run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_models() -> Iterator[ScriptedModelServer]:
    """Model calls take 0.2 s each, so a run is still going when rlm_complete(wait_s=0) returns."""
    with ScriptedModelServer(latency_s=0.2) as server:
        yield server


@dataclass
class HostRun:
    result: dict[str, Any]
    events: list[dict[str, Any]]
    api: ScriptedAnthropicServer
    reached: set[Destination]
    stderr: str


def host_env(home: Path, api: ScriptedAnthropicServer, **extra: str) -> dict[str, str]:
    """A clean environment: a private HOME and config dir, the scripted endpoint, no telemetry."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "CLAUDE_CONFIG_DIR": str(home / ".claude"), "LANG": "C.UTF-8",
           "ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "sk-ant-test-not-a-real-key", **QUIET}
    env.update(extra)
    home.mkdir(parents=True, exist_ok=True)
    return env


def mcp_config(models: ScriptedModelServer, tmp_path: Path) -> Path:
    keys = ("RLM_MCP_MODEL", "RLM_MCP_API_BASE", "OPENAI_API_KEY", "RLM_MCP_HOME", "LITELLM_LOCAL_MODEL_COST_MAP")
    env = server_env(models, tmp_path / "rlm-home")
    config = {"mcpServers": {"rlm": {"command": RLM_MCP[0], "args": RLM_MCP[1:], "env": {k: env[k] for k in keys}}}}
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def run_host(claude: str, strace: str, models: ScriptedModelServer, tmp_path: Path, **env: str) -> HostRun:
    """``claude -p`` with rlm-mcp as its only MCP server, asked about a 900,000-character file."""
    document = tmp_path / "haystack.txt"
    document.write_text(haystack(900_000, CODE), encoding="utf-8")
    prompt = f"Answer a question about a large file with the rlm tools.\nFILE: {document}\nQUESTION: {QUESTION}"
    log = tmp_path / "strace.log"
    with ScriptedAnthropicServer(HostAgent(wait_s=0, poll_wait_s=60)) as api:
        command = [claude, "-p", prompt, "--output-format", "stream-json", "--verbose",
                   "--mcp-config", str(mcp_config(models, tmp_path)), "--strict-mcp-config",
                   "--allowedTools", "mcp__rlm__*"]
        done = subprocess.run(traced(strace, log, command), env=host_env(tmp_path / "home", api, **env),
                              cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, f"claude exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    results = [e for e in events if e.get("type") == "result"]
    assert len(results) == 1, done.stdout[-3000:]
    api_port = int(api.base_url.rsplit(":", 1)[1])
    model_port = int(models.api_base.split(":")[2].split("/")[0])
    reached = assert_only_reached(log, {api_port, model_port})
    return HostRun(results[0], events, api, reached, done.stderr)


def agent_calls(run: HostRun) -> list[tuple[str, dict[str, Any]]]:
    """The tool calls the scripted agent made, in order, from the last request Claude Code sent."""
    last = run.api.agent_requests()[-1]
    return [(block["name"], block["input"]) for message in last["messages"] if isinstance(message["content"], list)
            for block in message["content"] if block.get("type") == "tool_use"]


async def advertised_tools(models: ScriptedModelServer, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """tools/list straight from rlm-mcp over stdio (the SDK client), by name."""
    params = StdioServerParameters(command=RLM_MCP[0], args=RLM_MCP[1:], cwd=str(REPO),
                                   env=server_env(models, tmp_path / "rlm-home"))
    with (tmp_path / "list.stderr").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=60) as client:
            listed = await client.list_tools()
    return {tool.name: tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in listed.tools}


@pytest.fixture(scope="module")
def direct_run(claude, strace, slow_models, tmp_path_factory) -> HostRun:
    """One run with tool search off: Claude Code sends our tools with every request."""
    return run_host(claude, strace, slow_models, tmp_path_factory.mktemp("direct"), ENABLE_TOOL_SEARCH="false")


def test_claude_code_drives_load_complete_poll_and_trajectory_to_the_right_answer(direct_run):
    assert direct_run.result["subtype"] == "success" and direct_run.result["is_error"] is False
    assert direct_run.result["result"] == ANSWER_PREFIX + CODE
    calls = agent_calls(direct_run)
    names = [name.removeprefix("mcp__rlm__") for name, _ in calls]
    # wait_s=0 returns while the run is going, so the agent polls before reading 2 trajectory pages.
    assert names[:2] == ["rlm_load_context", "rlm_complete"]
    assert names[2:-2] and set(names[2:-2]) == {"rlm_get_result"}
    assert names[-2:] == ["rlm_get_trajectory", "rlm_get_trajectory"]
    assert [args["offset"] for name, args in calls if name.endswith("rlm_get_trajectory")] == [0, 1]
    assert direct_run.api.unknown_routes == []


async def test_claude_code_offers_every_tool_with_the_servers_description_and_input_schema(
        direct_run, slow_models, tmp_path):
    first = direct_run.api.agent_requests()[0]
    offered = {tool["name"]: tool for tool in first["tools"] if tool["name"].startswith("mcp__rlm__")}
    assert set(offered) == MCP_TOOLS
    ours = await advertised_tools(slow_models, tmp_path)
    for name, tool in offered.items():
        mine = ours[name.removeprefix("mcp__rlm__")]
        # The model gets name, description and input schema; title, annotations, output schema
        # and _meta stay with the host.
        assert set(tool) == {"name", "description", "input_schema"}, tool
        assert tool["description"] == mine["description"]
        assert tool["input_schema"] == mine["inputSchema"]
        assert mine.get("title") and mine.get("annotations") and mine.get("outputSchema")
    # The server's instructions do reach the model: in a role "system" message of the conversation.
    carriers = [m for m in first["messages"] if "MCP Server Instructions" in json.dumps(m)]
    assert [m["role"] for m in carriers] == ["system"]
    assert "rlm_load_context" in json.dumps(carriers[0])


def test_claude_code_gives_the_model_the_structured_content_as_json_and_not_the_text_summary(direct_run):
    seen = conversation(direct_run.api.agent_requests()[-1]["messages"])
    assert [o.parse_error for o in seen] == [None] * len(seen)
    load = next(o for o in seen if o.tool.endswith("rlm_load_context"))
    assert load.parsed["handle"].startswith("ctx_") and load.parsed["characters"] == 900_000 + len(secret_needle(CODE))
    assert "Loaded context" not in load.raw  # the text summary (and its "Next:" hint) is not shown
    first_complete = next(o for o in seen if o.tool.endswith("rlm_complete")).parsed
    assert first_complete["status"] in ("running", "queued") and first_complete["next_step"]
    final = [o.parsed for o in seen if o.tool.endswith("rlm_get_result")][-1]
    assert (final["status"], final["answer"]) == ("completed", CODE)


def test_every_result_the_model_sees_says_what_to_call_next(direct_run):
    """The text summaries never reach the model, so the structured content carries the next call."""
    seen = conversation(direct_run.api.agent_requests()[-1]["messages"])
    load = next(o.parsed for o in seen if o.tool.endswith("rlm_load_context"))
    assert f"rlm_complete(query=<your question>, handle={load['handle']!r})" in load["next_step"]
    run_id = next(o.parsed for o in seen if o.tool.endswith("rlm_complete"))["run_id"]
    final = [o.parsed for o in seen if o.tool.endswith("rlm_get_result")][-1]
    assert final["next_step"].startswith("the answer is final") and f"rlm_get_trajectory(run_id={run_id!r})" in final["next_step"]
    assert isinstance(final["notes"], list)
    pages = [o.parsed for o in seen if o.tool.endswith("rlm_get_trajectory")]
    assert pages[0]["next_step"] == (f"rlm_get_trajectory(run_id={run_id!r}, offset=1, limit=1, detail='summary') "
                                     "shows the next iterations")
    assert pages[-1]["next_offset"] is None and pages[-1]["next_step"].startswith("last page")


def test_claude_code_and_rlm_mcp_reach_nothing_but_the_two_scripted_servers(direct_run, slow_models):
    ports = {d.port for d in direct_run.reached}
    model_port = int(slow_models.api_base.split(":")[2].split("/")[0])
    # Both servers were really used through the traced processes (the check saw the traffic).
    assert int(direct_run.api.base_url.rsplit(":", 1)[1]) in ports and model_port in ports


def test_with_tool_search_on_the_agent_loads_the_rlm_tools_by_name_and_answers(claude, strace, slow_models, tmp_path):
    """Claude Code's default: MCP tools are deferred; the model must load them with ToolSearch."""
    run = run_host(claude, strace, slow_models, tmp_path, ENABLE_TOOL_SEARCH="true")
    assert run.result["result"] == ANSWER_PREFIX + CODE
    requests = [r.body for r in run.api.requests if isinstance(r.body, dict) and r.body.get("tools")]
    first_tools = {t["name"] for t in requests[0]["tools"]}
    assert "ToolSearch" in first_tools and not first_tools & MCP_TOOLS  # deferred: listed by name only
    assert all(name in json.dumps(requests[0]["system"]) + json.dumps(requests[0]["messages"]) for name in MCP_TOOLS)
    search = next(block for message in requests[-1]["messages"] if isinstance(message["content"], list)
                  for block in message["content"] if block.get("type") == "tool_use" and block["name"] == "ToolSearch")
    assert search["input"]["query"].startswith("select:") and "mcp__rlm__rlm_complete" in search["input"]["query"]


def test_claude_mcp_add_then_list_reports_rlm_connected_and_a_misconfigured_server_failed(claude, strace, tmp_path):
    with ScriptedAnthropicServer() as api:
        env = host_env(tmp_path / "home", api)
        project = tmp_path / "project"
        project.mkdir()

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([claude, *args], env=env, cwd=project, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=CLI_TIMEOUT_S)

        rlm_env = ["-e", "RLM_MCP_MODEL=openai/needle", "-e", f"RLM_MCP_HOME={tmp_path / 'rlm-home'}",
                   "-e", "LITELLM_LOCAL_MODEL_COST_MAP=True"]
        added = cli("mcp", "add", "rlm", *rlm_env, "--", *RLM_MCP)
        assert added.returncode == 0, added.stderr
        broken = cli("mcp", "add", "rlm-broken", *rlm_env, "-e", "RLM_MCP_SANDBOX=nowhere", "--", *RLM_MCP)
        assert broken.returncode == 0, broken.stderr
        log = tmp_path / "strace.log"
        listed = subprocess.run(traced(strace, log, [claude, "mcp", "list"]), env=env, cwd=project,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=CLI_TIMEOUT_S)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split(":", 1)[0]: line for line in listed.stdout.splitlines() if ":" in line}
    assert "Connected" in lines["rlm"] and RLM_MCP[0] in lines["rlm"], listed.stdout
    assert "Connected" not in lines["rlm-broken"] and "Failed" in lines["rlm-broken"], listed.stdout
    assert_only_reached(log, set())  # a health check talks to the servers over stdio only
