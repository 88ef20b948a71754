"""The sandbox interface every backend implements, and the data it exchanges with the engine.

A sandbox is a persistent Python REPL holding the run's context. The engine only ever sees
:class:`Sandbox`; which backend stands behind it is chosen by :func:`rlm_mcp.sandbox.open_sandbox`.
"""

from __future__ import annotations

import abc
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from rlm_mcp.config import MAX_MESSAGE_MB
from rlm_mcp.errors import SandboxError

ContextKind = Literal["text", "documents"]

STDERR_TAIL_LINES = 20  # a worker's last stderr lines, kept by every backend to say why it stopped


def image_definitions() -> Path:
    """The sandbox image definitions (``Dockerfile``, ``build-base-offline.sh``, ``daytona/``),
    shipped as package data so image builds work from an installed wheel as from a checkout."""
    images = importlib.resources.files("rlm_mcp.sandbox") / "images"
    # docker-py and the Daytona SDK read a real directory: a zipped install has none.
    if not isinstance(images, Path) or not (images / "Dockerfile").is_file():
        raise SandboxError(f"the sandbox image definitions are missing from the installed rlm-mcp package "
                           f"({images}): reinstall it from a wheel or a source checkout")
    return images


@dataclass(frozen=True)
class ContextFile:
    """A context as the store keeps it on disk: UTF-8 text, or JSON lines of documents."""

    path: Path | None
    kind: ContextKind = "text"


class SubcallHandler(Protocol):
    """Serves the REPL's ``llm_query`` / ``rlm_query`` on the host (keys never enter the sandbox)."""

    async def __call__(self, op: str, prompt: str, model: str | None) -> str:
        """Return the reply text; raise :class:`rlm_mcp.errors.RlmError` to fail this call."""
        ...


@dataclass(frozen=True)
class SandboxSpec:
    """What a backend needs to start a REPL."""

    context: ContextFile
    handler: SubcallHandler
    max_output_chars: int = 20_000
    labels: dict[str, str] = field(default_factory=dict)
    cpu_limit_s: float | None = None  # CPU seconds for the worker (the run's wall-clock limit)
    max_message_bytes: int = MAX_MESSAGE_MB << 20  # one worker-to-host message (RLM_MCP_MAX_MESSAGE_MB)


@dataclass
class CellResult:
    """What one executed code block produced."""

    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    final: str | None = None
    draft: str | None = None
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    notices: list[str] = field(default_factory=list)
    locals: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0
    state_lost: bool = False
    timed_out: bool = False

    def render(self) -> str:
        """The text the root model sees for this cell."""
        parts: list[str] = []
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stdout_dropped:
            parts.append(f"[... output truncated: {self.stdout_dropped:,} more characters not shown]")
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr.rstrip("\n"))
        if self.stderr_dropped:
            parts.append(f"[... stderr truncated: {self.stderr_dropped:,} more characters not shown]")
        if self.error:
            parts.append(self.error)
        parts.extend(self.notices)
        return "\n".join(parts) if parts else "(no output)"


class Sandbox(abc.ABC):
    """A persistent REPL. Use as ``async with``; ``execute`` may be called many times."""

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        # For the run's result, each said once: limits this host cannot enforce, limits hit.
        self.notes: list[str] = []

    @abc.abstractmethod
    async def start(self) -> None:
        """Bring the REPL up with the context loaded."""

    @abc.abstractmethod
    async def execute(self, code: str, *, timeout: float) -> CellResult:
        """Run one code block. A timeout, crash or lost worker is reported in the result,
        never raised: the sandbox is usable again afterwards (possibly with fresh state)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the REPL and release everything it holds. Safe to call twice."""

    async def __aenter__(self) -> "Sandbox":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
