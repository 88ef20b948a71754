"""The Daytona backend: each sandbox is a Daytona cloud sandbox created from a snapshot.

The REPL is the same ``worker.py`` as everywhere else, speaking the same JSON-lines protocol,
carried by a Daytona *session command* (the only module importing the ``daytona`` SDK is this
one):

* start: create the sandbox from the snapshot (labels, auto-stop, ephemeral, network blocked),
  upload ``worker.py`` and the context file in one bulk upload, open a session and run the
  worker in it with ``run_async=True`` and ``suppress_input_echo=True``;
* host -> worker: ``send_session_command_input`` (one HTTP request per batch of lines; a
  single writer keeps lines whole and in order, coalescing what queued up meanwhile);
* worker -> host: the command's log stream (``get_session_command_logs_async``, a WebSocket
  with ``follow=true``); the daemon relabels output line by line, the SDK demultiplexes it, and
  the transport reassembles protocol lines from stdout and keeps a tail of stderr. Its stdout
  callback is a coroutine that waits while a message's worth of lines is queued unread, so
  the SDK stops reading the WebSocket: memory stays bounded without dropping anything.

So ``llm_query`` is served on the host: the sandbox needs no network (``network_block_all``
by default) and never holds a key. Sandboxes are deleted on close, cancel and shutdown (the
provider deletes any it still owns); if the server dies, auto-stop plus ``ephemeral`` makes
Daytona delete them after ``RLM_MCP_DAYTONA_AUTO_STOP_MINUTES`` of inactivity.

``rlm-mcp sandbox daytona-snapshot`` builds the snapshot (:func:`create_snapshot`) from the
packaged ``images/daytona/Dockerfile``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any, Awaitable, TypeVar

from daytona import (
    AsyncDaytona,
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    DaytonaConfig,
    FileUpload,
    Image,
    Resources,
    SessionExecuteRequest,
)
from daytona.common.errors import (
    DaytonaAuthenticationError,
    DaytonaConnectionError,
    DaytonaError,
    DaytonaForbiddenError,
    DaytonaGoneError,
    DaytonaNotFoundError,
    DaytonaRateLimitError,
    DaytonaTimeoutError,
)

from rlm_mcp.config import Settings
from rlm_mcp.errors import ConfigError, SandboxError
from rlm_mcp.sandbox.base import STDERR_TAIL_LINES, Sandbox, SandboxSpec, image_definitions
from rlm_mcp.sandbox.channel import WORKER_SCRIPT, ProtocolError, WorkerGone, WorkerSandbox, WorkerTransport, message_too_large

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_SNAPSHOT = "rlm-mcp-sandbox"
SNAPSHOT_DISK_GB = 3
SANDBOX_LABEL = {"rlm-mcp": "sandbox"}
REMOTE_DIR = ".rlm-mcp"  # relative paths resolve against the sandbox's working directory
RATE_LIMIT_RETRIES = 3
LOG_STREAM_RECONNECTS = 3


class ChannelLost(WorkerGone, SandboxError):
    """The session channel to the worker failed: a worker loss to the REPL, a clear run error
    to whoever called ``execute``."""


def describe_error(exc: BaseException, doing: str, settings: Settings) -> str:
    """An actionable message for a Daytona SDK or transport failure while ``doing`` something."""
    detail = str(exc).strip() or type(exc).__name__
    url = settings.daytona_api_url or "https://app.daytona.io/api"
    if isinstance(exc, DaytonaAuthenticationError):
        return (f"Daytona rejected the API key while {doing} ({detail}): check DAYTONA_API_KEY "
                f"(and DAYTONA_API_URL, now {url}).")
    if isinstance(exc, DaytonaForbiddenError):
        return f"Daytona refused the request while {doing} ({detail}): the API key lacks the permission."
    if isinstance(exc, DaytonaRateLimitError):
        return (f"Daytona rate-limited the request while {doing} ({detail}): wait a minute and "
                "retry, or run fewer runs at once (RLM_MCP_MAX_RUNS).")
    if isinstance(exc, (DaytonaTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return (f"the Daytona API did not answer in time while {doing} ({detail}); check Daytona's "
                f"status and the network path to {url}, then retry.")
    if isinstance(exc, DaytonaConnectionError):
        return f"cannot reach the Daytona API at {url} while {doing} ({detail}): check DAYTONA_API_URL and the network."
    return f"Daytona API error while {doing}: {detail}"


class SessionTransport(WorkerTransport):
    """Byte pipes to ``worker.py`` running as one Daytona session command."""

    def __init__(self, owner: "DaytonaSandbox", session_id: str, command_id: str, remote_dir: str) -> None:
        self.owner = owner
        self.sandbox = owner.remote
        self.session_id = session_id
        self.command_id = command_id
        self.remote_dir = remote_dir
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.exit_code: int | None = None
        self.failure: str | None = None
        self._lines: asyncio.Queue[bytes | ProtocolError] = asyncio.Queue()
        self._queued = 0  # bytes of complete lines waiting in _lines
        self._room = asyncio.Event()  # set when receive_line takes a line (or the stream ends)
        self._partial: list[str] = []
        self._partial_chars = 0
        self._overflowed = False
        self._stderr_partial = ""
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._ended = False
        self._consumed = 0  # stdout characters taken from the stream so far
        self._replayed = 0  # stdout characters seen on the current connection
        self._stream = asyncio.create_task(self._follow_logs())

    # ----- worker -> host ---------------------------------------------------------------------

    async def _follow_logs(self) -> None:
        """Stream the command's output; reconnect (skipping what was seen) if the stream breaks
        while the worker still runs, since the daemon replays the log from its start."""
        try:
            for attempt in range(LOG_STREAM_RECONNECTS + 1):
                self._replayed = 0
                try:
                    await self.sandbox.process.get_session_command_logs_async(
                        self.session_id, self.command_id, self._on_stdout, self._on_stderr)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failure = describe_error(exc, "streaming the worker's output", self.owner.settings)
                    log.debug("log stream of %s broke: %s", self.command_id, exc)
                else:
                    return  # a normal close: the command has ended
                if attempt == LOG_STREAM_RECONNECTS or not await self._still_running():
                    return
                log.warning("the worker's output stream broke; reconnecting (%s)", self.failure)
                self.failure = None
        finally:
            self._end_stream()

    async def _still_running(self) -> bool:
        try:
            command = await self.owner.api(self.sandbox.process.get_session_command(
                self.session_id, self.command_id), raw=True, timeout=15)
        except Exception:
            return False
        self.exit_code = command.exit_code
        return command.exit_code is None

    async def _on_stdout(self, chunk: str) -> None:
        if self._overflowed:
            return  # the worker is being killed; what it still sends is dropped
        if self._replayed < self._consumed:  # a reconnected stream starts from the beginning
            skip = min(len(chunk), self._consumed - self._replayed)
            self._replayed += skip
            chunk = chunk[skip:]
        self._consumed += len(chunk)
        self._replayed += len(chunk)
        limit = self.max_message_bytes
        while chunk:
            head, newline, chunk = chunk.partition("\n")
            self._partial.append(head)
            self._partial_chars += len(head)
            if self._partial_chars > limit:  # characters: a message of N bytes has at most N
                self._overflowed = True
                self._partial, self._partial_chars = [], 0
                self._lines.put_nowait(message_too_large(limit))
                return
            if not newline:
                return
            line = "".join(self._partial).encode("utf-8", "replace") + b"\n"
            self._partial, self._partial_chars = [], 0
            while self._queued and self._queued + len(line) > limit and not self._ended:
                self._room.clear()  # back-pressure: at most one message's worth queued
                await self._room.wait()
            self._queued += len(line)
            self._lines.put_nowait(line)

    def _on_stderr(self, chunk: str) -> None:
        text = self._stderr_partial + chunk
        *complete, self._stderr_partial = text.split("\n")
        self.stderr_tail.extend(line for line in complete if line.strip())
        if len(self._stderr_partial) > 4096:
            self.stderr_tail.append(self._stderr_partial[:4096])
            self._stderr_partial = ""

    def _end_stream(self) -> None:
        if not self._ended:
            self._ended = True
            self._lines.put_nowait(b"")
            self._room.set()

    async def receive_line(self) -> bytes:
        line = await self._lines.get()
        if isinstance(line, ProtocolError):
            raise line
        if not line:
            self._lines.put_nowait(b"")  # stay at end of stream for later readers
            return line
        self._queued -= len(line)
        self._room.set()
        return line

    # ----- host -> worker ---------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        if self._ended:
            raise ChannelLost("the worker's session has ended")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((data, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        await future

    async def _write_pending(self) -> None:
        """The single writer: lines stay whole and ordered; what queued up goes in one request."""
        while self._pending:
            batch, self._pending = self._pending, []
            payload = b"".join(data for data, _ in batch).decode("utf-8", "replace")
            try:
                await self._send_input(payload)
            except BaseException as exc:
                error = exc if isinstance(exc, ChannelLost) else ChannelLost(
                    describe_error(exc, "sending to the worker", self.owner.settings))
                for _, future in batch + self._pending:
                    if not future.done():
                        future.set_exception(error)
                self._pending = []
                if isinstance(exc, asyncio.CancelledError):
                    raise
                # A lost message leaves the protocol in an unknown state: end this worker.
                self.failure = str(error)
                self._end_stream()
                return
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _send_input(self, payload: str) -> None:
        delay = 0.5
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                await self.owner.api(self.sandbox.process.send_session_command_input(
                    self.session_id, self.command_id, payload), raw=True)
                return
            except DaytonaRateLimitError:  # refused, so not delivered: safe to send again
                if attempt == RATE_LIMIT_RETRIES:
                    raise
                log.warning("Daytona rate-limited input to the worker; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay *= 2
            except DaytonaGoneError as exc:
                raise ChannelLost(f"the worker's session command has ended ({exc})") from exc

    # ----- lifecycle --------------------------------------------------------------------------

    async def settle(self, timeout: float = 1.0) -> None:
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(self._stream), timeout)
        with contextlib.suppress(Exception):
            command = await self.owner.api(self.sandbox.process.get_session_command(
                self.session_id, self.command_id), raw=True, timeout=min(timeout * 5, 10.0))
            self.exit_code = command.exit_code

    async def kill(self) -> None:
        """Kill the worker's process group, then delete its session."""
        self._end_stream()
        if self._writer is not None:
            self._writer.cancel()
        pid_file = shlex.quote(f"{self.remote_dir}/worker-{self.session_id}.pid")
        with contextlib.suppress(Exception):
            await self.owner.api(self.sandbox.process.exec(
                f'pid=$(cat {pid_file} 2>/dev/null) && kill -KILL -- "-$pid" "$pid" 2>/dev/null; true',
                timeout=10), raw=True, timeout=15)
        with contextlib.suppress(Exception):
            await self.owner.api(self.sandbox.process.delete_session(self.session_id), raw=True, timeout=15)
        self._stream.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._stream

    async def close(self) -> None:
        """Ask the worker to exit, give it a moment, then make sure it and its session are gone."""
        if self.owner.closing:  # the whole sandbox is about to be deleted: skip the round trips
            self._end_stream()
            for task in (self._writer, self._stream):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (self._writer, self._stream) if t), return_exceptions=True)
            return
        if not self._ended:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send(b'{"type": "shutdown"}\n'), 10)
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._stream), 2.0)
        await self.kill()

    def describe_exit(self) -> str:
        if self.failure:
            reason = self.failure
        elif self.exit_code is None:
            reason = "the worker's Daytona session ended"
        elif self.exit_code > 128:
            reason = f"killed by signal {self.exit_code - 128}"
        else:
            reason = f"exit code {self.exit_code}"
        tail = list(self.stderr_tail)[-3:]
        return reason + (": " + " | ".join(tail) if tail else "")


