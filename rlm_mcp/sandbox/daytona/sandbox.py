"""One Daytona sandbox: created from the snapshot, the worker and context uploaded, the worker run
as a session command; deleted on close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import uuid
from typing import Any

from daytona import AsyncDaytona, CreateSandboxFromSnapshotParams, FileUpload, SessionExecuteRequest
from daytona.common.errors import DaytonaNotFoundError

from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import SandboxSpec
from rlm_mcp.sandbox.channel import WORKER_SCRIPT, WorkerSandbox, WorkerTransport
from rlm_mcp.sandbox.daytona.account import DaytonaAccount
from rlm_mcp.sandbox.daytona.transport import SessionTransport

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOT = "rlm-mcp-sandbox"
SANDBOX_LABEL = {"rlm-mcp": "sandbox"}
REMOTE_DIR = ".rlm-mcp"  # relative paths resolve against the sandbox's working directory


class DaytonaSandbox(WorkerSandbox):
    """``worker.py`` in a Daytona sandbox, driven through session commands."""

    def __init__(self, spec: SandboxSpec, account: DaytonaAccount) -> None:
        super().__init__(spec)
        self.account = account
        self.settings = account.settings
        self.name = f"rlm-mcp-{uuid.uuid4().hex[:16]}"
        self.client: AsyncDaytona | None = None
        self.remote: Any = None  # daytona.AsyncSandbox once created
        self.remote_dir = REMOTE_DIR
        self._context_remote: str | None = None
        self._sessions = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop its client belongs to
        self._released = False

    @property
    def sandbox_id(self) -> str | None:
        return None if self.remote is None else str(self.remote.id)

    # ----- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
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
        self.client = self.account.new_client()
        self.account.adopt(self)
        settings = self.settings
        labels = {**SANDBOX_LABEL, **{str(k): str(v) for k, v in self.spec.labels.items()}}
        params = CreateSandboxFromSnapshotParams(
            name=self.name,
            snapshot=settings.daytona_snapshot or DEFAULT_SNAPSHOT,
            language="python",
            labels=labels,
            ephemeral=True,  # deleted as soon as it stops
            auto_stop_interval=self.account.auto_stop_minutes,
            network_block_all=settings.daytona_network_block_all,
        )
        try:
            self.remote = await self.account.api(
                self.client.create(params, timeout=self.account.create_timeout_s),
                timeout=self.account.create_timeout_s + 5, doing="creating the sandbox")
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
        upload = self.account.api(self.remote.fs.upload_files(uploads),
                                  timeout=max(self.account.api_timeout_s, self.account.upload_timeout_s),
                                  doing="uploading the worker and the context")
        work_dir = self.account.api(self.remote.get_work_dir(), doing="asking for the working directory")
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
        await self.account.api(process.create_session(session_id), doing="opening a session for the worker")
        started = await self.account.api(process.execute_session_command(
            session_id, SessionExecuteRequest(command=command, run_async=True, suppress_input_echo=True)),
            doing="starting the worker")
        return SessionTransport(self.account, self.remote, session_id, started.cmd_id, self.remote_dir)

    # ----- release ----------------------------------------------------------------------------

    async def _release(self) -> None:
        """Delete the sandbox (also after failures) and close the client."""
        if self._released:
            return
        self._released = True
        try:
            await self._delete_remote()
        finally:
            self.account.forget(self)
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
                target = await self.account.api(self.client.get(self.name), raw=True, timeout=15)
            except DaytonaNotFoundError:
                return
            except Exception as exc:
                log.warning("could not check whether Daytona sandbox %s exists (%s); if it does, "
                            "auto-stop deletes it after %d minutes", self.name, exc,
                            self.account.auto_stop_minutes)
                return
        try:
            await self.account.api(self.client.delete(target, timeout=30), raw=True, timeout=35)
            log.info("Daytona sandbox %s deleted", target.id)
        except DaytonaNotFoundError:
            pass
        except Exception as exc:
            log.error("could not delete Daytona sandbox %s (%s): %s; being ephemeral it is deleted "
                      "once it auto-stops, after %d idle minutes", target.id, self.name, exc,
                      self.account.auto_stop_minutes)
