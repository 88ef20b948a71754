"""The Daytona backend against the loopback emulator (the real SDK over HTTP), its failure
cases, and an opt-in run against Daytona's cloud (``-m daytona_live`` with DAYTONA_API_KEY).

The backend contract suite runs against the same emulator through ``daytona_provider``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm_mcp.config import Settings
from rlm_mcp.errors import ConfigError, SandboxError
from rlm_mcp.sandbox import ContextFile, SandboxSpec
from rlm_mcp.sandbox.daytona import DaytonaProvider
from rlm_mcp.testing.daytona_emulator import DaytonaEmulator
from tests.daytona_support import EMULATOR_API_KEY, emulator_settings

SNAPSHOT = "rlm-mcp-sandbox"


async def echo(op: str, prompt: str, model: str | None) -> str:
    return f"{op}:{prompt}"


@pytest.fixture(scope="module")
def emulator() -> Iterator[DaytonaEmulator]:
    """A private emulator, so injected faults never reach other modules' tests."""
    with DaytonaEmulator(api_key=EMULATOR_API_KEY, snapshots={SNAPSHOT}) as instance:
        yield instance


@pytest.fixture(autouse=True)
def no_faults_left(emulator: DaytonaEmulator) -> Iterator[None]:
    emulator.faults.clear()
    yield
    emulator.faults.clear()


@pytest.fixture
def context(tmp_path: Path) -> ContextFile:
    path = tmp_path / "context.txt"
    path.write_text("the secret word is MARMALADE\n" * 100, encoding="utf-8")
    return ContextFile(path, "text")


def make_provider(emulator: DaytonaEmulator, **options: float) -> DaytonaProvider:
    return DaytonaProvider(emulator_settings(emulator, daytona_snapshot=SNAPSHOT), **options)


def spec(context: ContextFile, **labels: str) -> SandboxSpec:
    return SandboxSpec(context=context, handler=echo, labels=labels)


def assert_nothing_left(emulator: DaytonaEmulator, provider: DaytonaProvider) -> None:
    assert emulator.live_sandboxes() == []
    assert provider.owned == []


async def test_sandbox_is_created_from_the_snapshot_locked_down_and_deleted_on_close(emulator, context):
    provider = make_provider(emulator)
    async with provider.create(spec(context, run="r-1")) as sandbox:
        result = await sandbox.execute("print(llm_query('ping'), len(context))", timeout=30)
        (live,) = emulator.live_sandboxes()
    assert result.stdout.strip() == "llm_query:ping 2900"
    request = live.request
    assert request["snapshot"] == SNAPSHOT
    assert request["labels"]["rlm-mcp"] == "sandbox" and request["labels"]["run"] == "r-1"
    assert request["networkBlockAll"] is True
    assert request["autoStopInterval"] == 15
    assert request["autoDeleteInterval"] == 0  # ephemeral: deleted as soon as it stops
    assert "env" not in request or not any("KEY" in name for name in request["env"])
    assert live.id in emulator.deleted
    assert_nothing_left(emulator, provider)


async def test_context_is_uploaded_once_as_a_file_never_inside_a_command(emulator, context):
    provider = make_provider(emulator)
    uploads_before = emulator.count("upload")
    async with provider.create(spec(context)) as sandbox:
        (live,) = emulator.live_sandboxes()
        commands = [c.command for s in live.sessions.values() for c in s.commands.values()]
        await sandbox.execute("import os; os._exit(1)", timeout=30)
        after = await sandbox.execute("print(context.count('MARMALADE'))", timeout=30)
        commands += [c.command for s in live.sessions.values() for c in s.commands.values()]
    assert after.stdout.strip() == "100"
    assert emulator.count("upload") - uploads_before == 1  # the restarted worker reads the same file
    assert len(commands) == 2 and not any("MARMALADE" in command for command in commands)


async def test_failed_create_is_a_clear_error_and_leaves_nothing_behind(emulator, context):
    provider = make_provider(emulator)
    emulator.faults.errors["create_sandbox"] = 1
    with pytest.raises(SandboxError, match="Daytona API error while creating the sandbox"):
        async with provider.create(spec(context)):
            pass
    assert_nothing_left(emulator, provider)


async def test_create_that_times_out_is_a_clear_error_and_the_late_sandbox_is_deleted(emulator, context):
    provider = make_provider(emulator, create_timeout_s=1)
    emulator.faults.delays["create_sandbox"] = 30
    with pytest.raises(SandboxError, match="did not answer in time while creating the sandbox"):
        async with provider.create(spec(context)):
            pass
    assert_nothing_left(emulator, provider)
    assert emulator.count("delete_sandbox") >= 1


async def test_rate_limited_create_says_so_and_what_to_do(emulator, context):
    provider = make_provider(emulator)
    emulator.faults.rate_limits["create_sandbox"] = 1
    with pytest.raises(SandboxError, match="rate-limited.*RLM_MCP_MAX_RUNS"):
        async with provider.create(spec(context)):
            pass
    assert_nothing_left(emulator, provider)


