"""The Daytona provider: the face the sandbox registry sees. It makes :class:`DaytonaSandbox`es
over one :class:`DaytonaAccount` and deletes every sandbox still owned on ``aclose``."""

from __future__ import annotations

from rlm_mcp.config import Settings
from rlm_mcp.errors import ConfigError
from rlm_mcp.sandbox.base import Sandbox, SandboxSpec
from rlm_mcp.sandbox.daytona.account import DaytonaAccount
from rlm_mcp.sandbox.daytona.sandbox import DaytonaSandbox


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
        self.account = DaytonaAccount(settings, api_timeout_s=api_timeout_s, create_timeout_s=create_timeout_s,
                                      upload_timeout_s=upload_timeout_s)

    def create(self, spec: SandboxSpec) -> Sandbox:
        return DaytonaSandbox(spec, self.account)

    @property
    def owned(self) -> list[str]:
        """Names of the sandboxes this provider created and has not deleted yet."""
        return self.account.owned

    async def aclose(self) -> None:
        await self.account.delete_owned()
