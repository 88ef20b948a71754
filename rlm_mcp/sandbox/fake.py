"""A scripted sandbox backend for unit tests of code that drives sandboxes (the engine, embedders).

Like a mock transport in an HTTP client: no process, no isolation. Each ``execute`` hands the
code to a function you supply, which returns the :class:`CellResult` to report (and may call the
spec's sub-call handler, as real REPL code would through ``llm_query``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import CellResult, Sandbox, SandboxSpec

Responder = Callable[[str, SandboxSpec], CellResult | Awaitable[CellResult]]


class FakeSandbox(Sandbox):
    """Reports whatever ``responder`` returns for each cell; records what ran."""

    def __init__(self, spec: SandboxSpec, responder: Responder) -> None:
        super().__init__(spec)
        self.responder = responder
        self.executed: list[str] = []
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def execute(self, code: str, *, timeout: float) -> CellResult:
        if self.closed or not self.started:
            raise SandboxError("the sandbox is not running")
        self.executed.append(code)
        result = self.responder(code, self.spec)
        return await result if inspect.isawaitable(result) else result

    async def close(self) -> None:
        self.closed = True


class FakeProvider:
    """Register with ``SandboxRegistry.register`` under any name; keeps every sandbox it made."""

    def __init__(self, responder: Responder, name: str = "fake") -> None:
        self.name = name
        self.responder = responder
        self.sandboxes: list[FakeSandbox] = []

    def create(self, spec: SandboxSpec) -> Sandbox:
        sandbox = FakeSandbox(spec, self.responder)
        self.sandboxes.append(sandbox)
        return sandbox

    async def aclose(self) -> None:
        for sandbox in self.sandboxes:
            await sandbox.close()
