"""The Docker backend: one hardened, long-lived container per sandbox.

Each sandbox runs ``python3 -I -u /opt/rlm/worker.py`` in a container of ``settings.docker_image``
and talks to it over the container's attached stdin/stdout (the same JSON-lines protocol as the
local backend). The worker script is bind-mounted read-only from this package, so host and
container versions never drift; the image only needs ``python3``.

Hardening, always on: no network (``network_mode="none"``), read-only root filesystem with a
tmpfs at ``/tmp`` (also ``HOME``), user 65534:65534, all capabilities dropped,
``no-new-privileges``, memory (no swap), CPU and process-count limits from the settings, an init
process, no environment from the host, no log driver (the protocol carries prompts and context
excerpts: nothing is written to Docker's logs).

Context hand-over: every container is created with its own empty host directory bind-mounted
read-only at ``/context``. When a sandbox takes a container, the run's context file is
hard-linked into that directory as ``data`` (O(1) on the same filesystem; copied otherwise, or
when the file is not world-readable, because the container user is not the host user). The
container sees it at ``/context/data`` at once, which is what lets a warm pool start containers
before the run's context is known. Pooled containers are never reused: a container serves one
worker and is removed with it.

Remote engines: when ``DOCKER_HOST`` points at a TCP or SSH engine, bind mounts would name paths
on the engine's machine, so the worker script and the context file are copied once per sandbox
into a labelled Docker volume (through a short-lived helper container) and mounted read-only
from there; the warm pool is not used in that mode.

Clean-up: containers are removed when their sandbox closes, when a stuck worker is killed, and
on :meth:`DockerProvider.aclose`. Every container, volume and mount directory is labelled with
the owning server process (host name, pid and the pid's start time); when a provider first
talks to the engine it reaps what a dead server on this host left behind, plus any stopped
sandbox container (see :func:`reap_leftovers`).

This is the only module that imports docker-py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import docker.utils
import requests.exceptions
from docker.models.containers import Container
from docker.types import LogConfig, Mount, Ulimit

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import Sandbox, SandboxSpec, image_definitions
from rlm_mcp.sandbox.channel import WORKER_SCRIPT, WorkerGone, WorkerSandbox, WorkerTransport, describe_stop, message_too_large
from rlm_mcp.sandbox.leftovers import dead_owner_in_name, owner_dir_name, owner_is_dead, owner_token

log = logging.getLogger(__name__)

LABEL = "rlm-mcp"
LABEL_VALUE = "sandbox"
OWNER_LABEL = "rlm-mcp.owner"        # host:pid:start-time of the server process
PROVIDER_LABEL = "rlm-mcp.provider"  # one DockerProvider instance (aclose removes its own)
POOL_LABEL = "rlm-mcp.pool"          # "1" on containers started ahead for the warm pool

CONTAINER_USER = "65534:65534"
WORKER_PATH = "/opt/rlm/worker.py"
CONTEXT_DIR = "/context"
CONTEXT_PATH = "/context/data"
MOUNTS_DIRNAME = "docker-mounts"

ONLINE_BASE_IMAGE = "python:3.12-slim"
OFFLINE_BASE_IMAGE = "rlm-mcp-base:bookworm"

STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 4096
FRAME_HEADER = 8
POOL_RETRY_MAX_S = 30.0

ContextTransfer = Literal["bind", "volume"]

NO_ENGINE_HELP = (
    "start Docker (Docker Desktop, `sudo systemctl start docker`, or run `dockerd` as root) "
    "and check DOCKER_HOST, or use the process sandbox instead with RLM_MCP_SANDBOX=local")


def print_to_stderr(line: str) -> None:
    """Default build logger: build output goes to stderr, never to stdout."""
    print(line, file=sys.stderr, flush=True)


# ----- ownership and reaping ---------------------------------------------------------------------


def mounts_dir_name(pid: int | None = None) -> str:
    """Name of a server process's directory of per-container mounts (``host_pid_start``)."""
    return owner_dir_name(pid)


