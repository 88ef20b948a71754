"""The Daytona provider: one SDK client per sandbox, and the deletion of every sandbox it still
owns on ``aclose``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from daytona import AsyncDaytona, DaytonaConfig
from daytona.common.errors import DaytonaError, DaytonaNotFoundError

from rlm_mcp.config import Settings
from rlm_mcp.errors import ConfigError, SandboxError
from rlm_mcp.sandbox.base import Sandbox, SandboxSpec
from rlm_mcp.sandbox.daytona.sandbox import DaytonaSandbox

log = logging.getLogger(__name__)


class DaytonaProvider:
    """Creates Daytona sandboxes; deletes any it still owns on ``aclose``.

    Each sandbox owns its SDK client (an aiohttp session is bound to the event loop it was
    made in), so the provider holds no connections of its own.
    """

    name = "daytona"

    def __init__(self, settings: Settings, *, api_timeout_s: float = 60.0,
                 create_timeout_s: float = 120.0, upload_timeout_s: float = 600.0) -> None:
        if not settings.daytona_api_key:
            raise ConfigError("the Daytona sandbox needs DAYTONA_API_KEY (from app.daytona.io, "
                              "Keys); set it in the server's environment")
        self.settings = settings
        self.api_timeout_s = api_timeout_s
        self.create_timeout_s = create_timeout_s
        self.upload_timeout_s = upload_timeout_s
        # Auto-stop must not hit a sandbox in the middle of a long cell.
        cell_minutes = math.ceil(settings.limits.cell_timeout_s / 60) + 1
        self.auto_stop_minutes = max(1, settings.daytona_auto_stop_minutes, cell_minutes)
        self._owned: dict[str, DaytonaSandbox] = {}

    def create(self, spec: SandboxSpec) -> Sandbox:
        return DaytonaSandbox(spec, self)

    def new_client(self) -> AsyncDaytona:
        config = DaytonaConfig(api_key=self.settings.daytona_api_key, api_url=self.settings.daytona_api_url,
                               target=self.settings.daytona_target)
        try:
            return AsyncDaytona(config)
        except DaytonaError as exc:
            raise SandboxError(f"cannot set up the Daytona client: {exc}") from exc

    def adopt(self, sandbox: DaytonaSandbox) -> None:
        self._owned[sandbox.name] = sandbox

    def forget(self, sandbox: DaytonaSandbox) -> None:
        self._owned.pop(sandbox.name, None)

    @property
    def owned(self) -> list[str]:
        """Names of the sandboxes this provider created and has not deleted yet."""
        return list(self._owned)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        for sandbox in list(self._owned.values()):
            try:
                if sandbox._loop is loop:
                    await sandbox.close()
                else:
                    await self._delete_by_name(sandbox.name)
            except Exception as exc:
                log.error("could not delete Daytona sandbox %s on shutdown: %s", sandbox.name, exc)
            finally:
                self.forget(sandbox)

    async def _delete_by_name(self, name: str) -> None:
        """Delete a sandbox from a fresh client (its own client belongs to another event loop)."""
        client = self.new_client()
        try:
            remote = await asyncio.wait_for(client.get(name), self.api_timeout_s)
            await asyncio.wait_for(client.delete(remote, timeout=30), 35)
        except DaytonaNotFoundError:
            pass
        finally:
            with contextlib.suppress(Exception):
                await client.close()
