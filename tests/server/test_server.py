"""The MCP server through the SDK's real client, in memory."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import gc
import json
import logging
import os
import re
import stat
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from rlm_mcp.config import Limits, Settings
from rlm_mcp.engine import RunRequest
from rlm_mcp.engine import runs as runs_module
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.sandbox import ContextFile
from rlm_mcp.server import Services, build_server
from rlm_mcp.testing.model_server import CHUNK_CHARS, Gate
from tests.conftest import haystack
from tests.support import unavailable


@pytest.fixture
async def services(settings: Settings):
    services = Services.create(settings)
    # A server whose litellm warm-up has finished (the first request on a fresh one: test_first_call.py).
    await services.engine.models.ready()
    yield services
    await services.aclose()


def connect(services: Services) -> Client:
    """An in-memory client session (opened inside each test: anyio scopes cannot cross the
    task boundary between a fixture's setup and teardown)."""
    return Client(build_server(services), read_timeout_seconds=120)


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def error_of(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return result.content[0].text


@pytest.fixture
def needle_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.log"
    path.write_text(haystack(2_000_000, "SRV-5"), encoding="utf-8")
    return path


async def test_tools_are_listed_with_valid_names_descriptions_and_annotations(services):
    async with connect(services) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) == {"rlm_load_context", "rlm_list_contexts", "rlm_delete_context", "rlm_peek_context",
                              "rlm_complete", "rlm_get_result", "rlm_cancel", "rlm_get_trajectory",
                              "rlm_get_run_view"}
        for name, tool in tools.items():
            assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name)
            assert tool.description and tool.annotations is not None and tool.output_schema is not None
        assert tools["rlm_list_contexts"].annotations.read_only_hint is True
        assert tools["rlm_delete_context"].annotations.destructive_hint is True
        complete_args = tools["rlm_complete"].input_schema["properties"]
        assert {"query", "handle", "handles", "context", "model", "sub_model", "sandbox", "max_iterations",
                "max_depth", "timeout_s", "cell_timeout_s", "max_cost_usd", "wait_s"} <= set(complete_args)
        assert all(arg.get("description") for arg in complete_args.values())