def reap_leftovers(client: docker.DockerClient, mounts_root: Path | None = None) -> int:
    """Remove what crashed rlm-mcp servers left behind; return how many items were removed.

    Policy: a sandbox container (label ``rlm-mcp=sandbox``) is removed when it is no longer
    running (its worker exited: it can never serve again), or when its owner label names a
    process on this host that is dead (or whose pid now belongs to a newer process). Running
    containers of live servers, and of other machines sharing a remote engine, are left alone.
    Volumes and host mount directories of dead owners on this host are removed too.
    """
    removed = 0
    # ignore_removed: containers may vanish (auto-remove) between the listing and their inspection
    for container in client.containers.list(all=True, filters={"label": f"{LABEL}={LABEL_VALUE}"},
                                            ignore_removed=True):
        owner = container.labels.get(OWNER_LABEL, "")
        if container.status in ("running", "restarting", "paused") and not owner_is_dead(owner):
            continue
        if container.status == "created" and not owner_is_dead(owner):
            continue  # a live server may be between create and start
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)
            removed += 1
            log.info("removed leftover sandbox container %s (owner %s, %s)",
                     container.short_id, owner or "unknown", container.status)
    for volume in client.volumes.list(filters={"label": f"{LABEL}={LABEL_VALUE}"}):
        if owner_is_dead((volume.attrs.get("Labels") or {}).get(OWNER_LABEL, "")):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                volume.remove(force=True)
                removed += 1
    if mounts_root is not None and mounts_root.is_dir():
        for entry in mounts_root.iterdir():
            if dead_owner_in_name(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def reap_at_start(settings: Settings) -> int:
    """:func:`reap_leftovers` at server start, when an engine answers on this machine's socket
    (blocking: run in a thread). A machine without Docker is not an error here."""
    path = local_socket_path()
    if path is None or not os.path.exists(path):
        return 0  # no local engine (a remote one is reaped when a provider first connects)
    try:
        client = connect()
    except SandboxError as exc:
        log.debug("no Docker leftovers reaped at start: %s", exc)
        return 0
    try:
        with _docker_errors("clean up leftover sandbox containers"):
            return reap_leftovers(client, settings.home / MOUNTS_DIRNAME)
    except SandboxError as exc:
        log.warning("could not reap leftover sandbox containers at start: %s", exc)
        return 0
    finally:
        client.close()


# ----- errors ------------------------------------------------------------------------------------


def _missing_image_error(image: str) -> SandboxError:
    return SandboxError(
        f"the Docker sandbox image {image!r} is not on this Docker engine: run `rlm-mcp sandbox "
        "build` (add --offline without registry access), or set RLM_MCP_DOCKER_IMAGE to an "
        "image that has python3")


@contextlib.contextmanager
def _docker_errors(action: str, image: str | None = None) -> Iterator[None]:
    """Turn docker-py failures into SandboxErrors that say what to do."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        if image is None:
            raise SandboxError(f"Docker could not {action}: {exc.explanation or exc}") from exc
        raise _missing_image_error(image) from exc
    except docker.errors.APIError as exc:
        raise SandboxError(f"Docker could not {action}: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise SandboxError(f"cannot reach the Docker engine to {action} ({exc}): {NO_ENGINE_HELP}") from exc
    except requests.exceptions.RequestException as exc:
        raise SandboxError(f"the Docker engine did not answer while trying to {action}: {exc}") from exc


def local_socket_path() -> str | None:
    """The unix socket the environment points docker-py at (None for TCP, SSH, named pipes)."""
    base = docker.utils.kwargs_from_env().get("base_url")
    if base is None:
        return None if os.name == "nt" else "/var/run/docker.sock"
    for scheme in ("unix://", "http+unix://"):
        if base.startswith(scheme):
            return base[len(scheme):]
    return None


def connect() -> docker.DockerClient:
    """A client for the engine named by the environment (DOCKER_HOST etc.), checked with a ping."""
    path = local_socket_path()
    if path is not None:
        # Checked with our own socket first: docker-py leaks its socket when connecting fails.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(10)
            try:
                probe.connect(path)
            except OSError as exc:
                raise SandboxError(f"no Docker engine answers at unix://{path} "
                                   f"({exc.strerror or exc}): {NO_ENGINE_HELP}") from exc
    try:
        client = docker.from_env(max_pool_size=32)  # calls run concurrently from worker threads
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise SandboxError(f"no Docker engine answers ({exc}): {NO_ENGINE_HELP}") from exc
    return client


def engine_is_remote(client: docker.DockerClient) -> bool:
    """True when the engine is reached over TCP or SSH, where host paths cannot be bind-mounted."""
    base = client.api.base_url
    return not (base.startswith("http+docker://localhost") or base.startswith("http+docker://localnpipe"))


# ----- containers --------------------------------------------------------------------------------


@dataclass
class _Box:
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


class DockerTransport(WorkerTransport):
    """The attach stream of one container: stdin out, multiplexed stdout/stderr frames in.

    Frames are ``[stream, 0, 0, 0, size (4 bytes big-endian)] + payload``; stream 1 is the
    worker's protocol (stdout), stream 2 its stderr, kept as a bounded tail for describe_exit().
    Plain sockets are driven by the event loop; TLS sockets and SSH channels (remote engines)
    through threads. Docker's detach sequence (ctrl-p ctrl-q) cannot occur on stdin: the
    protocol is JSON, which escapes control characters.
    """

    def __init__(self, box: _Box, provider: "DockerProvider") -> None:
        self.box = box
        self.provider = provider
        self._native = isinstance(box.sock, socket.socket) and not isinstance(box.sock, ssl.SSLSocket)
        if self._native:
            box.sock.setblocking(False)
        self._raw = bytearray()
        self._out = bytearray()
        self._scan = 0
        self._eof = False
        self._write_lock = asyncio.Lock()
        self._input_closed = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_partial = ""
        self.state: dict[str, Any] | None = None

    # ----- I/O ---------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        if self._input_closed or self.box.disposed:
            raise WorkerGone("the container's stdin is closed")
        async with self._write_lock:
            try:
                if self._native:
                    await asyncio.get_running_loop().sock_sendall(self.box.sock, data)
                else:
                    await asyncio.to_thread(self.box.sock.sendall, data)
            except OSError as exc:
                raise WorkerGone(f"cannot write to the container: {exc}") from exc

    async def _recv(self) -> bytes:
        if self._native:
            return await asyncio.get_running_loop().sock_recv(self.box.sock, 1 << 16)
        return await asyncio.to_thread(self.box.sock.recv, 1 << 16)

    async def receive_line(self) -> bytes:
        while True:
            end = self._out.find(b"\n", self._scan)
            if end >= 0:
                line = bytes(self._out[:end + 1])
                del self._out[:end + 1]
                self._scan = 0
                return line
            self._scan = len(self._out)
            if len(self._out) > self.max_message_bytes + 1:  # one partial line, already too long
                raise message_too_large(self.max_message_bytes)
            if self._eof:
                return b""
            try:
                chunk = await self._recv()
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                continue
            self._raw += chunk
            self._parse_frames()

    def _parse_frames(self) -> None:
        raw = self._raw
        offset = 0
        while len(raw) - offset >= FRAME_HEADER:
            stream = raw[offset]
            size = int.from_bytes(raw[offset + 4:offset + 8], "big")
            if size > self.max_message_bytes + 1:  # never wait for (and hold) a frame this big
                raise message_too_large(self.max_message_bytes)
            if len(raw) - offset - FRAME_HEADER < size:
                break
            payload = raw[offset + FRAME_HEADER:offset + FRAME_HEADER + size]
            offset += FRAME_HEADER + size
            if stream == 1:
                self._out += payload
            elif stream == 2:
                self._add_stderr(bytes(payload))
        del raw[:offset]

    def _add_stderr(self, payload: bytes) -> None:
        text = self._stderr_partial + payload.decode("utf-8", "replace")
        *lines, partial = text.split("\n")
        self._stderr_partial = partial[-STDERR_TAIL_CHARS:]
        for line in lines:
            self.stderr_tail.append(line.rstrip()[:STDERR_TAIL_CHARS])

    # ----- lifecycle ---------------------------------------------------------------------------

    async def kill(self) -> None:
        await asyncio.to_thread(self._snapshot_and_dispose)

    async def close(self) -> None:
        self._input_closed = True
        with contextlib.suppress(OSError):
            self.box.sock.shutdown(socket.SHUT_WR)  # the worker reads EOF and exits
        await asyncio.to_thread(self._wait_exit, 2.0)
        await asyncio.to_thread(self._snapshot_and_dispose)

    def _wait_exit(self, timeout: float) -> None:
        with contextlib.suppress(requests.exceptions.RequestException, docker.errors.DockerException):
            self.box.container.wait(timeout=timeout)

    def _snapshot_and_dispose(self) -> None:
        if self.state is None and not self.box.disposed:
            self._load_state()
        self.provider._dispose(self.box)

    def _load_state(self) -> None:
        with contextlib.suppress(requests.exceptions.RequestException, docker.errors.DockerException):
            self.box.container.reload()
            self.state = dict(self.box.container.attrs.get("State") or {})

    async def settle(self, timeout: float = 1.0) -> None:
        if self.box.disposed:
            return
        await asyncio.to_thread(self._wait_exit, timeout)
        await asyncio.to_thread(self._load_state)

    def describe_exit(self) -> str:
        state = self.state or {}
        code = state.get("ExitCode")
        if state.get("OOMKilled"):
            limit = self.provider.settings.sandbox_memory_mb
            tail = [line for line in self.stderr_tail if line.strip()][-3:]
            return f"killed for exceeding the sandbox memory limit ({limit} MB)" + (
                ": " + " | ".join(tail) if tail else "")
        if state.get("Running") or code is None:
            return describe_stop(None, None, self.stderr_tail)
        if code > 128:  # the shell convention docker reports for a signal
            return describe_stop(None, code - 128, self.stderr_tail)
        return describe_stop(code, None, self.stderr_tail)


class DockerSandbox(WorkerSandbox):
    """``worker.py`` in a hardened container; a restart replaces the container."""

    def __init__(self, spec: SandboxSpec, provider: "DockerProvider") -> None:
        super().__init__(spec)
        self.provider = provider
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
        await asyncio.to_thread(self.provider._prepare)  # decides bind vs volume on first use
        if self.provider.context_transfer == "volume":
            if self._volume is None:
                self._volume = await asyncio.to_thread(self.provider._make_volume, path)
            box = await asyncio.to_thread(self.provider._create_box, volume=self._volume, labels=self.spec.labels)
        else:
            box = await self.provider._take(self.spec.labels)
            try:
                await asyncio.to_thread(_place_context, path, box.mount_dir)
            except OSError as exc:
                await asyncio.to_thread(self.provider._dispose, box)
                raise SandboxError(f"cannot hand the context file to the container: {exc}") from exc
        self._current = DockerTransport(box, self.provider)
        return self._current

    async def _release(self) -> None:
        volume, self._volume = self._volume, None
        if volume is not None:
            await asyncio.to_thread(self.provider._remove_volume, volume)


def _stream_open(box: _Box) -> bool:
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


class DockerProvider:
    """Creates Docker sandboxes; owns the docker-py client, the warm pool and the clean-up.

    ``context_transfer`` is ``"bind"`` (host directory bind mount), ``"volume"`` (copy into a
    volume: for remote engines) or None to choose by the engine's address.

    With ``settings.docker_pool_size`` N > 0, N started containers wait for a run; the pool
    starts filling on the first :meth:`create` (or :meth:`warm_up`, to fill it ahead) and
    refills in the background. Pooled containers carry the provider's labels only, not the
    ``spec.labels`` of the run that later takes them (labels are fixed at creation).
    """

    name = "docker"

    def __init__(self, settings: Settings, *, context_transfer: ContextTransfer | None = None) -> None:
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
        self._live: dict[str, _Box] = {}
        self._live_lock = threading.Lock()
        self._closed = False
        self._pool: collections.deque[_Box] = collections.deque()
        self._filler: asyncio.Task[None] | None = None
        self._filler_loop: asyncio.AbstractEventLoop | None = None
        self._pool_wanted: asyncio.Event | None = None
        self._pool_full: asyncio.Event | None = None
        self._pool_error: SandboxError | None = None

    # ----- public ------------------------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> Sandbox:
        if self._closed:
            raise SandboxError("the Docker sandbox provider is closed")
        with contextlib.suppress(RuntimeError):  # no running loop: the pool starts on first take
            self._kick_pool()
        return DockerSandbox(spec, self)

    @property
    def pool_size(self) -> int:
        return max(0, self.settings.docker_pool_size) if self.context_transfer == "bind" else 0

    async def warm_up(self, timeout: float = 120.0) -> None:
        """Connect, reap leftovers and fill the warm pool; return once it is full."""
        await asyncio.to_thread(self._prepare)
        if self.pool_size == 0:
            return
        self._kick_pool()
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
        self._closed = True
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

    def _prepare(self) -> docker.DockerClient:
        """Connect once: check the image, pick the context transfer, reap leftovers."""
        with self._prepare_lock:
            if self._closed:
                raise SandboxError("the Docker sandbox provider is closed")
            if self._client is not None:
                return self._client
            client = connect()
            try:
                with _docker_errors("inspect the sandbox image", self.settings.docker_image):
                    client.images.get(self.settings.docker_image)
                if self._requested_transfer is None and engine_is_remote(client):
                    self.context_transfer = "volume"
                with _docker_errors("clean up leftover sandbox containers"):
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

    def _create_box(self, *, volume: str | None = None, labels: dict[str, str] | None = None,
                    pooled: bool = False) -> _Box:
        """Create, attach and start one container (blocking: run in a thread)."""
        client = self._prepare()
        image = self.settings.docker_image
        mount_dir: Path | None = None
        if volume is None:
            self.mounts_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.mounts_root, 0o700)
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
            with _docker_errors("create a sandbox container", image):
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
        box = _Box(container, attach, getattr(attach, "_sock", attach), mount_dir, pooled)
        with self._live_lock:
            self._live[container.id] = box
        if self._closed:  # aclose() ran while this container was being made
            self._dispose(box)
            raise SandboxError("the Docker sandbox provider is closed")
        return box

    def _dispose(self, box: _Box) -> None:
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
            self._dispose(box)
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

    def _make_volume(self, path: Path | None) -> str:
        """A labelled volume holding worker.py and the context file (blocking)."""
        client = self._prepare()
        image = self.settings.docker_image
        with _docker_errors("copy the context into a Docker volume", image):
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

    def _remove_volume(self, name: str) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError,
                                 requests.exceptions.RequestException):
            client.volumes.get(name).remove(force=True)

    # ----- warm pool --------------------------------------------------------------------------

    async def _take(self, labels: dict[str, str]) -> _Box:
        """A started container for one worker: from the pool when one waits, else a new one."""
        if self.pool_size:
            self._kick_pool()
            assert self._pool_full is not None and self._pool_wanted is not None
            while self._pool:
                box = self._pool.popleft()
                self._pool_full.clear()
                self._pool_wanted.set()
                if _stream_open(box):
                    return box
                log.warning("warm pool: container %s stopped while waiting; discarded", box.short_id)
                await asyncio.to_thread(self._dispose, box)
        return await asyncio.to_thread(self._create_box, labels=labels)

    def _kick_pool(self) -> None:
        """Start (or wake) the background refill on the running loop."""
        if not self.pool_size or self._closed:
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
        while not self._closed:
            try:
                await asyncio.to_thread(self._prepare)
            except SandboxError as exc:
                if self._closed:
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
                *(asyncio.to_thread(self._create_box, pooled=True) for _ in range(missing)),
                return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            for box in results:
                if isinstance(box, _Box):
                    if self._closed:
                        await asyncio.to_thread(self._dispose, box)
                    else:
                        self._pool.append(box)
            if errors and not self._closed:
                failures += 1
                first = errors[0]
                self._pool_error = first if isinstance(first, SandboxError) else SandboxError(
                    f"cannot start pooled sandbox containers: {first!r}")
                log.warning("warm pool: %s (retrying)", self._pool_error)
                await asyncio.sleep(min(POOL_RETRY_MAX_S, 0.5 * 2 ** failures))
            else:
                failures, self._pool_error = 0, None


# ----- image build -------------------------------------------------------------------------------


def _pull_works(client: docker.DockerClient, image: str, log_line: Callable[[str], None]) -> bool:
    repository, _, tag = image.partition(":")
    try:
        client.images.pull(repository, tag=tag or "latest")
        return True
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        log_line(f"cannot pull {image} ({exc}); building offline from a Debian mirror instead")
        return False


def _has_image(client: docker.DockerClient, image: str) -> bool:
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False


def build_sandbox_image(settings: Settings, *, offline: bool | None = None,
                        log: Callable[[str], None] = print_to_stderr) -> str:
    """Build ``settings.docker_image`` from the packaged images/Dockerfile; return the image tag.

    ``offline=None`` decides by itself: it uses python:3.12-slim when that image is present or
    can be pulled, else (or with ``offline=True``) a Debian base made by
    images/build-base-offline.sh (needs root and debootstrap). An offline base made earlier
    is reused. Builds go through docker-py's API; the docker CLI is only used by that script.
    """
    images = image_definitions()
    dockerfile = images / "Dockerfile"
    client = connect()
    try:
        if offline is None:
            if _has_image(client, ONLINE_BASE_IMAGE):
                offline = False
            elif _has_image(client, OFFLINE_BASE_IMAGE):
                log(f"using the offline base image {OFFLINE_BASE_IMAGE} built earlier")
                offline = True
            else:
                offline = not _pull_works(client, ONLINE_BASE_IMAGE, log)
        elif not offline and not _has_image(client, ONLINE_BASE_IMAGE) and not _pull_works(client, ONLINE_BASE_IMAGE, log):
            raise SandboxError(f"cannot pull {ONLINE_BASE_IMAGE}: build with --offline instead")
        base = ONLINE_BASE_IMAGE
        if offline:
            base = OFFLINE_BASE_IMAGE
            _build_offline_base(base, log)
        log(f"building {settings.docker_image} from {dockerfile} (base {base})")
        with _docker_errors(f"build {settings.docker_image}"):
            for chunk in client.api.build(path=str(images), dockerfile="Dockerfile",
                                          tag=settings.docker_image, buildargs={"BASE_IMAGE": base},
                                          pull=False, rm=True, forcerm=True, decode=True):
                if "error" in chunk:
                    raise SandboxError(f"building {settings.docker_image} failed: {chunk['error'].strip()}")
                text = chunk.get("stream", "").rstrip()
                if text:
                    log(text)
        log(f"built {settings.docker_image}")
        return settings.docker_image
    finally:
        client.close()


def _build_offline_base(name: str, log_line: Callable[[str], None]) -> None:
    script = image_definitions() / "build-base-offline.sh"
    tail: collections.deque[str] = collections.deque(maxlen=10)
    with subprocess.Popen(["sh", str(script), name], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            log_line(line.rstrip())
    if process.returncode != 0:
        raise SandboxError(f"building the offline base image failed (exit {process.returncode}): "
                           + " | ".join(tail))
