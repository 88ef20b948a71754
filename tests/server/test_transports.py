"""rlm-mcp out of process: stdio through the SDK client and as raw JSON-RPC, streamable HTTP and
SSE behind the bearer token, the bind rules, startup cost, and the ``rlm-mcp run`` command.

Every server here is the installed console script (or ``python -m rlm_mcp``) in a subprocess,
talking to the scripted model server over real HTTP. Nothing sleeps: readiness is a log line
seen by a reader thread, replies are waited for on queues, and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from rlm_mcp.testing.model_server import CHUNK_CHARS, ScriptedModelServer, secret_needle
from tests.conftest import haystack

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"rlm_load_context", "rlm_list_contexts", "rlm_delete_context", "rlm_peek_context",
         "rlm_complete", "rlm_get_result", "rlm_cancel", "rlm_get_trajectory", "rlm_get_run_view"}
QUESTION = "What is the secret code?"
PROCESS_TIMEOUT_S = 120  # any single subprocess call
READY_TIMEOUT_S = 60  # an HTTP server announcing it listens
TOKEN = "test-token-6f1d2c"


def rlm_mcp_command() -> list[str]:
    """The console script of this interpreter's install, else ``python -m rlm_mcp``."""
    for candidate in (Path(sys.executable).with_name("rlm-mcp"), shutil.which("rlm-mcp")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    return [sys.executable, "-m", "rlm_mcp"]


RLM_MCP = rlm_mcp_command()


def server_env(model_server: ScriptedModelServer, home: Path, **extra: str | None) -> dict[str, str]:
    """The caller's environment without any rlm-mcp or provider settings of its own, pointed at
    the scripted model server and a private data dir. ``extra`` values of None remove a variable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RLM_MCP_", "DAYTONA_", "ANTHROPIC_", "OPENAI_"))}
    env.update(RLM_MCP_MODEL="openai/needle", RLM_MCP_API_BASE=model_server.api_base,
               OPENAI_API_KEY="sk-test", RLM_MCP_HOME=str(home), RLM_MCP_LOG_LEVEL="INFO",
               LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONUNBUFFERED="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_haystack(path: Path, size: int, code: str, at: int) -> int:
    """Write `size` bytes of filler with the secret sentence inserted at byte `at`, in 1 MiB
    blocks (no 100 MB string in memory). Returns the file's size."""
    filler = b"lorem ipsum dolor sit amet, consectetur adipiscing elit. "
    block = (filler * ((1 << 20) // len(filler) + 1))[: 1 << 20]
    written = 0
    with path.open("wb") as out:
        while written < size:
            piece = block[: min(len(block), size - written)]
            if written <= at < written + len(piece):
                cut = at - written
                out.write(piece[:cut] + secret_needle(code).encode() + piece[cut:])
            else:
                out.write(piece)
            written += len(piece)
    return path.stat().st_size


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def page_through_trajectory(client: Client, run_id: str) -> list[dict[str, Any]]:
    """Every iteration of a run's trajectory, one page at a time, following next_offset."""
    iterations: list[dict[str, Any]] = []
    offset: int | None = 0
    for _ in range(100):  # bounded: the scripted policies take a handful of iterations
        if offset is None:
            break
        page = structured(await client.call_tool("rlm_get_trajectory", {"run_id": run_id, "offset": offset, "limit": 1}))
        assert page["offset"] == offset and page["run_id"] == run_id
        iterations.extend(page["iterations"])
        offset = page["next_offset"]
    assert offset is None, "the trajectory never ended"
    assert len(iterations) == page["total_iterations"]
    return iterations


async def load_complete_and_page(client: Client, path: Path, code: str) -> dict[str, Any]:
    """The issue's "done when": load by path, answer with progress on the way, page the trajectory."""
    tools = await client.list_tools()
    assert {tool.name for tool in tools.tools} == TOOLS
    info = structured(await client.call_tool("rlm_load_context", {"path": str(path)}))
    assert info["kind"] == "text" and info["bytes"] == path.stat().st_size

    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    out = structured(await client.call_tool("rlm_complete", {"query": QUESTION, "handle": info["handle"], "wait_s": 300},
                                            progress_callback=on_progress))
    assert (out["status"], out["answer"]) == ("completed", code), out
    assert out["subcalls"] == -(-info["characters"] // CHUNK_CHARS)
    assert progress, "no progress notifications arrived"
    assert any(message and message.startswith("iteration 1/") for _, message in progress), progress
    assert [value for value, _ in progress] == sorted(value for value, _ in progress)

    iterations = await page_through_trajectory(client, out["run_id"])
    assert len(iterations) == out["iterations"] == 2
    assert any("llm_query_batched" in block["code"] for it in iterations for block in it["code_blocks"])
    return out


# ----- stdio through the SDK client -----------------------------------------------------------


@pytest.fixture
def hundred_mb_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "huge.log"
    write_haystack(path, 100_000_000, "STDIO-100", at=66_123_457)
    yield path
    # pytest keeps recent tmp dirs: do not leave 200 MB (the file and the store's copy) behind.
    path.unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


async def test_stdio_answers_over_a_100_mb_file_with_progress_and_a_paged_trajectory(
        model_server, tmp_path, hundred_mb_file):
    params = StdioServerParameters(command=RLM_MCP[0], args=RLM_MCP[1:], cwd=str(REPO),
                                   env=server_env(model_server, tmp_path / "home"))
    bad_lines: list[Exception] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):  # the SDK hands over stdout lines that are not JSON-RPC
            bad_lines.append(message)

    with (tmp_path / "server.stderr").open("w+") as errlog:
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=300,
                          message_handler=on_message) as client:
            await load_complete_and_page(client, hundred_mb_file, "STDIO-100")
        errlog.seek(0)
        stderr = errlog.read()
    assert not bad_lines, bad_lines
    assert "stored context" in stderr  # the server's logging went to stderr, not into the protocol


# ----- stdio as raw JSON-RPC ------------------------------------------------------------------


def close_pipes(proc: subprocess.Popen[str], readers: list[threading.Thread]) -> None:
    """After the process is gone: let the reader threads reach EOF, then close our pipe ends."""
    for thread in readers:
        thread.join(timeout=10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            try:
                pipe.close()
            except OSError:  # stdin of a process that is gone
                pass


class RawStdio:
    """``rlm-mcp`` with pipes; stdout lines land on a queue so replies are awaited with timeouts."""

    def __init__(self, env: dict[str, str], args: list[str] = ()) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([*RLM_MCP, *args], env=env, cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        self.lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.threads = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr), daemon=True)]
        for thread in self.threads:
            thread.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put((time.perf_counter(), line))
        self.lines.put((time.perf_counter(), None))

    @staticmethod
    def _drain(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def send(self, message: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
        self.proc.stdin.flush()

    def reply(self, request_id: int, timeout: float = PROCESS_TIMEOUT_S) -> tuple[float, dict[str, Any]]:
        """The response to `request_id` and when it arrived (seconds after the process started)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no reply to request {request_id} within {timeout} s; "
                                     f"stderr:\n{''.join(self.stderr)[-3000:]}") from None
            assert line is not None, f"the server closed stdout; stderr:\n{''.join(self.stderr)[-3000:]}"
            message = json.loads(line)
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return at - self.started, message

    def close(self) -> int:
        """Close stdin (how hosts stop a stdio server) and wait for the process to exit."""
        try:
            self.proc.stdin.close()
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("rlm-mcp did not exit within 30 s of stdin closing") from None
        finally:
            close_pipes(self.proc, self.threads)

    def __enter__(self) -> "RawStdio":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        close_pipes(self.proc, self.threads)


INITIALIZE = {"id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "raw-test", "version": "0"}}}


def test_stdio_stdout_carries_nothing_but_json_rpc_and_stdin_eof_stops_the_server(model_server, tmp_path):
    with RawStdio(server_env(model_server, tmp_path / "home")) as server:
        server.send(INITIALIZE)
        _, init = server.reply(1)
        assert init["result"]["serverInfo"]["name"] == "rlm-mcp"
        server.send({"method": "notifications/initialized"})
        server.send({"id": 2, "method": "tools/list"})
        _, listed = server.reply(2)
        assert {tool["name"] for tool in listed["result"]["tools"]} == TOOLS
        # A call that logs on the server (the store announces what it stored).
        server.send({"id": 3, "method": "tools/call",
                     "params": {"name": "rlm_load_context", "arguments": {"text": "hello raw stdio"}}})
        _, loaded = server.reply(3)
        assert loaded["result"]["structuredContent"]["characters"] == len("hello raw stdio")
        assert server.close() == 0
    assert server.stdout, "nothing came back on stdout"
    for line in server.stdout:
        message = json.loads(line)
        assert message.get("jsonrpc") == "2.0" and ("id" in message or "method" in message), line
    assert "stored context" in "".join(server.stderr)
    assert not list((tmp_path / "home").glob("*.token"))  # stdio needs no token


# ----- startup --------------------------------------------------------------------------------


def test_stdio_startup_to_initialize_result_is_measured(model_server, tmp_path, record_property, capsys):
    """Process start to the initialize result, median of 5 (a benchmark figure, not asserted)."""
    times = []
    for attempt in range(5):
        with RawStdio(server_env(model_server, tmp_path / f"home{attempt}")) as server:
            server.send(INITIALIZE)
            at, init = server.reply(1)
            assert init["result"]["serverInfo"]["name"] == "rlm-mcp"
            times.append(at)
            assert server.close() == 0
    median = statistics.median(times)
    record_property("stdio_startup_s_median", round(median, 3))
    record_property("stdio_startup_s_all", [round(t, 3) for t in times])
    with capsys.disabled():
        print(f"\nrlm-mcp stdio startup to initialize result: median {median:.2f} s of {len(times)} "
              f"({', '.join(f'{t:.2f}' for t in times)}) [{' '.join(RLM_MCP)}]")


def test_serving_does_not_import_litellm_or_docker(tmp_path):
    """Everything the stdio server builds before answering initialize, in a fresh interpreter:
    litellm and the sandbox SDKs load on first use, not at startup."""
    probe = ("import json, sys\n"
             "from rlm_mcp.config import Settings\n"
             "from rlm_mcp.server import Services, build_server\n"
             "import rlm_mcp.cli\n"
             "build_server(Services.create(Settings.from_env()))\n"
             "print(json.dumps(sorted(m for m in ('litellm', 'docker', 'daytona', 'openai') if m in sys.modules)))\n")
    env = {**os.environ, "RLM_MCP_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_help_loads_neither_mcp_nor_litellm():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "rlm_mcp", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "rlm_mcp.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("mcp", "litellm", "docker", "daytona")}


# ----- HTTP servers in subprocesses -----------------------------------------------------------


class Served:
    """``rlm-mcp serve`` in a subprocess. Readiness is uvicorn's "running on" log line, seen by
    the stderr reader thread; the same event fires if the process dies first."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([*RLM_MCP, "serve", *args], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ready = threading.Event()
        self.threads = [threading.Thread(target=self._watch_stderr, daemon=True),
                        threading.Thread(target=self._drain_stdout, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _watch_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "Uvicorn running on" in line:
                self.ready.set()
        self.ready.set()  # EOF: the process is gone

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)

    def wait_ready(self) -> "Served":
        assert self.ready.wait(READY_TIMEOUT_S), f"not listening after {READY_TIMEOUT_S} s:\n{self.log}"
        assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.log}"
        return self

    def wait_exit(self) -> int:
        try:
            code = self.proc.wait(timeout=PROCESS_TIMEOUT_S)
        finally:
            close_pipes(self.proc, self.threads)
        return code

    @property
    def log(self) -> str:
        return "".join(self.stderr)[-4000:]

    def stop(self) -> int:
        """SIGTERM, as a service manager would; the exit code it gave (uvicorn shuts down
        gracefully, then re-raises the signal: -SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"rlm-mcp ignored SIGTERM for 30 s:\n{self.log}") from None
        return self.wait_exit()


@pytest.fixture
def serve(model_server, tmp_path) -> Iterator[Any]:
    """Start ``rlm-mcp serve`` processes; all are stopped at teardown."""
    started: list[Served] = []

    def start(*args: str, **env: str | None) -> Served:
        served = Served(list(args), server_env(model_server, tmp_path / "home", **env))
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def bearer_client(token: str) -> Any:
    return create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def needle_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.log"
    path.write_text(haystack(1_900_000, "HTTP-7"), encoding="utf-8")  # 5 chunks
    return path


async def test_streamable_http_with_the_bearer_token_loads_answers_and_pages(serve, needle_file):
    port = free_port()
    served = serve("--transport", "http", "--port", str(port), RLM_MCP_AUTH_TOKEN=TOKEN).wait_ready()
    async with bearer_client(TOKEN) as http:
        async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http),
                          read_timeout_seconds=120) as client:
            await load_complete_and_page(client, needle_file, "HTTP-7")
    assert served.stop() in (0, -signal.SIGTERM), served.log
    assert "Application shutdown complete" in served.log and "Traceback" not in served.log, served.log


INIT_POST = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE["params"]}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer"],
                         ids=["missing", "wrong", "not-bearer", "empty"])
def test_streamable_http_without_the_right_token_gets_401(serve, authorization):
    port = free_port()
    serve("--transport", "http", "--port", str(port), RLM_MCP_AUTH_TOKEN=TOKEN).wait_ready()
    headers = dict(MCP_HEADERS, **({"Authorization": authorization} if authorization else {}))
    response = httpx.post(f"http://127.0.0.1:{port}/mcp", json=INIT_POST, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <token>" in response.json()["error"]
    # The same request with the token is served.
    ok = httpx.post(f"http://127.0.0.1:{port}/mcp", json=INIT_POST, timeout=30,
                    headers=dict(MCP_HEADERS, Authorization=f"Bearer {TOKEN}"))
    assert ok.status_code == 200 and "rlm-mcp" in ok.text


async def test_sse_with_the_bearer_token_lists_tools_and_refuses_without_it(serve):
    port = free_port()
    serve("--transport", "sse", "--port", str(port), RLM_MCP_AUTH_TOKEN=TOKEN).wait_ready()
    url = f"http://127.0.0.1:{port}/sse"
    async with Client(sse_client(url, headers={"Authorization": f"Bearer {TOKEN}"}), read_timeout_seconds=60) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
        loaded = structured(await client.call_tool("rlm_load_context", {"text": "over sse"}))
        assert loaded["characters"] == len("over sse")
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.post(f"http://127.0.0.1:{port}/messages/?session_id=0", json={}, timeout=30).status_code == 401


# ----- a server killed mid-run ---------------------------------------------------------------


async def test_a_run_whose_server_was_killed_is_failed_everywhere_after_a_restart(serve, model_server, tmp_path):
    """SIGKILL mid-run, then a new server on the same data dir: rlm_get_result, rlm_get_trajectory
    and rlm_cancel all say "failed: the server stopped during the run", and so does the file."""
    reached, release = threading.Event(), threading.Event()

    def hold(messages: list[dict[str, Any]]) -> str:  # the second root call: the run is mid-way
        reached.set()
        release.wait(60)
        return "FINAL(too late)"

    model_server.script("killed-mid-run", ["```repl\nprint('step one')\n```", hold])
    port = free_port()
    first = serve("--transport", "http", "--port", str(port), RLM_MCP_AUTH_TOKEN=TOKEN).wait_ready()
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        with anyio.fail_after(120):
            async with bearer_client(TOKEN) as http:
                async with Client(streamable_http_client(url, http_client=http), read_timeout_seconds=60) as client:
                    started = structured(await client.call_tool("rlm_complete", {
                        "query": "q", "context": "tiny", "model": "openai/killed-mid-run", "wait_s": 0}))
                    assert await asyncio.to_thread(reached.wait, 60), "the run never reached its second iteration"
                    first.proc.kill()  # SIGKILL: no shutdown code runs
                    assert first.wait_exit() == -signal.SIGKILL
    except* (httpx.HTTPError, anyio.ClosedResourceError, ConnectionError):
        pass  # the client noticed its server vanish while closing the session
    finally:
        release.set()
    run_id = started["run_id"]
    path = tmp_path / "home" / "trajectories" / f"{run_id}.jsonl"
    assert json.loads(path.read_text().splitlines()[0])["status"] == "running"  # as the killed server left it

    serve("--transport", "http", "--port", str(port), RLM_MCP_AUTH_TOKEN=TOKEN).wait_ready()
    async with bearer_client(TOKEN) as http:
        async with Client(streamable_http_client(url, http_client=http), read_timeout_seconds=60) as client:
            result = structured(await client.call_tool("rlm_get_result", {"run_id": run_id}))
            page = structured(await client.call_tool("rlm_get_trajectory", {"run_id": run_id}))
            cancelled = structured(await client.call_tool("rlm_cancel", {"run_id": run_id}))
    stopped = "the server stopped during the run"
    assert (result["status"], result["error"], result["answer"]) == ("failed", stopped, None), result
    assert (cancelled["status"], cancelled["error"]) == ("failed", stopped), cancelled
    assert page["status"] == "failed" and page["total_iterations"] == 1, page
    metadata = json.loads(path.read_text().splitlines()[0])
    assert (metadata["status"], metadata["error"]) == ("failed", stopped)
    assert metadata["finished_at"] and metadata["run_id"] == run_id


# ----- tokens and bind rules ------------------------------------------------------------------


def generated_token(home: Path, port: int) -> str:
    path = home / f"http-{port}.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700, oct(home.stat().st_mode)
    return path.read_text().strip()


@pytest.mark.parametrize("transport", ["http", "sse"])
async def test_without_a_configured_token_http_requires_the_generated_one(serve, tmp_path, transport):
    """Like Jupyter: no RLM_MCP_AUTH_TOKEN means a fresh token, printed and written to a 0600
    file; a loopback server is not open to every local user."""
    port = free_port()
    served = serve("--transport", transport, "--port", str(port), RLM_MCP_AUTH_TOKEN=None).wait_ready()
    token = generated_token(tmp_path / "home", port)
    assert len(token) >= 40
    printed = "".join(served.stderr)
    assert f"token (new at each start; also in {tmp_path / 'home' / f'http-{port}.token'}" in printed
    assert f"Authorization: Bearer {token}" in printed
    path = "/sse" if transport == "sse" else "/mcp"
    url = f"http://127.0.0.1:{port}{path}"
    if transport == "http":
        assert httpx.post(url, json=INIT_POST, headers=MCP_HEADERS, timeout=30).status_code == 401
        async with bearer_client(token) as http:
            async with Client(streamable_http_client(url, http_client=http), read_timeout_seconds=60) as client:
                assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
    else:
        assert httpx.get(url, timeout=30).status_code == 401
        async with Client(sse_client(url, headers={"Authorization": f"Bearer {token}"}),
                          read_timeout_seconds=60) as client:
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
    assert served.stop() in (0, -signal.SIGTERM), served.log
    assert not (tmp_path / "home" / f"http-{port}.token").exists()  # a stopped server's token is gone


def test_each_start_generates_a_new_token_and_the_old_one_is_refused(serve, tmp_path):
    port = free_port()
    first = serve("--transport", "http", "--port", str(port), RLM_MCP_AUTH_TOKEN=None).wait_ready()
    old = generated_token(tmp_path / "home", port)
    assert first.stop() in (0, -signal.SIGTERM), first.log
    serve("--transport", "http", "--port", str(port), RLM_MCP_AUTH_TOKEN=None).wait_ready()
    new = generated_token(tmp_path / "home", port)
    url = f"http://127.0.0.1:{port}/mcp"
    assert new != old
    assert httpx.post(url, json=INIT_POST, timeout=30,
                      headers=dict(MCP_HEADERS, Authorization=f"Bearer {old}")).status_code == 401
    assert httpx.post(url, json=INIT_POST, timeout=30,
                      headers=dict(MCP_HEADERS, Authorization=f"Bearer {new}")).status_code == 200


def test_a_public_bind_without_a_token_serves_with_a_generated_one(serve, tmp_path):
    port = free_port()
    serve("--transport", "http", "--host", "0.0.0.0", "--port", str(port), RLM_MCP_AUTH_TOKEN=None).wait_ready()
    token = generated_token(tmp_path / "home", port)
    url = f"http://127.0.0.1:{port}/mcp"
    assert httpx.post(url, json=INIT_POST, headers=MCP_HEADERS, timeout=30).status_code == 401
    assert httpx.post(url, json=INIT_POST, timeout=30,
                      headers=dict(MCP_HEADERS, Authorization=f"Bearer {token}")).status_code == 200


@pytest.mark.parametrize("transport", ["http", "sse"])
@pytest.mark.parametrize("how", ["flag", "variable"])
def test_no_auth_on_a_public_bind_exits_with_one_line_and_leaves_no_token(serve, tmp_path, transport, how):
    args = ["--transport", transport, "--host", "0.0.0.0", "--port", str(free_port())]
    served = serve(*args, "--no-auth", RLM_MCP_AUTH_TOKEN=None) if how == "flag" else \
        serve(*args, RLM_MCP_AUTH_TOKEN=None, RLM_MCP_NO_AUTH="true")
    assert served.wait_exit() == 2
    lines = [line for line in served.stderr if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("rlm-mcp: error: refusing --no-auth (RLM_MCP_NO_AUTH) on 0.0.0.0"), lines[0]
    assert "loopback" in lines[0] and "Traceback" not in lines[0]
    assert list((tmp_path / "home").glob("*.token")) == []  # refused before anything was written


def test_no_auth_together_with_a_token_is_refused(serve):
    served = serve("--transport", "http", "--port", str(free_port()), "--no-auth", RLM_MCP_AUTH_TOKEN=TOKEN)
    assert served.wait_exit() == 2
    lines = [line for line in served.stderr if line.strip()]
    assert len(lines) == 1 and "RLM_MCP_AUTH_TOKEN is set and --no-auth" in lines[0], lines


def test_a_public_bind_with_a_token_serves_and_asks_for_it(serve):
    port = free_port()
    served = serve("--transport", "http", "--host", "0.0.0.0", "--port", str(port), RLM_MCP_AUTH_TOKEN=TOKEN).wait_ready()
    assert httpx.post(f"http://127.0.0.1:{port}/mcp", json=INIT_POST, headers=MCP_HEADERS, timeout=30).status_code == 401
    # Host names cannot be known for a public bind: any Host is accepted once the token is right.
    ok = httpx.post(f"http://127.0.0.1:{port}/mcp", json=INIT_POST, timeout=30,
                    headers=dict(MCP_HEADERS, Authorization=f"Bearer {TOKEN}", Host="rlm.example.com"))
    assert ok.status_code == 200, ok.text
    assert "the value of RLM_MCP_AUTH_TOKEN" in served.log and TOKEN not in served.log
    assert served.stop() in (0, -signal.SIGTERM), served.log


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_loopback_with_no_auth_serves_without_a_token_but_refuses_foreign_host_and_origin_headers(serve, how):
    port = free_port()
    if how == "flag":
        served = serve("--transport", "http", "--port", str(port), "--no-auth", RLM_MCP_AUTH_TOKEN=None).wait_ready()
    else:
        served = serve("--transport", "http", "--port", str(port), RLM_MCP_AUTH_TOKEN=None,
                       RLM_MCP_NO_AUTH="1").wait_ready()
    assert "WARNING: no token" in served.log
    url = f"http://127.0.0.1:{port}/mcp"
    ok = httpx.post(url, json=INIT_POST, headers=MCP_HEADERS, timeout=30)
    assert ok.status_code == 200 and "rlm-mcp" in ok.text
    rebound = httpx.post(url, json=INIT_POST, headers=dict(MCP_HEADERS, Host="evil.example"), timeout=30)
    assert (rebound.status_code, rebound.text) == (421, "Invalid Host header")
    cross_site = httpx.post(url, json=INIT_POST, headers=dict(MCP_HEADERS, Origin="http://evil.example"), timeout=30)
    assert (cross_site.status_code, cross_site.text) == (403, "Invalid Origin header")
    assert httpx.post(url, json=INIT_POST, headers=dict(MCP_HEADERS, Host=f"localhost:{port}"),
                      timeout=30).status_code == 200


def test_any_loopback_bind_with_no_auth_refuses_foreign_host_headers(serve):
    """Not only the SDK's three names: 127.0.0.2 is loopback too, served tokenless, so it needs
    the same protection (regression: it once got none)."""
    port = free_port()
    serve("--transport", "http", "--host", "127.0.0.2", "--port", str(port), "--no-auth",
          RLM_MCP_AUTH_TOKEN=None).wait_ready()
    url = f"http://127.0.0.2:{port}/mcp"
    assert httpx.post(url, json=INIT_POST, headers=MCP_HEADERS, timeout=30).status_code == 200
    rebound = httpx.post(url, json=INIT_POST, headers=dict(MCP_HEADERS, Host="evil.example"), timeout=30)
    assert (rebound.status_code, rebound.text) == (421, "Invalid Host header")
    cross_site = httpx.post(url, json=INIT_POST, headers=dict(MCP_HEADERS, Origin="http://evil.example"), timeout=30)
    assert cross_site.status_code == 403


# ----- rlm-mcp run ----------------------------------------------------------------------------


def rlm_mcp(model_server: ScriptedModelServer, home: Path, *args: str, stdin: str | None = None,
            **env: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RLM_MCP, *args], env=server_env(model_server, home, **env), cwd=REPO, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)


def assert_one_error_line(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("rlm-mcp: error: "), done.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert done.stdout == ""


def test_run_prints_only_the_answer_on_stdout_and_progress_on_stderr(model_server, tmp_path, needle_file):
    done = rlm_mcp(model_server, tmp_path / "home", "run", "--context", str(needle_file), QUESTION)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "HTTP-7\n"
    assert re.search(r"^iteration 1/30", done.stderr, re.M)
    assert re.search(r"^rlm-mcp: completed after 2 iterations, 5 sub-calls", done.stderr, re.M), done.stderr
    trajectory = re.search(r"^rlm-mcp: trajectory: (.+\.jsonl)$", done.stderr, re.M)
    assert trajectory and Path(trajectory.group(1)).is_file()
    assert Path(trajectory.group(1)).is_relative_to(tmp_path / "home")
    assert "Traceback" not in done.stderr


def test_run_with_a_timeout_below_the_default_cell_timeout_answers(model_server, tmp_path, needle_file):
    """`--timeout 60` once failed: the default 300 s cell timeout exceeded it."""
    done = rlm_mcp(model_server, tmp_path / "home", "run", "--timeout", "60", "--context", str(needle_file), QUESTION)
    assert (done.returncode, done.stdout) == (0, "HTTP-7\n"), done.stderr
    contradictory = rlm_mcp(model_server, tmp_path / "home", "run", "--timeout", "60", "--cell-timeout", "120",
                            "--context", str(needle_file), QUESTION)
    assert_one_error_line(contradictory, "cell_timeout_s (120) cannot exceed timeout_s (60)")


def test_run_reads_the_context_from_stdin(model_server, tmp_path):
    done = rlm_mcp(model_server, tmp_path / "home", "run", "--context", "-", QUESTION,
                   stdin=haystack(300_000, "STDIN-3"))
    assert (done.returncode, done.stdout) == (0, "STDIN-3\n"), done.stderr


def test_run_json_prints_the_whole_result(model_server, tmp_path, needle_file):
    done = rlm_mcp(model_server, tmp_path / "home", "run", "--json", "--context", str(needle_file), QUESTION)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["status"], result["answer"], result["iterations"], result["subcalls"]) == ("completed", "HTTP-7", 2, 5)
    assert Path(result["trajectory_path"]).is_file() and result["run_id"] in result["trajectory_path"]


def test_run_on_a_missing_file_is_one_error_line(model_server, tmp_path):
    missing = tmp_path / "nowhere" / "x.txt"
    assert_one_error_line(rlm_mcp(model_server, tmp_path / "home", "run", "--context", str(missing), QUESTION),
                          str(missing))


def test_run_with_an_unknown_model_is_one_error_line(model_server, tmp_path, needle_file):
    done = rlm_mcp(model_server, tmp_path / "home", "run", "--model", "nope/x", "--context", str(needle_file), QUESTION)
    # The context is loaded (and logged) before the model is checked; the error itself is one line.
    logged = [line for line in done.stderr.splitlines() if " INFO rlm_mcp." in line]
    done.stderr = "".join(line + "\n" for line in done.stderr.splitlines() if line not in logged)
    assert_one_error_line(done, "unknown model 'nope/x'", "RLM_MCP_API_BASE")


def test_a_bogus_sandbox_setting_is_one_error_line(model_server, tmp_path, needle_file):
    assert_one_error_line(rlm_mcp(model_server, tmp_path / "home", "run", "--context", str(needle_file), QUESTION,
                                  RLM_MCP_SANDBOX="bogus"), "RLM_MCP_SANDBOX", "bogus")
    # The server refuses the same way before speaking any protocol.
    assert_one_error_line(rlm_mcp(model_server, tmp_path / "home", RLM_MCP_SANDBOX="bogus"), "RLM_MCP_SANDBOX")


def test_help_describes_the_commands(model_server, tmp_path):
    done = rlm_mcp(model_server, tmp_path / "home", "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert all(word in done.stdout for word in ("serve", "run", "sandbox", "stdio"))
    run_help = rlm_mcp(model_server, tmp_path / "home", "run", "--help")
    assert run_help.returncode == 0 and "--context" in run_help.stdout and "--json" in run_help.stdout