async def test_load_complete_and_page_the_trajectory(services, needle_file):
    async with connect(services) as client:
        info = await call(client, "rlm_load_context", path=str(needle_file))
        assert info["kind"] == "text" and info["characters"] == needle_file.stat().st_size
        assert len(info["preview"]) <= 300
        progress: list[tuple[float, str | None]] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append((value, message))

        result = await client.call_tool("rlm_complete", {"query": "What is the secret code?", "handle": info["handle"]},
                                        progress_callback=on_progress)
        out = result.structured_content
        assert (out["status"], out["answer"]) == ("completed", "SRV-5")
        assert "SRV-5" in result.content[0].text and out["run_id"] in result.content[0].text
        chunks = -(-info["characters"] // CHUNK_CHARS)
        assert out["subcalls"] == chunks and out["iterations"] == 2
        assert any(message and message.startswith("iteration 1/30") for _, message in progress)
        assert [value for value, _ in progress] == sorted(value for value, _ in progress)

        page = await call(client, "rlm_get_trajectory", run_id=out["run_id"], limit=1)
        assert (page["total_iterations"], page["offset"], page["next_offset"]) == (2, 0, 1)
        second = await call(client, "rlm_get_trajectory", run_id=out["run_id"], offset=1, detail="full")
        assert second["next_offset"] is None
        assert second["iterations"][0]["subcalls"] == chunks and "llm_query_batched" in second["iterations"][0]["code_blocks"][0]["code"]


async def test_same_content_twice_gives_the_same_handle(services, tmp_path):
    async with connect(services) as client:
        first = await call(client, "rlm_load_context", text="same words", name="one")
        (tmp_path / "copy.txt").write_text("same words")
        second = await call(client, "rlm_load_context", path=str(tmp_path / "copy.txt"))
        listed = await call(client, "rlm_list_contexts")
        assert first["handle"] == second["handle"]
        assert [c["handle"] for c in listed["contexts"]] == [first["handle"]]


async def test_a_directory_loads_as_documents_and_handles_combine(services, tmp_path):
    async with connect(services) as client:
        folder = tmp_path / "repo"
        (folder / "src").mkdir(parents=True)
        (folder / "src" / "a.py").write_text("print('a')  # secret code is DIR-1")
        (folder / "README.md").write_text("readme, secret code is DIR-2")
        (folder / "node_modules").mkdir()
        (folder / "node_modules" / "x.js").write_text("ignored")
        docs = await call(client, "rlm_load_context", path=str(folder))
        extra = await call(client, "rlm_load_context", text="one more: secret code is DIR-3")
        assert (docs["kind"], docs["documents"]) == ("documents", 2)
        result = await call(client, "rlm_complete", query="How many secret codes?", model="openai/count",
                            handles=[docs["handle"], extra["handle"]])
        assert (result["status"], result["answer"]) == ("completed", "3")


async def test_peek_pages_through_a_context(services):
    async with connect(services) as client:
        info = await call(client, "rlm_load_context", text="0123456789" * 5)
        page = await call(client, "rlm_peek_context", handle=info["handle"], start=45, length=10)
        assert (page["text"], page["next_start"]) == ("56789", None)
        first = await call(client, "rlm_peek_context", handle=info["handle"], length=20)
        assert (first["text"], first["next_start"]) == ("01234567890123456789", 20)


async def test_delete_removes_the_handle(services):
    async with connect(services) as client:
        info = await call(client, "rlm_load_context", text="to be deleted")
        await call(client, "rlm_delete_context", handle=info["handle"])
        message = await error_of(client, "rlm_peek_context", handle=info["handle"])
        assert "unknown context handle" in message and "rlm_list_contexts" in message


async def test_a_long_run_returns_running_then_get_result_waits_for_it(services, model_server):
    gate = Gate("FINAL(worth the wait)")  # the model's reply is held until the test opens it
    model_server.script("patient", ["```repl\nprint('working')\n```", gate])
    try:
        async with connect(services) as client:
            started = await call(client, "rlm_complete", query="q", context="tiny", model="openai/patient", wait_s=0.2)
            assert started["status"] == "running" and "rlm_get_result" in started["next_step"]
            gate.open()
            done = await call(client, "rlm_get_result", run_id=started["run_id"], wait_s=60)
            assert (done["status"], done["answer"]) == ("completed", "worth the wait")
    finally:
        gate.open()


async def test_rlm_cancel_stops_a_running_run(services, model_server):
    async with connect(services) as client:
        model_server.script("sleepy", ["```repl\nimport time\ntime.sleep(120)\n```"])
        started = await call(client, "rlm_complete", query="q", context="tiny", model="openai/sleepy", wait_s=0.5)
        cancelled = await call(client, "rlm_cancel", run_id=started["run_id"])
        assert cancelled["status"] == "cancelled"
        run = services.runs.get(started["run_id"])
        assert run.task.done()
        page = await call(client, "rlm_get_trajectory", run_id=started["run_id"])
        assert page["status"] == "cancelled"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_client_cancellation_stops_the_run(services, model_server, mode):
    async with Client(build_server(services), read_timeout_seconds=120, mode=mode) as client:
        model_server.script("abandoned", ["```repl\nimport time\ntime.sleep(120)\n```"])
        first_progress = asyncio.Event()

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            first_progress.set()

        call_task = asyncio.create_task(client.call_tool(
            "rlm_complete", {"query": "q", "context": "tiny", "model": "openai/abandoned"}, progress_callback=on_progress))
        await asyncio.wait_for(first_progress.wait(), 30)
        call_task.cancel()
        await asyncio.gather(call_task, return_exceptions=True)
        run = next(iter(services.runs.runs.values()))
        await asyncio.wait_for(asyncio.gather(run.task, return_exceptions=True), 30)
        assert run.result is not None and run.result.status == "cancelled"


async def test_runs_beyond_the_cap_queue_and_then_complete(settings, model_server):
    services = Services.create(replace(settings, max_runs=1))
    gate = Gate("FINAL(one)")
    try:
        async with Client(build_server(services)) as client:
            model_server.script("first-in-line", [gate])  # holds the only run slot until opened
            first = await call(client, "rlm_complete", query="q", context="a", model="openai/first-in-line", wait_s=0.1)
            await asyncio.wait_for(asyncio.to_thread(gate.arrived.wait, 60), 61)
            second = await call(client, "rlm_complete", query="q", context="b", model="openai/count", wait_s=0)
            assert (first["status"], second["status"]) == ("running", "queued")
            gate.open()
            done = [await call(client, "rlm_get_result", run_id=r["run_id"], wait_s=60) for r in (first, second)]
            assert [d["status"] for d in done] == ["completed", "completed"]
    finally:
        gate.open()
        await services.aclose()


async def test_resources_and_prompt_are_served(services):
    async with connect(services) as client:
        info = await call(client, "rlm_load_context", text="resource body")
        resource = await client.read_resource(f"rlm://contexts/{info['handle']}")
        assert info["handle"] in resource.contents[0].text
        result = await call(client, "rlm_complete", query="q", context="secret code is RES-1")
        jsonl = await client.read_resource(f"rlm://trajectories/{result['run_id']}")
        assert jsonl.contents[0].text.startswith('{"type": "metadata"')
        prompt = await client.get_prompt("analyze_large_file", {"path": "/var/log/big.log", "question": "why?"})
        assert "rlm_load_context" in prompt.messages[0].content.text


@pytest.mark.parametrize("tool, arguments, expected", [
    ("rlm_load_context", {}, "give exactly one of path, url or text"),
    ("rlm_load_context", {"path": "/x", "text": "y"}, "got path, text"),
    ("rlm_load_context", {"path": "/definitely/not/here.txt"}, "not/here.txt"),
    # the guard's own words: a connection error would also name 127.0.0.1
    ("rlm_load_context", {"url": "http://127.0.0.1:9/secret"},
     "refusing to fetch http://127.0.0.1:9/secret: 127.0.0.1 resolves to 127.0.0.1, a loopback address"),
    ("rlm_load_context", {"url": "ftp://example.org/file"}, "only http:// and https:// URLs can be loaded, not ftp"),
    ("rlm_peek_context", {"handle": "ctx_0000000000000000"}, "unknown context handle"),
    ("rlm_complete", {"query": "q"}, "give exactly one of handle, handles or context"),
    ("rlm_complete", {"query": "q", "handle": "ctx_0000000000000000"}, "unknown context handle"),
    # one inline limit for rlm_complete's context and rlm_load_context's text (RLM_MCP_MAX_INLINE_CHARS)
    ("rlm_complete", {"query": "q", "context": "x" * (Settings().max_inline_chars + 1)}, "load it with rlm_load_context"),
    ("rlm_complete", {"query": "q", "context": "x", "model": "nope/nothing"}, "unknown model 'nope/nothing'"),
    ("rlm_complete", {"query": "q", "context": "x", "max_iterations": 0}, "max_iterations must be"),
    ("rlm_complete", {"query": "q", "context": "x", "timeout_s": 1, "cell_timeout_s": 5},
     "cell_timeout_s (5) cannot exceed timeout_s (1): lower cell_timeout_s or raise timeout_s"),
    ("rlm_complete", {"query": "q", "handles": []}, "handles is empty"),
    ("rlm_get_result", {"run_id": "run-20260101-120000-abcdef"}, "unknown run_id 'run-20260101-120000-abcdef'"),
    ("rlm_cancel", {"run_id": "run-20260101-120000-abcdef"}, "unknown run_id"),
    ("rlm_get_trajectory", {"run_id": "run-20260101-120000-abcdef"}, "no trajectory"),
    ("rlm_get_result", {"run_id": "run-nope"}, "'run-nope' is not a run id (they look like run-2026"),
    ("rlm_cancel", {"run_id": "run-nope"}, "is not a run id"),
    ("rlm_get_trajectory", {"run_id": "../../etc/passwd"}, "'../../etc/passwd' is not a run id"),
])
async def test_bad_input_is_a_tool_error_that_says_what_to_do(services, tool, arguments, expected):
    async with connect(services) as client:
        message = await error_of(client, tool, **arguments)
        assert expected in message


async def test_paths_outside_the_allowed_roots_are_refused(settings, tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    (outside / "f.txt").write_text("no")
    services = Services.create(replace(settings, allowed_roots=(inside.resolve(),)))
    try:
        async with Client(build_server(services)) as client:
            message = await error_of(client, "rlm_load_context", path=str(outside / "f.txt"))
            assert "outside" in message and str(inside.resolve()) in message
            assert (await call(client, "rlm_list_contexts"))["contexts"] == []
    finally:
        await services.aclose()


async def test_a_finished_run_is_readable_after_a_restart(settings, needle_file):
    first = Services.create(settings)
    try:
        async with Client(build_server(first)) as client:
            result = await call(client, "rlm_complete", query="q", context="secret code is RST-1")
    finally:
        await first.aclose()
    second = Services.create(settings)
    try:
        async with Client(build_server(second)) as client:
            again = await call(client, "rlm_get_result", run_id=result["run_id"])
            contexts = await call(client, "rlm_list_contexts")
    finally:
        await second.aclose()
    assert (again["status"], again["answer"]) == ("completed", "RST-1")
    assert len(contexts["contexts"]) == 1



async def test_a_run_timeout_below_the_default_cell_timeout_is_accepted(settings):
    """The default 300 s cell timeout once made every timeout_s under 300 an error."""
    services = Services.create(replace(settings, limits=Limits()))
    try:
        async with Client(build_server(services)) as client:
            result = await call(client, "rlm_complete", query="q", context="secret code is T-60", timeout_s=60)
    finally:
        await services.aclose()
    assert (result["status"], result["answer"]) == ("completed", "T-60")
    metadata = json.loads(Path(result["trajectory_path"]).read_text().splitlines()[0])
    assert (metadata["limits"]["timeout_s"], metadata["limits"]["cell_timeout_s"]) == (60, 60)


async def test_cell_timeout_s_bounds_each_code_block(services, model_server):
    model_server.script("overstayer", ["```repl\nimport time\ntime.sleep(30)\n```", "FINAL(moved on)"])
    async with connect(services) as client:
        result = await call(client, "rlm_complete", query="q", context="tiny", model="openai/overstayer",
                            cell_timeout_s=0.5, wait_s=60)
    assert (result["status"], result["answer"]) == ("completed", "moved on")
    lines = [json.loads(line) for line in Path(result["trajectory_path"]).read_text().splitlines()]
    assert lines[0]["limits"]["cell_timeout_s"] == 0.5
    cell = lines[1]["code_blocks"][0]["result"]
    assert cell["timed_out"] is True and cell["execution_time"] < 20


async def test_a_context_altered_on_disk_fails_the_run_with_no_answer(services, needle_file):
    async with connect(services) as client:
        info = await call(client, "rlm_load_context", path=str(needle_file))
        content = services.store.context_file(info["handle"]).path
        content.write_text(content.read_text().replace("SRV-5", "BAD-6"))  # same length, other code
        result = await call(client, "rlm_complete", query="What is the secret code?", handle=info["handle"], wait_s=60)
        assert (result["status"], result["answer"]) == ("failed", None), result
        assert f"context {info['handle']} (big.log) was changed on disk after it was loaded" in result["error"]
        assert "rlm_delete_context" in result["error"]
        page = await call(client, "rlm_get_trajectory", run_id=result["run_id"])
        assert (page["status"], page["answer"]) == ("failed", None)
        # Loading the input again replaces nothing (same content, same handle) and runs clean.
        (needle_file.parent / "again.log").write_text(needle_file.read_text())
        await call(client, "rlm_delete_context", handle=info["handle"])
        again = await call(client, "rlm_load_context", path=str(needle_file.parent / "again.log"))
        redone = await call(client, "rlm_complete", query="What is the secret code?", handle=again["handle"], wait_s=60)
        assert (redone["status"], redone["answer"]) == ("completed", "SRV-5")


async def test_trajectories_are_private_to_the_server_user_whatever_the_umask(services):
    previous = os.umask(0)
    try:
        async with connect(services) as client:
            result = await call(client, "rlm_complete", query="q", context="secret code is PRIV-1")
    finally:
        os.umask(previous)
    assert result["answer"] == "PRIV-1"
    home = services.settings.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for path in [home / "trajectories", *(home / "trajectories").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


@pytest.mark.parametrize("backend", ["docker", "daytona"])
async def test_a_private_stored_context_is_readable_in_the_other_sandbox_backends(settings, needle_file, request,
                                                                                 backend):
    """Store files are 0600 and owned by the server's user; the container's unprivileged user
    (Docker) and the upload (Daytona) must still get the content."""
    services = Services.create(replace(settings, sandbox=backend))
    services.engine.sandboxes.register(request.getfixturevalue(f"{backend}_provider"))
    try:
        async with Client(build_server(services)) as client:
            info = await call(client, "rlm_load_context", path=str(needle_file))
            stored = services.store.context_file(info["handle"]).path
            assert stat.S_IMODE(stored.stat().st_mode) == 0o600
            result = await call(client, "rlm_complete", query="What is the secret code?", handle=info["handle"],
                                wait_s=120)
    finally:
        await services.aclose()
    assert (result["status"], result["answer"]) == ("completed", "SRV-5"), result


# ----- errors that say what went wrong and what to do ---------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs mounted for the test (needs root), unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        unavailable("mounting a 1 MiB tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30, check=True)


def fill(disk: Path) -> None:
    """Write to ``disk`` until it is full."""
    with open(disk / "filler", "wb") as out:
        try:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            with contextlib.suppress(OSError):
                out.close()


async def test_a_full_disk_gives_errors_that_say_so_and_what_to_do(settings, small_disk, tmp_path):
    services = Services.create(replace(settings, home=small_disk / "home"))
    big = tmp_path / "big.txt"
    big.write_text(haystack(2_000_000, "FULL-1"))
    try:
        async with Client(build_server(services)) as client:
            message = await error_of(client, "rlm_load_context", path=str(big))
            assert message.startswith("Error executing tool rlm_load_context: storing the context failed: no space "
                                      f"left on the disk in {services.store.root}"), message
            assert "rlm_delete_context" in message
            assert [p.name for p in services.store.root.iterdir()] == []  # the partial copy is gone
            small = await call(client, "rlm_load_context", text="secret code is FULL-2")
            fill(small_disk)
            inline = await error_of(client, "rlm_complete", query="q", context="y" * 150_000)
            assert "storing the context failed: no space left on the disk" in inline, inline
            result = await call(client, "rlm_complete", query="q", handle=small["handle"], wait_s=60)
            assert result["status"] == "failed", result
            assert result["error"].startswith("writing the run's trajectory failed: no space left on the disk in "
                                              f"{small_disk / 'home' / 'trajectories'}"), result["error"]
    finally:
        await services.aclose()


async def test_a_path_with_a_nul_character_is_refused_with_what_to_do(services):
    async with connect(services) as client:
        message = await error_of(client, "rlm_load_context", path="/etc/pass\x00wd")
    assert "the path '/etc/pass\\x00wd' contains a NUL character" in message
    assert message.endswith("pass the path without it")


async def test_an_overlong_path_says_the_name_is_too_long(services):
    async with connect(services) as client:
        message = await error_of(client, "rlm_load_context", path="/tmp/" + "a" * 300 + "/x.txt")
    assert "a file name is too long" in message and "use a shorter path" in message
    assert len(message) < 600, message


@pytest.mark.parametrize("tool", ["rlm_get_result", "rlm_cancel", "rlm_get_trajectory"])
async def test_an_overlong_run_id_is_refused_with_what_to_do(services, tool):
    """300 characters once reached a file name (ENAMETOOLONG) and came back as a bare error."""
    async with connect(services) as client:
        message = await error_of(client, tool, run_id="run-20260101-120000-abcdef" + "9" * 300)
    assert "is not a run id (they look like run-20260101-120000-a1b2c3" in message, message
    assert "use the run_id that rlm_complete returned" in message and len(message) < 500


@pytest.mark.parametrize("tool, argument", [
    ("rlm_peek_context", "handle"), ("rlm_delete_context", "handle"), ("rlm_complete", "handle"),
    ("rlm_load_context", "path"), ("rlm_get_result", "run_id"),
])
async def test_a_10_mb_input_is_echoed_only_as_a_bounded_excerpt(services, caplog, tool, argument):
    huge = "ctx_" + "0" * 10_000_000
    arguments = {argument: huge, **({"query": "q"} if tool == "rlm_complete" else {})}
    caplog.set_level(logging.DEBUG)
    async with connect(services) as client:
        message = await error_of(client, tool, **arguments)
    assert len(message) < 1_000, len(message)
    assert "10,000,004 characters" in message  # says how long the input was
    assert max(len(record.getMessage()) for record in caplog.records) < 5_000


# ----- memory kept per finished run ------------------------------------------------------------------


SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.CodeType,
          types.FrameType, types.TracebackType, contextvars.Context, asyncio.AbstractEventLoop)


def reachable_bytes(root: object) -> int:
    """``sys.getsizeof`` summed over everything reachable from ``root``, short of what every run
    shares (classes, functions, modules, the event loop, contexts, frames): what the table of
    runs keeps alive by itself."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, SHARED):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


async def finish_runs(services: Services, queries: list[str], model: str) -> list[str]:
    run_ids = []
    for query in queries:
        run = services.runs.start(RunRequest(query=query, context=ContextFile(None), shape=ContextShape("text", 0),
                                             model=model))
        await asyncio.wait_for(asyncio.gather(run.task), 60)
        assert run.result is not None and run.result.status == "completed", run.result
        run_ids.append(run.run_id)
    return run_ids


# aiohttp (under litellm) warns about request bodies over 1 MiB, and warnings are errors here.
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_finished_runs_keep_only_a_bounded_excerpt_of_their_query(services, model_server):
    """40 runs with a 5 MB query each once added 229 MB to the server: the query was kept whole."""
    model_server.script("big-question", ["FINAL(ok)"] * 12)
    queries = [f"{i}: " + "why " * 500_000 for i in range(12)]  # 2 MB each
    await finish_runs(services, queries, "openai/big-question")
    kept = reachable_bytes(services.runs.runs)
    assert len(services.runs.runs) == 12
    assert kept < 12 * 16_000, f"{kept:,} bytes kept for 12 finished runs"


async def test_finished_runs_are_bounded_by_bytes_and_older_ones_are_read_back_from_their_trajectory(
        settings, model_server, monkeypatch):
    """Large answers too: past the byte budget the oldest finished runs leave memory, and
    rlm_get_result still answers them from their trajectory."""
    monkeypatch.setattr(runs_module, "FINISHED_RUNS_MAX_BYTES", 3_500_000)
    big = "```repl\nanswer['content'] = 'A' * 1_000_000\nanswer['ready'] = True\n```"
    model_server.script("big-answer", [big] * 6)
    services = Services.create(settings)
    try:
        run_ids = await finish_runs(services, [f"q{i}" for i in range(6)], "openai/big-answer")
        assert list(services.runs.runs) == run_ids[-3:]  # the newest that fit in 3.5 MB
        assert reachable_bytes(services.runs.runs) < 3_500_000
        async with Client(build_server(services)) as client:
            oldest = await call(client, "rlm_get_result", run_id=run_ids[0])
    finally:
        await services.aclose()
    assert (oldest["status"], oldest["answer"]) == ("completed", "A" * 1_000_000)
