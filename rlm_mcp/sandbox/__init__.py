"""Sandbox backends behind one interface. The engine asks :class:`SandboxRegistry` for a
provider by name and never looks at which backend it got."""

from __future__ import annotations

import importlib
from typing import Protocol

from rlm_mcp.config import SANDBOX_NAMES, Settings
from rlm_mcp.errors import ConfigError
from rlm_mcp.sandbox.base import CellResult, ContextFile, Sandbox, SandboxSpec, SubcallHandler

__all__ = ["CellResult", "ContextFile", "Sandbox", "SandboxProvider", "SandboxRegistry",
           "SandboxSpec", "SubcallHandler"]

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


class SandboxRegistry:
    """One provider per backend name, created on first use and closed together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._providers: dict[str, SandboxProvider] = {}

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

    async def warm_up(self, name: str | None = None) -> None:
        """Let the backend prepare ahead of the first run (e.g. fill Docker's warm pool)."""
        provider = self.get(name)
        prepare = getattr(provider, "warm_up", None)
        if prepare is not None:
            await prepare()

    def register(self, provider: SandboxProvider) -> None:
        """Use this provider for its name (tests and embedders inject their own)."""
        self._providers[provider.name] = provider

    async def aclose(self) -> None:
        providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            await provider.aclose()
