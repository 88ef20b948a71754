"""The containers of one Docker provider: the docker-py client, creating, attaching and
removing containers, the context volumes of remote engines, and the warm pool of started
containers. The sandboxes (``sandbox``) and their attach streams (``transport``) take, use and
dispose of containers through :class:`Containers`; the provider (``provider``) owns one."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import socket
import ssl
import tarfile
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import LogConfig, Mount, Ulimit

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.private import private_dir
from rlm_mcp.sandbox.channel import WORKER_SCRIPT
from rlm_mcp.sandbox.docker.engine import connect, docker_errors, engine_is_remote
from rlm_mcp.sandbox.docker.reaping import (
    LABEL, LABEL_VALUE, MOUNTS_DIRNAME, OWNER_LABEL, POOL_LABEL, PROVIDER_LABEL, mounts_dir_name, reap_leftovers)
from rlm_mcp.sandbox.leftovers import owner_token

log = logging.getLogger(__name__)

CONTAINER_USER = "65534:65534"
WORKER_PATH = "/opt/rlm/worker.py"
CONTEXT_DIR = "/context"
POOL_RETRY_MAX_S = 30.0

ContextTransfer = Literal["bind", "volume"]


@dataclass
class Box:
    """One started container with its attach socket and host-side mount directory."""

    container: Container
    attach: Any                      # what docker-py returned (kept alive with the socket)
    sock: Any                        # the raw socket (socket.socket, SSLSocket or SSH channel)
    mount_dir: Path | None = None
    pooled: bool = False
    disposed: bool = field(default=False, repr=False)

    @property
    def short_id(self) -> str:
        return self.container.short_id


class Containers:
    """The containers of one provider: the docker-py client, the live containers, the warm pool
    and the clean-up.

    ``context_transfer`` is ``"bind"`` (host directory bind mount), ``"volume"`` (copy into a
    volume: for remote engines) or None to choose by the engine's address.

    With ``settings.docker_pool_size`` N > 0, N started containers wait for a run; the pool
    starts filling on the first :meth:`kick_pool` (or :meth:`warm_up`, to fill it ahead) and
    refills in the background. Pooled containers carry the provider's labels only, not the
    ``spec.labels`` of the run that later takes them (labels are fixed at creation).
    """

    def __init__(self, settings: Settings, context_transfer: ContextTransfer | None = None) -> None:
        if context_transfer not in (None, "bind", "volume"):
            raise SandboxError(f"context_transfer must be 'bind' or 'volume', got {context_transfer!r}")
        self.settings = settings
        self.owner = owner_token()
        self.provider_id = uuid.uuid4().hex[:12]
        self._requested_transfer = context_transfer
        self.context_transfer: ContextTransfer = context_transfer or "bind"
        self.mounts_root = settings.home / MOUNTS_DIRNAME
        self.mounts_dir = self.mounts_root / mounts_dir_name()
        self._client: docker.DockerClient | None = None
        self._prepare_lock = threading.Lock()
        self._live: dict[str, Box] = {}
        self._live_lock = threading.Lock()
        self.closed = False
        self._pool: collections.deque[Box] = collections.deque()
        self._filler: asyncio.Task[None] | None = None
        self._filler_loop: asyncio.AbstractEventLoop | None = None
        self._pool_wanted: asyncio.Event | None = None
        self._pool_full: asyncio.Event | None = None
        self._pool_error: SandboxError | None = None

    # ----- public ------------------------------------------------------------------------------

    @property
    def pool_size(self) -> int:
        return max(0, self.settings.docker_pool_size) if self.context_transfer == "bind" else 0

    async def warm_up(self, timeout: float = 120.0) -> None:
        """Connect, reap leftovers and fill the warm pool; return once it is full."""
        await asyncio.to_thread(self.prepare)
        if self.pool_size == 0:
            return
        self.kick_pool()
        assert self._pool_full is not None
        try:
            await asyncio.wait_for(self._pool_full.wait(), timeout)
        except asyncio.TimeoutError:
            raise self._pool_error or SandboxError(f"the warm pool did not fill within {timeout:g} s") from None

    def pooled_ids(self) -> list[str]:
        """Ids of the started containers waiting in the warm pool."""
        return [box.container.id for box in self._pool]

    async def aclose(self) -> None:
        """Remove the pool and every container, volume and directory this provider made."""
        self.closed = True
        if self._pool_wanted is not None:
            self._pool_wanted.set()
        filler = self._filler
        if filler is not None and not filler.done():
            if self._filler_loop is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(filler), 30.0)
            filler.cancel()
        if self._client is not None:
            await asyncio.to_thread(self._remove_everything)
        shutil.rmtree(self.mounts_dir, ignore_errors=True)

    # ----- engine ------------------------------------------------------------------------------

    def prepare(self) -> docker.DockerClient:
        """Connect once: check the image, pick the context transfer, reap leftovers."""
        with self._prepare_lock:
            if self.closed:
                raise SandboxError("the Docker sandbox provider is closed")
            if self._client is not None:
                return self._client
            client = connect()
            try:
                with docker_errors("inspect the sandbox image", self.settings.docker_image):
                    client.images.get(self.settings.docker_image)
                if self._requested_transfer is None and engine_is_remote(client):
                    self.context_transfer = "volume"
                with docker_errors("clean up leftover sandbox containers"):
                    reaped = reap_leftovers(client, self.mounts_root)
                if reaped:
                    log.info("reaped %d leftover sandbox item(s)", reaped)
            except BaseException:
                client.close()
                raise
            self._client = client
            return client

    def _labels(self, extra: dict[str, str] | None = None, *, pooled: bool = False) -> dict[str, str]:
        labels = {str(k): str(v) for k, v in (extra or {}).items()}
        labels.update({LABEL: LABEL_VALUE, OWNER_LABEL: self.owner, PROVIDER_LABEL: self.provider_id})
        if pooled:
            labels[POOL_LABEL] = "1"
        return labels

    def _container_options(self) -> dict[str, Any]:
        settings = self.settings
        memory = f"{settings.sandbox_memory_mb}m"
        options: dict[str, Any] = dict(
            stdin_open=True, tty=False, init=True,
            network_mode="none", read_only=True, user=CONTAINER_USER,
            cap_drop=["ALL"], security_opt=["no-new-privileges"],
            mem_limit=memory, memswap_limit=memory, pids_limit=settings.sandbox_pids,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={settings.sandbox_memory_mb}m,mode=1777"},
            # RLIMIT_DATA at the memory limit turns one oversized allocation into a clean
            # MemoryError (REPL state kept) instead of an OOM kill of the whole container.
            ulimits=[Ulimit(name="core", soft=0, hard=0),
                     Ulimit(name="data", soft=settings.sandbox_memory_mb << 20, hard=settings.sandbox_memory_mb << 20)],
            working_dir="/tmp", hostname="sandbox",
            environment={"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                         "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"},
            log_config=LogConfig(type="none"),
        )
        if settings.sandbox_cpus > 0:
            options["nano_cpus"] = int(settings.sandbox_cpus * 1e9)
        return options

    def create_box(self, *, volume: str | None = None, labels: dict[str, str] | None = None,
                    pooled: bool = False) -> Box:
        """Create, attach and start one container (blocking: run in a thread)."""
        client = self.prepare()
        image = self.settings.docker_image
        mount_dir: Path | None = None
        if volume is None:
            private_dir(self.mounts_root)  # 0700 from creation on: contexts are copied below it
            self.mounts_dir.mkdir(exist_ok=True)
            mount_dir = Path(tempfile.mkdtemp(prefix="c-", dir=self.mounts_dir))
            os.chmod(mount_dir, 0o755)  # the container user must read it; the parent stays private
            mounts = [Mount(WORKER_PATH, str(WORKER_SCRIPT), type="bind", read_only=True),
                      Mount(CONTEXT_DIR, str(mount_dir), type="bind", read_only=True)]
            command = ["python3", "-I", "-u", WORKER_PATH]
        else:
            mounts = [Mount(CONTEXT_DIR, volume, type="volume", read_only=True)]
            command = ["python3", "-I", "-u", f"{CONTEXT_DIR}/worker.py"]
        container: Container | None = None
        try:
            with docker_errors("create a sandbox container", image):
                container = client.containers.create(
                    image, command, mounts=mounts, labels=self._labels(labels, pooled=pooled),
                    **self._container_options())
                attach = client.api.attach_socket(
                    container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
                container.start()
        except BaseException:
            if container is not None:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
            if mount_dir is not None:
                shutil.rmtree(mount_dir, ignore_errors=True)
            raise
        box = Box(container, attach, getattr(attach, "_sock", attach), mount_dir, pooled)
        with self._live_lock:
            self._live[container.id] = box
        if self.closed:  # aclose() ran while this container was being made
            self.dispose(box)
            raise SandboxError("the Docker sandbox provider is closed")
        return box

    def dispose(self, box: Box) -> None:
        """Remove a container and its mount directory (blocking; safe to call twice)."""
        if box.disposed:
            return
        box.disposed = True
        with contextlib.suppress(OSError):
            box.sock.shutdown(socket.SHUT_RDWR)  # wakes a pending read with EOF
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError,
                                 requests.exceptions.RequestException):
            box.container.remove(force=True)
        for closable in (box.sock, box.attach):
            with contextlib.suppress(Exception):
                closable.close()
        if box.mount_dir is not None:
            shutil.rmtree(box.mount_dir, ignore_errors=True)
        with self._live_lock:
            self._live.pop(box.container.id, None)

    def _remove_everything(self) -> None:
        with self._live_lock:
            boxes = list(self._live.values())
        boxes.extend(self._pool)
        self._pool.clear()
        for box in boxes:
            self.dispose(box)
        client = self._client
        if client is None:
            return
        # Anything still labelled as ours (e.g. created by a thread that outlived its task).
        with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
            for container in client.containers.list(all=True, filters={"label": f"{PROVIDER_LABEL}={self.provider_id}"},
                                                    ignore_removed=True):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.remove(force=True)
            for volume in client.volumes.list(filters={"label": f"{PROVIDER_LABEL}={self.provider_id}"}):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    volume.remove(force=True)
        client.close()

    # ----- remote engines: context in a volume ----------------------------------------------------

    def make_volume(self, path: Path | None) -> str:
        """A labelled volume holding worker.py and the context file (blocking)."""
        client = self.prepare()
        image = self.settings.docker_image
        with docker_errors("copy the context into a Docker volume", image):
            volume = client.volumes.create(name=f"rlm-mcp-ctx-{uuid.uuid4().hex[:16]}", labels=self._labels())
            try:
                helper = client.containers.create(
                    image, ["true"], network_mode="none", labels=self._labels(),
                    mounts=[Mount(CONTEXT_DIR, volume.name, type="volume")], log_config=LogConfig(type="none"))
                try:
                    with tempfile.TemporaryFile() as archive:
                        with tarfile.open(fileobj=archive, mode="w") as tar:
                            for name, source in (("worker.py", WORKER_SCRIPT), ("data", path)):
                                if source is not None:
                                    info = tar.gettarinfo(str(source), arcname=name)
                                    info.mode, info.uid, info.gid, info.uname, info.gname = 0o444, 0, 0, "", ""
                                    with open(source, "rb") as handle:
                                        tar.addfile(info, handle)
                        archive.seek(0)
                        helper.put_archive(CONTEXT_DIR, archive)
                finally:
                    helper.remove(force=True)
            except BaseException:
                with contextlib.suppress(Exception):
                    volume.remove(force=True)
                raise
        return volume.name

    def remove_volume(self, name: str) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError,
                                 requests.exceptions.RequestException):
            client.volumes.get(name).remove(force=True)

    # ----- warm pool --------------------------------------------------------------------------

    async def take(self, labels: dict[str, str]) -> Box:
        """A started container for one worker: from the pool when one waits, else a new one."""
        if self.pool_size:
            self.kick_pool()
            assert self._pool_full is not None and self._pool_wanted is not None
            while self._pool:
                box = self._pool.popleft()
                self._pool_full.clear()
                self._pool_wanted.set()
                if _stream_open(box):
                    return box
                log.warning("warm pool: container %s stopped while waiting; discarded", box.short_id)
                await asyncio.to_thread(self.dispose, box)
        return await asyncio.to_thread(self.create_box, labels=labels)

    def kick_pool(self) -> None:
        """Start (or wake) the background refill on the running loop."""
        if not self.pool_size or self.closed:
            return
        loop = asyncio.get_running_loop()
        if self._filler is None or self._filler.done() or self._filler_loop is not loop:
            self._pool_wanted, self._pool_full = asyncio.Event(), asyncio.Event()
            self._filler_loop = loop
            self._filler = loop.create_task(self._fill_pool(), name="rlm-docker-pool")
        assert self._pool_wanted is not None
        self._pool_wanted.set()

    async def _fill_pool(self) -> None:
        assert self._pool_wanted is not None and self._pool_full is not None
        wanted, full = self._pool_wanted, self._pool_full
        failures = 0
        while not self.closed:
            try:
                await asyncio.to_thread(self.prepare)
            except SandboxError as exc:
                if self.closed:
                    return
                failures += 1
                self._pool_error = exc
                log.warning("warm pool: %s (retrying)", exc)
                await asyncio.sleep(min(POOL_RETRY_MAX_S, 0.5 * 2 ** failures))
                continue
            missing = self.pool_size - len(self._pool)  # 0 once a remote engine means volumes
            if missing <= 0:
                full.set()
                wanted.clear()
                await wanted.wait()
                continue
            results = await asyncio.gather(
                *(asyncio.to_thread(self.create_box, pooled=True) for _ in range(missing)),
                return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            for box in results:
                if isinstance(box, Box):
                    if self.closed:
                        await asyncio.to_thread(self.dispose, box)
                    else:
                        self._pool.append(box)
            if errors and not self.closed:
                failures += 1
                first = errors[0]
                self._pool_error = first if isinstance(first, SandboxError) else SandboxError(
                    f"cannot start pooled sandbox containers: {first!r}")
                log.warning("warm pool: %s (retrying)", self._pool_error)
                await asyncio.sleep(min(POOL_RETRY_MAX_S, 0.5 * 2 ** failures))
            else:
                failures, self._pool_error = 0, None


def _stream_open(box: Box) -> bool:
    """False when a pooled container's attach stream has already ended (its worker is gone)."""
    sock = box.sock
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return True  # cannot peek without blocking; a dead worker shows up at init instead
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # nothing to read yet: the worker is waiting for init
    except OSError:
        return False
