"""The contract every sandbox backend keeps, run against each of them.

Backends whose fixtures cannot start (no Docker engine on a user's machine) skip with the
reason; in CI (CI=true) their fixtures fail instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest

from rlm_mcp.errors import ModelError, SandboxError
from rlm_mcp.sandbox import ContextFile, SandboxSpec

BACKENDS = ["local", "docker", "daytona"]


@pytest.fixture(params=BACKENDS)
def provider(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"{request.param}_provider")


class RecordingHandler:
    """Serves llm_query on the host: echoes, and fails prompts that start with 'fail'."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    async def __call__(self, op: str, prompt: str, model: str | None) -> str:
        self.calls.append((op, prompt, model))
        if prompt.startswith("fail"):
            raise ModelError(f"scripted failure for {prompt!r}")
        return f"echo:{prompt}"


@pytest.fixture
def text_context(tmp_path: Path) -> ContextFile:
    path = tmp_path / "context.txt"
    path.write_text("alpha\r\nbeta é 😀\n" * 1000, encoding="utf-8", newline="")
    return ContextFile(path, "text")


def spec(context: ContextFile, handler: RecordingHandler | None = None, max_output_chars: int = 2_000) -> SandboxSpec:
    return SandboxSpec(context=context, handler=handler or RecordingHandler(), max_output_chars=max_output_chars)


async def test_context_text_is_loaded_exactly(provider, text_context):
    async with provider.create(spec(text_context)) as sandbox:
        result = await sandbox.execute("print(type(context).__name__, len(context), repr(context[:15]))", timeout=30)
    assert result.error is None
    assert result.stdout.strip() == "str 16000 'alpha\\r\\nbeta é 😀'"


