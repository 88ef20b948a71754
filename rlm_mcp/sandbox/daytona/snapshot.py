"""``rlm-mcp sandbox daytona-snapshot``: the snapshot Daytona sandboxes start from, built in Daytona
from the packaged ``images/daytona/Dockerfile``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from daytona import AsyncDaytona, CreateSnapshotParams, DaytonaConfig, Image, Resources
from daytona.common.errors import DaytonaError

from rlm_mcp.config import Settings
from rlm_mcp.errors import ConfigError, SandboxError
from rlm_mcp.sandbox.base import image_definitions
from rlm_mcp.sandbox.daytona.sandbox import DEFAULT_SNAPSHOT

SNAPSHOT_DISK_GB = 3


async def create_snapshot(settings: Settings, *, name: str | None = None, cpu: int | None = None,
                          memory_gb: int | None = None, disk_gb: int | None = None,
                          dockerfile: Path | None = None) -> str:
    """Build the sandbox snapshot in Daytona from the packaged ``images/daytona/Dockerfile``;
    return its name. Unset sizes come from the settings (``RLM_MCP_SANDBOX_CPUS``,
    ``RLM_MCP_SANDBOX_MEMORY_MB``); build logs go to stderr (``rlm-mcp sandbox daytona-snapshot``)."""
    if not settings.daytona_api_key:
        raise ConfigError("set DAYTONA_API_KEY (app.daytona.io -> Keys) before creating the snapshot")
    name = name or settings.daytona_snapshot or DEFAULT_SNAPSHOT
    cpu = cpu or max(1, math.ceil(settings.sandbox_cpus))
    memory_gb = memory_gb or max(1, math.ceil(settings.sandbox_memory_mb / 1024))
    disk_gb = disk_gb or SNAPSHOT_DISK_GB
    dockerfile = dockerfile or image_definitions() / "daytona" / "Dockerfile"
    if not dockerfile.is_file():
        raise ConfigError(f"no Dockerfile at {dockerfile}: pass an existing file")
    config = DaytonaConfig(api_key=settings.daytona_api_key, api_url=settings.daytona_api_url,
                           target=settings.daytona_target)
    try:
        async with AsyncDaytona(config) as client:
            params = CreateSnapshotParams(name=name, image=Image.from_dockerfile(dockerfile),
                                          resources=Resources(cpu=cpu, memory=memory_gb, disk=disk_gb))
            snapshot = await client.snapshot.create(params, on_logs=lambda line: print(line, file=sys.stderr))
    except DaytonaError as exc:
        raise SandboxError(f"creating the Daytona snapshot {name!r} failed: {exc}") from exc
    print(f"snapshot {snapshot.name} is {snapshot.state}", file=sys.stderr)
    return str(snapshot.name)