async def test_rate_limited_input_is_sent_again_and_the_cell_completes(emulator, context):
    provider = make_provider(emulator)
    async with provider.create(spec(context)) as sandbox:
        emulator.faults.rate_limits["send_input"] = 1
        result = await sandbox.execute("print(llm_query('again'))", timeout=30)
    assert result.stdout.strip() == "llm_query:again"
    assert_nothing_left(emulator, provider)


async def test_session_dying_mid_cell_loses_state_and_the_next_cell_runs_in_a_new_session(emulator, context):
    provider = make_provider(emulator)
    async with provider.create(spec(context)) as sandbox:
        await sandbox.execute("kept = 1", timeout=30)
        emulator.faults.kill_session_on_input = "session-killer"
        died = await sandbox.execute("marker = 'session-killer'\nimport time; time.sleep(30)", timeout=30)
        after = await sandbox.execute("print(len(context), 'kept' in globals())", timeout=30)
    assert died.state_lost and "died" in died.error
    assert after.stdout.strip() == "2900 False"
    assert_nothing_left(emulator, provider)


async def test_a_broken_output_stream_is_resumed_without_losing_or_repeating_lines(emulator, context):
    provider = make_provider(emulator)
    async with provider.create(spec(context)) as sandbox:
        await sandbox.execute("kept = 'yes'", timeout=30)
        emulator.faults.break_log_streams = 1
        result = await sandbox.execute("print(kept, llm_query('a'), llm_query('b'))", timeout=30)
        again = await sandbox.execute("print(llm_query('c'))", timeout=30)
    assert emulator.faults.break_log_streams == 0
    assert result.stdout.strip() == "yes llm_query:a llm_query:b" and not result.state_lost
    assert again.stdout.strip() == "llm_query:c"
    assert_nothing_left(emulator, provider)


async def test_api_timeout_while_sending_a_cell_is_a_clear_run_error_and_the_sandbox_is_deleted(emulator, context):
    provider = make_provider(emulator, api_timeout_s=1)
    sandbox = provider.create(spec(context))
    await sandbox.start()
    emulator.faults.delays["send_input"] = 30
    try:
        with pytest.raises(SandboxError, match="did not answer in time while sending to the worker"):
            await sandbox.execute("print('never runs')", timeout=30)
    finally:
        emulator.faults.clear()
        await sandbox.close()
    assert_nothing_left(emulator, provider)


async def test_wrong_api_key_names_the_variable_to_fix(emulator, context):
    provider = DaytonaProvider(emulator_settings(emulator, daytona_api_key="not-the-key"))
    with pytest.raises(SandboxError, match="rejected the API key .*DAYTONA_API_KEY"):
        async with provider.create(spec(context)):
            pass
    assert_nothing_left(emulator, provider)


async def test_missing_snapshot_says_how_to_create_it(emulator, context):
    provider = DaytonaProvider(emulator_settings(emulator, daytona_snapshot="no-such-snapshot"))
    with pytest.raises(SandboxError, match="no snapshot 'no-such-snapshot'.*rlm-mcp sandbox daytona-snapshot"):
        async with provider.create(spec(context)):
            pass
    assert_nothing_left(emulator, provider)


def test_provider_without_an_api_key_is_a_configuration_error(emulator):
    with pytest.raises(ConfigError, match="DAYTONA_API_KEY"):
        DaytonaProvider(Settings(daytona_api_url=emulator.api_url))


async def test_provider_shutdown_deletes_sandboxes_still_open(emulator, context):
    provider = make_provider(emulator)
    sandbox = provider.create(spec(context))
    await sandbox.start()
    assert len(emulator.live_sandboxes()) == 1
    await provider.aclose()
    assert_nothing_left(emulator, provider)
    await sandbox.close()  # still safe afterwards


async def test_cancelling_start_still_deletes_the_sandbox(emulator, context):
    provider = make_provider(emulator)
    emulator.faults.delays["upload"] = 30
    uploads = emulator.count("upload")
    starting = asyncio.create_task(provider.create(spec(context)).start())
    assert await asyncio.to_thread(emulator.wait_for, "upload", uploads + 1, 10)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert_nothing_left(emulator, provider)


@pytest.mark.daytona_live
@pytest.mark.skipif(not os.environ.get("DAYTONA_API_KEY"), reason="DAYTONA_API_KEY is not set")
async def test_live_daytona_runs_cells_serves_llm_query_and_deletes_the_sandbox(context):
    settings = Settings.from_env()
    provider = DaytonaProvider(settings)
    try:
        async with provider.create(spec(context, test="live")) as sandbox:
            result = await sandbox.execute("print(llm_query('ping'), context.count('MARMALADE'))", timeout=120)
            timed = await sandbox.execute("while True:\n    pass", timeout=2)
            after = await sandbox.execute("print('alive')", timeout=60)
    finally:
        await provider.aclose()
    assert result.stdout.strip() == "llm_query:ping 100", result.render()
    assert timed.timed_out
    assert after.stdout.strip() == "alive"
    assert provider.owned == []
