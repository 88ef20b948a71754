"""rlm-mcp end to end: the ``rlm-mcp`` command launched over stdio, driven with the MCP SDK's
client, as an MCP host would; plus a raw JSON-RPC timing of start-up to ``initialize``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.common import cmdline, children, vmhwm_kb

CALL_TIMEOUT_S = 900.0


def rlm_mcp_command() -> str:
    """The ``rlm-mcp`` console script of this interpreter (not a pyenv shim, whose own start-up
    would be counted)."""
    local = Path(sys.executable).parent / "rlm-mcp"
    if local.exists():
        return str(local)
    found = shutil.which("rlm-mcp")
    if not found:
        raise RuntimeError("the rlm-mcp command is not installed: pip install -e .")
    return found


def server_env(api_base: str, home: Path, model: str = "openai/needle", **extra: str) -> dict[str, str]:
    env = {
        "RLM_MCP_MODEL": model,
        "RLM_MCP_API_BASE": api_base,
        "OPENAI_API_KEY": "sk-bench",
        "RLM_MCP_HOME": str(home),
        "RLM_MCP_LOG_LEVEL": "WARNING",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no cost-map download at start-up
        "PATH": os.environ.get("PATH", ""),
    }
    env.update(extra)
    return env


class McpServer:
    """One ``rlm-mcp`` stdio server process and a connected SDK client."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.pid: int | None = None
        self.client: Any = None
        self.start_s: float | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[McpServer]:
        from mcp import Client, StdioServerParameters

        before = set(children(os.getpid()))
        params = StdioServerParameters(command=rlm_mcp_command(), args=[], env=self.env)
        began = time.perf_counter()
        async with Client(params, read_timeout_seconds=CALL_TIMEOUT_S) as client:
            self.start_s = time.perf_counter() - began
            self.client = client
            self.pid = self._find_pid(before)
            yield self

    @staticmethod
    def _find_pid(before: set[int]) -> int | None:
        for pid in children(os.getpid()):
            if pid not in before and "rlm-mcp" in cmdline(pid):
                return pid
        return None

    def peak_mb(self) -> float | None:
        kb = vmhwm_kb(self.pid) if self.pid else None
        return kb / 1024 if kb else None

    async def prepare_client(self, *tools: str) -> None:
        """Pay before timing what the MCP client (not the server) pays on its first call of
        ``tools``: the SDK lists the tools to learn their output schemas (a host lists them
        when it connects anyway), then imports jsonschema and compiles each tool's output schema
        (~50-60 ms of this process's CPU on the first call, none of it the server's)."""
        await self.client.list_tools()
        session = self.client.session
        # The SDK's own cache of compiled validators (private: if it moves, only the import is warmed).
        compile_validator = getattr(session, "_output_schema_validator", None)
        schemas = getattr(session, "_tool_output_schemas", {})
        import jsonschema  # noqa: F401

        for tool in tools:
            if compile_validator is not None and schemas.get(tool) is not None:
                compile_validator(tool, schemas[tool])

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result = await self.client.call_tool(tool, arguments)
        if result.is_error:
            text = result.content[0].text if result.content else "?"
            raise RuntimeError(f"{tool} failed: {text}")
        return result.structured_content

    async def complete(self, **arguments: Any) -> dict[str, Any]:
        """rlm_complete, then rlm_get_result until the run is finished."""
        result = await self.call("rlm_complete", wait_s=300, **arguments)
        while result["status"] in ("running", "queued"):
            result = await self.call("rlm_get_result", run_id=result["run_id"], wait_s=300)
        return result


def time_to_initialize(env: dict[str, str], timeout: float = 60.0) -> float:
    """Seconds from spawning ``rlm-mcp`` to reading its ``initialize`` result on stdout."""
    request = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                          "clientInfo": {"name": "rlm-mcp-bench", "version": "0"}}}
    began = time.perf_counter()
    proc = subprocess.Popen([rlm_mcp_command()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(request) + "\n").encode())
        proc.stdin.flush()
        deadline = began + timeout
        while time.perf_counter() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"rlm-mcp exited before answering initialize (exit {proc.poll()})")
            message = json.loads(line)
            if message.get("id") == 1:
                if "result" not in message:
                    raise RuntimeError(f"initialize failed: {message}")
                return time.perf_counter() - began
        raise TimeoutError("no initialize result")
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_with_timeout(coro: Any, timeout: float) -> Any:
    return await asyncio.wait_for(coro, timeout)
