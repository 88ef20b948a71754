"""Sandbox backends behind one interface. The engine opens sandboxes through
:class:`SandboxRegistry` (by backend name, under the server-wide cap of :class:`SandboxSlots`)
and never looks at which backend it got."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Protocol

from rlm_mcp.config import SANDBOX_NAMES, Settings
from rlm_mcp.errors import ConfigError, SandboxError
from rlm_mcp.sandbox.base import CellResult, ContextFile, Sandbox, SandboxSpec, SubcallHandler
from rlm_mcp.sandbox.leftovers import reap_temp_dirs

__all__ = ["CellResult", "ContextFile", "Sandbox", "SandboxProvider", "SandboxRegistry",
           "SandboxSlots", "SandboxSpec", "SubcallHandler", "reap_leftovers"]

log = logging.getLogger(__name__)

# Imported lazily so that docker-py and the daytona SDK load only when used.
_PROVIDERS = {
    "local": "rlm_mcp.sandbox.local:LocalProvider",
    "docker": "rlm_mcp.sandbox.docker:DockerProvider",
    "daytona": "rlm_mcp.sandbox.daytona:DaytonaProvider",
}


class SandboxProvider(Protocol):
    """Creates sandboxes of one backend and owns what they share (clients, warm pools)."""

    name: str

    def create(self, spec: SandboxSpec) -> Sandbox: ...

    async def aclose(self) -> None: ...


class SandboxSlots:
    """The server-wide cap on live sandboxes: runs and their child RLMs queue beyond it.

    A parent keeps its sandbox while its cell waits for child RLMs, and each child needs a
    sandbox of its own. If parents could take every slot, their children would wait forever.
    So a sandbox with ``below`` levels of child RLMs possible under it (``max_depth - depth``)
    is admitted only while ``live + below < limit``: it leaves a slot free for each level under
    it. Why that always progresses: take the live sandbox with the fewest levels below, k >= 1
    (a sandbox at the deepest level never waits on anyone: rlm_query there is a plain model
    call). The sandbox admitted last had at least k levels below, so ``live <= limit - k``
    still holds, and a child of that sandbox (k - 1 levels below) fits. Waiters are therefore
    admitted fewest-levels-below first, then in arrival order: a strict FIFO queue could keep an
    admissible child behind a root that does not fit. Roots of new runs may wait while children
    keep coming; every run ends, so they get their turn.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.live = 0
        self.peak = 0
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []  # (below, arrival, grant)
        # Called when a sandbox is about to wait: the engine closes an idle kept sandbox (one
        # kept for follow-up questions) so that it never makes a new run wait.
        self.reclaim: Callable[[], None] | None = None

    @property
    def waiters(self) -> int:
        return len(self._waiting)

    async def acquire(self, below: int) -> None:
        """Wait for a slot for a sandbox with ``below`` levels of children possible under it."""
        if below >= self.limit:
            raise SandboxError(f"max_depth {below + 1} needs at least {below + 1} sandboxes at once, "
                               f"but RLM_MCP_MAX_SANDBOXES is {self.limit}: raise it or lower max_depth")
        if self.live + below < self.limit:  # waiters left after _grant() need more room than this
            self._take()
            return
        grant: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (below, next(self._order), grant)
        self._waiting.append(entry)
        if self.reclaim is not None:
            self.reclaim()
        try:
            await grant
        except BaseException:
            if entry in self._waiting:
                self._waiting.remove(entry)
            elif grant.done() and not grant.cancelled():
                self.release()  # granted just as the wait was cancelled: hand it on
            raise

    def release(self) -> None:
        self.live -= 1
        self._grant()

    def _take(self) -> None:
        self.live += 1
        self.peak = max(self.peak, self.live)

    def _grant(self) -> None:
        self._waiting.sort(key=lambda entry: entry[:2])
        while self._waiting and self.live + self._waiting[0][0] < self.limit:
            _, _, grant = self._waiting.pop(0)
            if not grant.done():
                self._take()
                grant.set_result(None)


class SandboxRegistry:
    """One provider per backend name, created on first use and closed together; the cap on
    live sandboxes for everything opened through :meth:`open`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._providers: dict[str, SandboxProvider] = {}
        self.slots = SandboxSlots(settings.max_sandboxes)

    def get(self, name: str | None = None) -> SandboxProvider:
        key = (name or self.settings.sandbox).strip().lower()
        if key in self._providers:
            return self._providers[key]
        if key not in SANDBOX_NAMES:
            raise ConfigError(f"unknown sandbox {key!r}: use one of {', '.join(SANDBOX_NAMES)}")
        if key not in self._providers:
            module_name, _, class_name = _PROVIDERS[key].partition(":")
            module = importlib.import_module(module_name)
            self._providers[key] = getattr(module, class_name)(self.settings)
        return self._providers[key]

    @contextlib.asynccontextmanager
    async def open(self, name: str | None, spec: SandboxSpec, *, depth: int = 1,
                   max_depth: int = 1) -> AsyncIterator[Sandbox]:
        """A started sandbox of backend ``name`` for an RLM at ``depth`` of a run allowed
        ``max_depth`` levels; waits for a slot under RLM_MCP_MAX_SANDBOXES, closes on exit."""
        provider = self.get(name)
        spec = replace(spec, max_message_bytes=self.settings.max_message_mb << 20)
        await self.slots.acquire(max(0, max_depth - depth))
        try:
            async with provider.create(spec) as sandbox:
                yield sandbox
        finally:
            self.slots.release()

    async def warm_up(self, name: str | None = None) -> None:
        """Let the backend prepare ahead of the first run (e.g. fill Docker's warm pool)."""
        provider = self.get(name)
        prepare = getattr(provider, "warm_up", None)
        if prepare is not None:
            await prepare()

    def register(self, provider: SandboxProvider) -> None:
        """Use this provider for its name (tests and embedders inject their own)."""
        self._providers[provider.name] = provider

    def in_use(self) -> list[str]:
        """The backends a provider was created for (what a server stopping must clean up)."""
        return list(self._providers)

    async def aclose(self) -> None:
        providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            await provider.aclose()


async def reap_leftovers(settings: Settings) -> int:
    """Remove what servers that died on this host left behind: their temporary directories
    and, when a Docker engine answers on this machine, their containers, volumes and mount
    directories. Runs in threads (the engine's answer may take a while), never on the loop;
    never raises (a failed clean-up must not stop a server from starting)."""
    removed = 0
    for reap in (reap_temp_dirs, lambda: _reap_docker(settings)):
        try:
            removed += await asyncio.to_thread(reap)
        except Exception as exc:
            log.warning("could not remove leftovers of earlier servers: %r", exc)
    if removed:
        log.info("removed %d leftover item(s) of servers that are gone", removed)
    return removed


def _reap_docker(settings: Settings) -> int:
    try:
        docker_backend = importlib.import_module("rlm_mcp.sandbox.docker")
    except ImportError as exc:  # docker-py missing: there can be no containers of ours either
        log.debug("no Docker leftovers to look for: %s", exc)
        return 0
    return docker_backend.reap_at_start(settings)
