"""The README's host snippets parse as each host's configuration shape, and the Claude Desktop
example file is the block the README shows, byte for byte."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from tests.server.test_transports import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"\n### {title}\n")
    end = README.find("\n#", start + 5)
    return README[start:end]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def stdio_server(entry: dict[str, Any]) -> None:
    assert entry["command"] == "rlm-mcp"
    assert isinstance(entry.get("args", []), list)
    env = entry.get("env", {})
    assert isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
    assert env["RLM_MCP_MODEL"]


def test_the_claude_desktop_block_is_the_example_file_byte_for_byte():
    [shown] = blocks(section("Claude Desktop"), "json")
    example = (REPO / "claude_desktop_config.example.json").read_text(encoding="utf-8")
    assert shown == example
    stdio_server(json.loads(example)["mcpServers"]["rlm"])


def test_the_cursor_snippet_is_a_cursor_mcp_json():
    [shown] = blocks(section("Cursor"), "json")
    config = json.loads(shown)
    assert set(config) == {"mcpServers"}
    stdio_server(config["mcpServers"]["rlm"])
    assert ".cursor/mcp.json" in section("Cursor")


def test_the_vs_code_snippet_uses_servers_with_a_type():
    [shown] = blocks(section("VS Code"), "json")
    config = json.loads(shown)
    assert set(config) == {"servers"}
    entry = config["servers"]["rlm"]
    assert entry["type"] == "stdio"
    stdio_server(entry)
    assert ".vscode/mcp.json" in section("VS Code")


def test_the_claude_code_command_is_a_well_formed_mcp_add():
    [shown] = blocks(section("Claude Code"), "bash")
    words = shlex.split(shown.strip())
    assert words[:4] == ["claude", "mcp", "add", "rlm"]
    separator = words.index("--")
    assert words[separator + 1:] == ["rlm-mcp"]
    options = words[4:separator]
    assert options[0::2] == ["-e"] * (len(options) // 2) and len(options) % 2 == 0
    env = dict(value.split("=", 1) for value in options[1::2])
    assert env["RLM_MCP_MODEL"]


async def test_tool_input_schemas_carry_descriptions_but_not_the_titles_pydantic_derives_from_names(tmp_path):
    """Hosts put every input schema into the model's prompt: "Max Bytes" next to max_bytes is noise."""
    import json as _json

    from rlm_mcp.config import Settings
    from rlm_mcp.server.tools import build_server
    from rlm_mcp.services import Services

    services = Services.create(Settings(home=tmp_path, model="openai/needle"))
    try:
        tools = await build_server(services).list_tools()
    finally:
        await services.aclose()
    load = next(tool for tool in tools if tool.name == "rlm_load_context").input_schema
    assert load["properties"]["max_bytes"]["description"] and load["type"] == "object"
    assert all('"title"' not in _json.dumps(tool.input_schema) for tool in tools), [t.name for t in tools]