class DaytonaSandbox(WorkerSandbox):
    """``worker.py`` in a Daytona sandbox, driven through session commands."""

    def __init__(self, spec: SandboxSpec, provider: "DaytonaProvider") -> None:
        super().__init__(spec)
        self.provider = provider
        self.settings = provider.settings
        self.name = f"rlm-mcp-{uuid.uuid4().hex[:16]}"
        self.client: AsyncDaytona | None = None
        self.remote: Any = None  # daytona.AsyncSandbox once created
        self.remote_dir = REMOTE_DIR
        self._context_remote: str | None = None
        self._sessions = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released = False

    @property
    def closing(self) -> bool:
        """True once close() began (the sandbox itself will be deleted)."""
        return self._closed

    @property
    def sandbox_id(self) -> str | None:
        return None if self.remote is None else str(self.remote.id)

    async def api(self, awaitable: Awaitable[T], *, raw: bool = False, timeout: float | None = None,
                  doing: str = "calling the Daytona API") -> T:
        """Await one SDK call under a deadline; unless ``raw``, failures become SandboxError."""
        limit = timeout or self.provider.api_timeout_s
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

    # ----- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._create_remote()
            await super().start()
        except BaseException:
            await self.close()
            raise

    async def _create_remote(self) -> None:
        context = self.spec.context
        if context.path is not None and not context.path.is_file():
            raise SandboxError(f"cannot load context: {context.path} is not a readable file")
        self.client = self.provider.new_client()
        self.provider.adopt(self)
        settings = self.settings
        labels = {**SANDBOX_LABEL, **{str(k): str(v) for k, v in self.spec.labels.items()}}
        params = CreateSandboxFromSnapshotParams(
            name=self.name,
            snapshot=settings.daytona_snapshot or DEFAULT_SNAPSHOT,
            language="python",
            labels=labels,
            ephemeral=True,  # deleted as soon as it stops
            auto_stop_interval=self.provider.auto_stop_minutes,
            network_block_all=settings.daytona_network_block_all,
        )
        try:
            self.remote = await self.api(
                self.client.create(params, timeout=self.provider.create_timeout_s),
                timeout=self.provider.create_timeout_s + 5, doing="creating the sandbox")
        except SandboxError as exc:
            if isinstance(exc.__cause__, DaytonaNotFoundError):
                raise SandboxError(
                    f"Daytona has no snapshot {params.snapshot!r}: create it with `rlm-mcp sandbox "
                    "daytona-snapshot`, or name an existing one in "
                    f"RLM_MCP_DAYTONA_SNAPSHOT ({exc.__cause__})") from exc.__cause__
            raise
        log.info("Daytona sandbox %s (%s) created", self.remote.id, self.name)
        uploads = [FileUpload(WORKER_SCRIPT.read_bytes(), f"{REMOTE_DIR}/worker.py")]
        if context.path is not None:
            suffix = "jsonl" if context.kind == "documents" else "txt"
            self._context_remote = f"context.{suffix}"
            uploads.append(FileUpload(str(context.path), f"{REMOTE_DIR}/{self._context_remote}"))
        upload = self.api(self.remote.fs.upload_files(uploads),
                          timeout=max(self.provider.api_timeout_s, self.provider.upload_timeout_s),
                          doing="uploading the worker and the context")
        work_dir = self.api(self.remote.get_work_dir(), doing="asking for the working directory")
        _, directory = await asyncio.gather(upload, work_dir)
        self.remote_dir = f"{str(directory).rstrip('/')}/{REMOTE_DIR}"

    def _worker_context_path(self) -> str | None:
        return self._context_remote  # relative to the worker's directory

    async def _launch(self) -> WorkerTransport:
        if self.remote is None:
            raise SandboxError("the Daytona sandbox is not running")
        self._sessions += 1
        session_id = f"rlm-worker-{self._sessions}"
        directory = shlex.quote(self.remote_dir)
        pid_file = shlex.quote(f"worker-{session_id}.pid")
        # setsid gives the worker its own process group so kill() takes down what it started;
        # `exec` keeps the pid written to the file the worker's own.
        inner = f"echo $$ > {pid_file}; exec python3 -I -u worker.py"
        command = (f"cd {directory} && if command -v setsid >/dev/null 2>&1; then setsid -w sh -c "
                   f"{shlex.quote(inner)}; else sh -c {shlex.quote(inner)}; fi")
        process = self.remote.process
        await self.api(process.create_session(session_id), doing="opening a session for the worker")
        started = await self.api(process.execute_session_command(
            session_id, SessionExecuteRequest(command=command, run_async=True, suppress_input_echo=True)),
            doing="starting the worker")
        return SessionTransport(self, session_id, started.cmd_id, self.remote_dir)

    # ----- release ----------------------------------------------------------------------------

    async def _release(self) -> None:
        """Delete the sandbox (also after failures) and close the client."""
        if self._released:
            return
        self._released = True
        try:
            await self._delete_remote()
        finally:
            self.provider.forget(self)
            if self.client is not None:
                with contextlib.suppress(Exception):
                    await self.client.close()
                self.client = None

    async def _delete_remote(self) -> None:
        if self.client is None:
            return
        target = self.remote
        if target is None:
            # Creation failed or timed out: it may exist all the same, under our unique name.
            try:
                target = await self.api(self.client.get(self.name), raw=True, timeout=15)
            except DaytonaNotFoundError:
                return
            except Exception as exc:
                log.warning("could not check whether Daytona sandbox %s exists (%s); if it does, "
                            "auto-stop deletes it after %d minutes", self.name, exc,
                            self.provider.auto_stop_minutes)
                return
        try:
            await self.api(self.client.delete(target, timeout=30), raw=True, timeout=35)
            log.info("Daytona sandbox %s deleted", target.id)
        except DaytonaNotFoundError:
            pass
        except Exception as exc:
            log.error("could not delete Daytona sandbox %s (%s): %s; being ephemeral it is deleted "
                      "once it auto-stops, after %d idle minutes", target.id, self.name, exc,
                      self.provider.auto_stop_minutes)


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


# ----- snapshot --------------------------------------------------------------------------------


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


__all__ = ["DaytonaProvider", "DaytonaSandbox", "create_snapshot"]