async def test_document_list_context_exposes_texts_and_paths(provider, tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [{"path": "a.md", "text": "first"}, {"path": "sub/b.py", "text": "second doc"}]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    async with provider.create(spec(ContextFile(path, "documents"))) as sandbox:
        result = await sandbox.execute("print(context, context_paths)", timeout=30)
    assert result.stdout.strip() == "['first', 'second doc'] ['a.md', 'sub/b.py']"


async def test_variables_persist_between_cells_and_last_expression_echoes(provider, text_context):
    async with provider.create(spec(text_context)) as sandbox:
        await sandbox.execute("total = 40", timeout=30)
        result = await sandbox.execute("total += 2\ntotal", timeout=30)
    assert result.stdout.strip() == "42"
    assert "total" in result.locals and "42" in result.locals["total"]


async def test_long_output_is_truncated_with_a_marker(provider, text_context):
    async with provider.create(spec(text_context, max_output_chars=500)) as sandbox:
        result = await sandbox.execute("print('x' * 10_000)", timeout=30)
    assert len(result.stdout) == 500
    assert result.stdout_dropped == 10_001 - 500
    assert "9,501 more characters not shown" in result.render()


async def test_user_code_cannot_corrupt_or_hang_the_channel(provider, text_context):
    hostile = r'''
import contextlib, io, os, sys
print('{"type": "result", "cell": 1, "stdout": "forged"}')
os.write(1, b'{"type": "ready"}\n')
with contextlib.redirect_stdout(io.StringIO()):
    print("hidden")
sys.__stdout__.write("to the real stdout\n")
sys.__stdout__.flush()
try:
    got = input()
except EOFError:
    got = "EOF"
sys.stdout = None
'''
    async with provider.create(spec(text_context)) as sandbox:
        first = await sandbox.execute(hostile, timeout=30)
        after = await sandbox.execute("print('still here', got)", timeout=30)
    assert first.error is None, first.error
    assert '"forged"' in first.stdout  # shown to the model as output, not taken as protocol
    assert after.stdout.strip().endswith("still here EOF")


async def test_llm_query_reaches_the_host_handler(provider, text_context):
    handler = RecordingHandler()
    async with provider.create(spec(text_context, handler)) as sandbox:
        result = await sandbox.execute("print(llm_query('hello', model='m1'))", timeout=30)
    assert result.stdout.strip() == "echo:hello"
    assert handler.calls == [("llm_query", "hello", "m1")]


async def test_llm_query_batched_keeps_order_and_returns_errors_as_strings(provider, text_context):
    async with provider.create(spec(text_context)) as sandbox:
        result = await sandbox.execute(
            "out = llm_query_batched(['a', 'fail-b', 'c'] + [str(i) for i in range(100)])\n"
            "print(out[:3]); print(out[3:] == ['echo:' + str(i) for i in range(100)])", timeout=30)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "['echo:a', \"Error: scripted failure for 'fail-b'\", 'echo:c']"
    assert lines[1] == "True"


async def test_failed_llm_query_raises_in_user_code(provider, text_context):
    async with provider.create(spec(text_context)) as sandbox:
        result = await sandbox.execute("llm_query('fail now')", timeout=30)
    assert result.error is not None and "SubcallError: scripted failure for 'fail now'" in result.error


@pytest.mark.parametrize("code, expected", [
    ("FINAL('forty-two')", "forty-two"),
    ("result = 6 * 7\nFINAL_VAR('result')", "42"),
    ("answer['content'] = 'dict answer'\nanswer['ready'] = True", "dict answer"),
])
async def test_each_finishing_convention_reports_the_answer(provider, text_context, code, expected):
    async with provider.create(spec(text_context)) as sandbox:
        result = await sandbox.execute(code, timeout=30)
    assert result.final == expected


async def test_answer_content_without_ready_is_a_draft_not_a_final(provider, text_context):
    async with provider.create(spec(text_context)) as sandbox:
        result = await sandbox.execute("answer['content'] = 'half done'", timeout=30)
    assert (result.final, result.draft) == (None, "half done")


async def test_reserved_names_are_restored_after_being_overwritten(provider, text_context):
    async with provider.create(spec(text_context)) as sandbox:
        first = await sandbox.execute("context = 'gone'; llm_query = None; answer = 3", timeout=30)
        second = await sandbox.execute("print(len(context), llm_query('x'), answer)", timeout=30)
    assert "restored" in first.render() and "context" in first.render() and "llm_query" in first.render()
    assert second.stdout.strip() == "16000 echo:x {'content': '', 'ready': False}"


async def test_a_cell_over_its_time_limit_is_interrupted_and_state_kept(provider, text_context):
    async with provider.create(spec(text_context)) as sandbox:
        await sandbox.execute("kept = 'yes'", timeout=30)
        slow = await sandbox.execute("while True:\n    pass", timeout=0.5)
        after = await sandbox.execute("print(kept)", timeout=30)
    assert slow.timed_out and not slow.state_lost
    assert "time limit" in slow.error
    assert after.stdout.strip() == "yes"


async def test_a_cell_that_ignores_interrupts_is_killed_and_the_repl_restarts(provider, text_context):
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)"
    async with provider.create(spec(text_context)) as sandbox:
        await sandbox.execute("kept = 'yes'", timeout=30)
        stuck = await sandbox.execute(code, timeout=0.5)
        after = await sandbox.execute("print(len(context), 'kept' in globals())", timeout=30)
    assert stuck.timed_out and stuck.state_lost
    assert "killed and restarted" in stuck.error
    assert after.stdout.strip() == "16000 False"


@pytest.mark.parametrize("code", [
    "import os; os._exit(3)",
    "import ctypes; ctypes.string_at(0)",
])
async def test_a_worker_that_dies_is_replaced_and_says_state_was_lost(provider, text_context, code):
    async with provider.create(spec(text_context)) as sandbox:
        await sandbox.execute("kept = 1", timeout=30)
        died = await sandbox.execute(code, timeout=30)
        after = await sandbox.execute("print(len(context), 'kept' in globals())", timeout=30)
    assert died.state_lost and "died" in died.error
    assert after.stdout.strip() == "16000 False"


async def test_exhausting_memory_fails_the_cell_and_the_repl_goes_on(provider, text_context):
    async with provider.create(spec(text_context)) as sandbox:
        hog = await sandbox.execute("blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))", timeout=60)
        after = await sandbox.execute("blocks = None\nprint('alive', len(context))", timeout=30)
    assert hog.error is not None and ("MemoryError" in hog.error or hog.state_lost)
    assert after.stdout.strip().endswith("alive 16000")


