"""The contract every sandbox backend keeps, run against each of them.

Backends whose fixtures cannot start (no Docker engine on a user's machine) skip with the
reason; in CI (CI=true) their fixtures fail instead.
"""

from __future__ import annotations

import json
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
