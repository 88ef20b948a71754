"""Engine behaviour pinned with the scripted (fake) sandbox backend and the in-process fake model
client: no worker processes, no HTTP."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlm_mcp.engine import RlmEngine
from rlm_mcp.sandbox import CellResult, SandboxSpec
from rlm_mcp.sandbox.fake import FakeProvider
from rlm_mcp.testing.fake_models import FakeModelClient
from tests.engine.test_engine import repl, text_request


def engine_with(settings, provider: FakeProvider, models: FakeModelClient) -> RlmEngine:
    engine = RlmEngine(replace(settings, sandbox=provider.name), models=models)
    engine.sandboxes.register(provider)
    return engine


async def test_the_engine_uses_whatever_backend_is_registered_under_the_name(settings, tmp_path):
    models = FakeModelClient([repl("print('hi')")])
    provider = FakeProvider(lambda code, spec: CellResult(final="from the fake"), name="anything-at-all")
    result = await engine_with(settings, provider, models).run(replace(text_request(tmp_path, "x"), model="openai/fake-1"))
    assert (result.status, result.answer) == ("completed", "from the fake")
    [sandbox] = provider.sandboxes
    assert sandbox.executed == ["print('hi')"] and sandbox.closed
    assert sandbox.spec.context.path == Path(tmp_path / "context.txt")


async def test_a_lost_repl_state_notice_reaches_the_root_model(settings, tmp_path):
    models = FakeModelClient([repl("x = 1"), "FINAL(done)"])
    lost = CellResult(error="The REPL worker died while running this cell (exit code 1).", state_lost=True)
    provider = FakeProvider(lambda code, spec: lost)
    result = await engine_with(settings, provider, models).run(replace(text_request(tmp_path, "x"), model="openai/fake-2"))
    assert result.answer == "done"
    assert "The REPL worker died while running this cell (exit code 1)." in models.user_messages("openai/fake-2")[1]


async def test_sub_calls_from_a_cell_are_served_and_counted(settings, tmp_path):
    models = FakeModelClient([repl("llm_query x3")])

    async def three_subcalls(code: str, spec: SandboxSpec) -> CellResult:
        replies = [await spec.handler("llm_query", f"the secret code is S{i}", None) for i in range(3)]
        return CellResult(final=",".join(replies))

    result = await engine_with(settings, FakeProvider(three_subcalls), models).run(
        replace(text_request(tmp_path, "x"), model="openai/fake-3"))
    assert (result.answer, result.subcalls) == ("S0,S1,S2", 3)
    assert result.usage["openai/fake-3"].calls == 1 + 3  # the sub-model defaults to the root model
