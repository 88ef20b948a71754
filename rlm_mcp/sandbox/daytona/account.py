"""What the sandboxes of one Daytona provider share: the API settings and deadlines, a fresh SDK
client per sandbox, SDK calls under a deadline with failures mapped to messages, and the register
of the sandboxes not deleted yet (deleted on ``aclose``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Awaitable, Protocol, TypeVar

from daytona import AsyncDaytona, DaytonaConfig
from daytona.common.errors import DaytonaError, DaytonaNotFoundError, DaytonaTimeoutError

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.daytona.errors import describe_error

log = logging.getLogger(__name__)

T = TypeVar("T")


class OwnedSandbox(Protocol):
    """What the register needs of a sandbox: its unique name, the event loop its client belongs
    to (None before it starts), and close() to delete it."""

    name: str
    loop: asyncio.AbstractEventLoop | None

    async def close(self) -> None: ...


class DaytonaAccount:
    """The Daytona API as one provider's sandboxes use it.

    Each sandbox owns its SDK client (an aiohttp session is bound to the event loop it was
    made in), so the account holds no connections of its own.
    """

    def __init__(self, settings: Settings, *, api_timeout_s: float, create_timeout_s: float,
                 upload_timeout_s: float) -> None:
        self.settings = settings
        self.api_timeout_s = api_timeout_s
        self.create_timeout_s = create_timeout_s
        self.upload_timeout_s = upload_timeout_s
        # Auto-stop must not hit a sandbox in the middle of a long cell.
        cell_minutes = math.ceil(settings.limits.cell_timeout_s / 60) + 1
        self.auto_stop_minutes = max(1, settings.daytona_auto_stop_minutes, cell_minutes)
        self._owned: dict[str, OwnedSandbox] = {}

    def new_client(self) -> AsyncDaytona:
        config = DaytonaConfig(api_key=self.settings.daytona_api_key, api_url=self.settings.daytona_api_url,
                               target=self.settings.daytona_target)
        try:
            return AsyncDaytona(config)
        except DaytonaError as exc:
            raise SandboxError(f"cannot set up the Daytona client: {exc}") from exc

    async def api(self, awaitable: Awaitable[T], *, raw: bool = False, timeout: float | None = None,
                  doing: str = "calling the Daytona API") -> T:
        """Await one SDK call under a deadline; unless ``raw``, failures become SandboxError."""
        limit = timeout or self.api_timeout_s
        try:
            return await asyncio.wait_for(awaitable, limit)
        except asyncio.TimeoutError as exc:
            if raw:
                raise DaytonaTimeoutError(f"no answer in {limit:g} s") from exc
            raise SandboxError(describe_error(DaytonaTimeoutError(f"no answer in {limit:g} s"),
                                              doing, self.settings)) from exc
        except (DaytonaError, OSError) as exc:
            if raw:
                raise
            raise SandboxError(describe_error(exc, doing, self.settings)) from exc

    # ----- the register of sandboxes not deleted yet -------------------------------------------

    def adopt(self, sandbox: OwnedSandbox) -> None:
        self._owned[sandbox.name] = sandbox

    def forget(self, sandbox: OwnedSandbox) -> None:
        self._owned.pop(sandbox.name, None)

    @property
    def owned(self) -> list[str]:
        """Names of the sandboxes created and not deleted yet."""
        return list(self._owned)

    async def delete_owned(self) -> None:
        """Delete every sandbox still in the register (on the provider's ``aclose``)."""
        loop = asyncio.get_running_loop()
        for sandbox in list(self._owned.values()):
            try:
                if sandbox.loop is loop:
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