async def test_the_sandbox_environment_holds_no_api_keys(provider, text_context, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-must-not-leak")
    async with provider.create(spec(text_context)) as sandbox:
        result = await sandbox.execute(
            "import os\nprint(sorted(k for k in os.environ if 'KEY' in k or 'TOKEN' in k or 'SECRET' in k))\n"
            "print(any('must-not-leak' in v for v in os.environ.values()))", timeout=30)
    assert result.stdout.split() == ["[]", "False"]


async def test_close_is_idempotent_and_a_closed_sandbox_refuses_work(provider, text_context):
    sandbox = provider.create(spec(text_context))
    await sandbox.start()
    await sandbox.close()
    await sandbox.close()
    with pytest.raises(SandboxError, match="closed"):
        await sandbox.execute("1", timeout=5)


async def test_a_missing_context_file_fails_start_with_a_clear_error(provider, tmp_path):
    with pytest.raises(SandboxError, match=r"context.*absent\.txt"):
        async with provider.create(spec(ContextFile(tmp_path / "absent.txt"))):
            pass


# ----- the protocol channel is a wall too: user code can reach its descriptor -----------------

# Finds the worker's private channel the way hostile code would: the one writable pipe (or
# socket) above the standard descriptors in /proc/self/fd.
CHANNEL_FD = r'''
import fcntl, os, stat
def channel_fd():
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        fd = int(name)
        try:
            mode = os.fstat(fd).st_mode
            writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        except OSError:
            continue
        if fd > 2 and writable and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return fd
    raise RuntimeError("no channel descriptor")
'''
MB = 1 << 20


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM (peak since the last reset_peak_rss) of this process, from /proc."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M)[1]) / 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


async def test_an_oversized_channel_message_kills_the_worker_and_server_memory_stays_bounded(provider, text_context):
    attack = CHANNEL_FD + "fd = channel_fd()\nblock = b'x' * (1 << 20)\nfor _ in range(600):\n    os.write(fd, block)\n"
    async with provider.create(replace(spec(text_context), max_message_bytes=16 * MB)) as sandbox:
        await sandbox.execute("kept = 1", timeout=30)
        reset_peak_rss()
        before = rss_mb("VmRSS")
        flooded = await sandbox.execute(attack, timeout=120)
        growth = rss_mb("VmHWM") - before
        after = await sandbox.execute("print(len(context), 'kept' in globals())", timeout=30)
    assert flooded.state_lost, flooded.render()
    assert "protocol message over the 16 MB limit (RLM_MCP_MAX_MESSAGE_MB)" in flooded.error
    assert growth < 150, f"the server grew by {growth:.0f} MB reading a 600 MB line"
    assert after.stdout.strip() == "16000 False"


@pytest.mark.parametrize("junk, cause", [
    (b"not json at all\n", "not a protocol message to its private channel: 'not json at all'."),
    (b"\xff\xfe\xfd\n", "not a protocol message"),
    (b"[" * 200_000 + b"]" * 200_000 + b"\n", "not a protocol message"),
    (b'["a", "list"]\n', "unknown message"),
    (b'{"type": "reply", "id": 1}\n', "unknown message"),
    (b'{"type": "ready"}\n', "second 'ready'"),
    (b'{"type": "result", "cell": 999}\n', "result out of turn"),
    (b'{"type": "fatal", "error": "forged"}\n', "fatal error after it had started: 'forged'"),
    (b'{"type": "call", "id": 1, "op": "llm_query", "prompt": ["not", "text"]}\n', "malformed sub-call"),
], ids=["text", "bad-utf8", "deep-nesting", "not-an-object", "unknown-type", "second-ready",
        "stray-result", "late-fatal", "bad-call"])
async def test_a_forged_or_malformed_channel_line_kills_the_worker_naming_the_cause(provider, text_context, junk, cause):
    attack = CHANNEL_FD + f"os.write(channel_fd(), {junk!r})\nimport time\ntime.sleep(30)\n"
    async with provider.create(spec(text_context)) as sandbox:
        await sandbox.execute("kept = 1", timeout=30)
        hit = await sandbox.execute(attack, timeout=60)
        after = await sandbox.execute("print(len(context), 'kept' in globals())", timeout=30)
    assert hit.state_lost and not hit.timed_out, hit.render()
    assert "The host killed the REPL worker" in hit.error and cause in hit.error, hit.error
    assert after.stdout.strip() == "16000 False"


async def test_a_flood_of_junk_lines_costs_one_bounded_log_line(provider, text_context, caplog):
    attack = CHANNEL_FD + "fd = channel_fd()\nfor _ in range(200):\n    os.write(fd, b'junk ' * 20_000 + b'\\n')\n"
    async with provider.create(spec(text_context)) as sandbox:
        with caplog.at_level(logging.DEBUG, logger="rlm_mcp.sandbox"):
            hit = await sandbox.execute(attack, timeout=60)
    assert hit.state_lost and "not a protocol message" in hit.error
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and len(warnings[0]) < 400, warnings
    assert len(hit.error) < 1_000


async def test_a_forged_result_is_held_to_the_output_limit(provider, text_context):
    forge = CHANNEL_FD + ("import json\nos.write(channel_fd(), json.dumps({'type': 'result', 'cell': 1, "
                          "'stdout': 'x' * 5_000_000, 'stdout_dropped': 'many', 'elapsed': 1e400 if False else 'slow', "
                          "'locals': {str(i): 'v' * 10_000 for i in range(1000)}}).encode() + b'\\n')\n"
                          "import time\ntime.sleep(30)\n")
    async with provider.create(spec(text_context, max_output_chars=500)) as sandbox:
        forged = await sandbox.execute(forge, timeout=60)
    assert len(forged.stdout) == 500 and forged.stdout_dropped == 5_000_000 - 500
    assert len(forged.locals) <= 40 and all(len(v) <= 400 for v in forged.locals.values())
    assert len(forged.render()) < 40_000


async def test_a_prompt_over_the_message_limit_fails_in_user_code_and_the_worker_lives(provider, text_context):
    handler = RecordingHandler()
    code = ("kept = 1\ntry:\n    llm_query('x' * 3_000_000)\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
            "try:\n    llm_query('é' * 700_000)\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
            "print(llm_query_batched(['small', 'y' * 2_000_000])[0])\n"
            "print(llm_query_batched(['small', 'y' * 2_000_000])[1][:50])\n")
    async with provider.create(replace(spec(text_context, handler, max_output_chars=5_000), max_message_bytes=MB)) as sandbox:
        result = await sandbox.execute(code, timeout=60)
        after = await sandbox.execute("print(kept, llm_query('ok'))", timeout=30)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == ("SubcallError the prompt is too large to send: 2.9 MB, over the 1 MB limit for one "
                        "message to the host (RLM_MCP_MAX_MESSAGE_MB); split it into smaller prompts"), lines
    assert lines[1].startswith("SubcallError the prompt is too large to send: 1.3 MB, over the 1 MB limit")
    assert lines[2:] == ["echo:small", "Error: the prompt is too large to send: 1.9 MB, ov"]
    assert not result.state_lost and after.stdout.strip() == "1 echo:ok"
    assert [prompt for _, prompt, _ in handler.calls] == ["small", "small", "ok"]


async def test_an_answer_over_the_message_limit_is_reported_and_the_repl_keeps_its_state(provider, text_context):
    async with provider.create(replace(spec(text_context), max_message_bytes=MB)) as sandbox:
        big = await sandbox.execute("kept = 1\nFINAL('z' * 3_000_000)", timeout=60)
        after = await sandbox.execute("print(kept)", timeout=30)
    assert big.final is None and not big.state_lost
    assert "The cell's answer could not be sent to the host: the result is 2.9 MB, over the 1 MB limit" in big.error
    assert after.stdout.strip() == "1"


async def test_prompts_in_flight_are_bounded_in_bytes(provider, text_context):
    in_flight, peak, crowd = 0, 0, asyncio.Event()

    async def holding(op: str, prompt: str, model: str | None) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight >= 3:
            crowd.set()
        with contextlib.suppress(asyncio.TimeoutError):  # held until a crowd forms, or briefly
            await asyncio.wait_for(crowd.wait(), 0.3)
        in_flight -= 1
        return str(len(prompt))

    code = "print(llm_query_batched([str(i) * 400_000 for i in range(1, 7)]))"
    async with provider.create(replace(spec(text_context, holding), max_message_bytes=MB)) as sandbox:
        result = await sandbox.execute(code, timeout=60)
    assert result.stdout.strip() == str(["400000"] * 6)
    assert peak == 2, peak  # two 400 kB prompts fit in 1 MB, a third waits
