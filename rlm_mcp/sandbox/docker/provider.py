"""The Docker provider: the face the sandbox registry sees. It makes :class:`DockerSandbox`es
over one :class:`Containers` (client, containers, volumes, warm pool), which it owns."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import Sandbox, SandboxSpec
from rlm_mcp.sandbox.docker.containers import Containers, ContextTransfer
from rlm_mcp.sandbox.docker.sandbox import DockerSandbox


class DockerProvider:
    """Creates Docker sandboxes; its :class:`Containers` own the docker-py client, the warm
    pool and the clean-up.

    ``context_transfer`` is ``"bind"`` (host directory bind mount), ``"volume"`` (copy into a
    volume: for remote engines) or None to choose by the engine's address.

    With ``settings.docker_pool_size`` N > 0, N started containers wait for a run; the pool
    starts filling on the first :meth:`create` (or :meth:`warm_up`, to fill it ahead) and
    refills in the background.
    """

    name = "docker"

    def __init__(self, settings: Settings, *, context_transfer: ContextTransfer | None = None) -> None:
        self.settings = settings
        self.containers = Containers(settings, context_transfer)

    def create(self, spec: SandboxSpec) -> Sandbox:
        if self.containers.closed:
            raise SandboxError("the Docker sandbox provider is closed")
        with contextlib.suppress(RuntimeError):  # no running loop: the pool starts on first take
            self.containers.kick_pool()
        return DockerSandbox(spec, self.containers)

    @property
    def context_transfer(self) -> ContextTransfer:
        """How a run's context reaches its container (decided on first contact with the engine)."""
        return self.containers.context_transfer

    @property
    def mounts_dir(self) -> Path:
        """This server's directory of per-container mount directories (removed by aclose)."""
        return self.containers.mounts_dir

    @property
    def pool_size(self) -> int:
        return self.containers.pool_size

    async def warm_up(self, timeout: float = 120.0) -> None:
        """Connect, reap leftovers and fill the warm pool; return once it is full."""
        await self.containers.warm_up(timeout)

    def pooled_ids(self) -> list[str]:
        """Ids of the started containers waiting in the warm pool."""
        return self.containers.pooled_ids()

    async def aclose(self) -> None:
        """Remove the pool and every container, volume and directory this provider made."""
        await self.containers.aclose()
