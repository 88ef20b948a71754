"""One Docker sandbox: a REPL whose worker lives in a container, and the hand-over of the
run's context file into that container."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from pathlib import Path

from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import SandboxSpec
from rlm_mcp.sandbox.channel import WorkerSandbox, WorkerTransport
from rlm_mcp.sandbox.docker.containers import CONTEXT_DIR, Containers
from rlm_mcp.sandbox.docker.transport import DockerTransport

CONTEXT_PATH = f"{CONTEXT_DIR}/data"


class DockerSandbox(WorkerSandbox):
    """``worker.py`` in a hardened container; a restart replaces the container."""

    def __init__(self, spec: SandboxSpec, containers: Containers) -> None:
        super().__init__(spec)
        self.containers = containers
        self._volume: str | None = None
        self._current: DockerTransport | None = None

    @property
    def container_id(self) -> str | None:
        """The id of the container currently serving this sandbox (None when there is none)."""
        current = self._current
        return None if current is None or current.box.disposed else current.box.container.id

    def _worker_context_path(self) -> str | None:
        return None if self.spec.context.path is None else CONTEXT_PATH

    async def _launch(self) -> WorkerTransport:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        path = self.spec.context.path
        if path is not None and not Path(path).is_file():
            raise SandboxError(f"the context file {path} does not exist (or is not a file)")
        await asyncio.to_thread(self.containers.prepare)  # decides bind vs volume on first use
        if self.containers.context_transfer == "volume":
            if self._volume is None:
                self._volume = await asyncio.to_thread(self.containers.make_volume, path)
            box = await asyncio.to_thread(self.containers.create_box, volume=self._volume, labels=self.spec.labels)
        else:
            box = await self.containers.take(self.spec.labels)
            try:
                await asyncio.to_thread(_place_context, path, box.mount_dir)
            except OSError as exc:
                await asyncio.to_thread(self.containers.dispose, box)
                raise SandboxError(f"cannot hand the context file to the container: {exc}") from exc
        self._current = DockerTransport(box, self.containers)
        return self._current

    async def _release(self) -> None:
        volume, self._volume = self._volume, None
        if volume is not None:
            await asyncio.to_thread(self.containers.remove_volume, volume)


def _place_context(path: Path | None, mount_dir: Path | None) -> None:
    """Make ``path`` appear as ``data`` in the container's mount directory (link, else copy)."""
    if path is None or mount_dir is None:
        return
    target = mount_dir / "data"
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    if os.stat(path).st_mode & stat.S_IROTH:
        # A hard link costs nothing; it fails across filesystems (EXDEV) or where links are
        # not allowed, and then the copy below is the way.
        with contextlib.suppress(OSError):
            os.link(path, target)
    if not target.exists():
        shutil.copyfile(path, target)
        os.chmod(target, 0o444)
