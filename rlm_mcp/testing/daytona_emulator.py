"""A Daytona API emulator on loopback, for exercising the real ``daytona`` SDK over HTTP.

It serves the REST routes of Daytona's control plane that rlm-mcp uses (``api.json``: sandbox
create/get/delete, toolbox proxy URL) and the toolbox routes of the in-sandbox daemon
(``toolbox.json``: sessions, session commands with stdin, command logs over a WebSocket,
``process/execute``, ``files/bulk-upload``, ``work-dir``), with the field names of Daytona's
published OpenAPI specs (github.com/daytona/clients, ``openapi-specs/``).

Sandboxes are temporary directories; a session command is a local ``bash -c`` process in that
directory, in its own process group. As in Daytona's daemon:

* command output is relabelled line by line into one log: ``\\x01\\x01\\x01`` + line + ``\\n``
  for stdout, ``\\x02\\x02\\x02`` + line + ``\\n`` for stderr (a last line without a newline
  gets one); the log, and a line still being written, are kept on disk as the daemon keeps
  them on the sandbox's disk, so the emulator's memory (the test process's) stays small
  whatever a command prints;
* ``.../logs?follow=true`` upgraded to a WebSocket streams that log from its beginning, in
  binary messages of at most 1024 bytes, and closes normally (1000) once the command ended;
* session input is written to the command's stdin with a newline appended when missing, and
  echoed into the log as stdout unless the command was started with ``suppressInputEcho``;
* errors carry ``statusCode``/``message`` (and ``code``/``source`` for the daemon).

Faults can be injected for tests (:class:`Faults`): failing or rate-limited operations, slow
operations (past a client's timeout) and sessions that die when some input arrives.

Run standalone: ``python -m rlm_mcp.testing.daytona_emulator --port 3986``, then point rlm-mcp at it with
``DAYTONA_API_URL=http://127.0.0.1:3986/api DAYTONA_API_KEY=test``.

Over 500 lines on purpose: one aiohttp app whose route handlers share the sandbox table, the
fault hooks and the two error shapes; the state they drive is in
:mod:`rlm_mcp.testing.daytona_state`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, cast

from aiohttp import BodyPartReader, WSMsgType, web

from rlm_mcp.testing.daytona_state import (
    LOG_CHUNK, SOURCE_API, SOURCE_DAEMON, STDERR_PREFIX, STDOUT_PREFIX, EmulatedCommand, EmulatedSandbox,
    EmulatedSession, Faults, PartialLine, demux, kill_processes_in, now)

log = logging.getLogger("daytona_emulator")

class DaytonaEmulator:
    """The emulator; :meth:`start` serves it from a background thread on 127.0.0.1."""

    def __init__(self, api_key: str = "test", host: str = "127.0.0.1", port: int = 0,
                 snapshots: set[str] | None = None, memory_gb: int = 1) -> None:
        self.api_key = api_key
        self.memory_gb = memory_gb  # a sandbox's memory quota when its request names none
        self.host = host
        self.port = port
        self.snapshots = snapshots  # None: every snapshot name exists
        self.faults = Faults()
        self.sandboxes: dict[str, EmulatedSandbox] = {}
        self.deleted: dict[str, EmulatedSandbox] = {}
        self.requests: list[tuple[str, str]] = []  # (operation, sandbox id or "")
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._workspace = Path(tempfile.mkdtemp(prefix="daytona-emulator-"))
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # ----- lifecycle --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """What DAYTONA_API_URL should be."""
        return f"{self.base_url}/api"

    def start(self, timeout: float = 10.0) -> "DaytonaEmulator":
        self._thread = threading.Thread(target=self._run, name="daytona-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the Daytona emulator did not start")
        if self._startup_error is not None:
            raise RuntimeError(f"the Daytona emulator did not start: {self._startup_error}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        shutil.rmtree(self._workspace, ignore_errors=True)

    def __enter__(self) -> "DaytonaEmulator":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(middlewares=[self._auth_middleware], client_max_size=1 << 31)
        api = [
            web.post("/api/sandbox", self.create_sandbox),
            web.get("/api/sandbox/{sandbox}", self.get_sandbox),
            web.delete("/api/sandbox/{sandbox}", self.delete_sandbox),
            web.get("/api/sandbox/{sandbox}/toolbox-proxy-url", self.toolbox_proxy_url),
        ]
        prefix = "/toolbox/{sandbox}"
        toolbox = [
            web.get(prefix + "/work-dir", self.work_dir),
            web.get(prefix + "/user-home-dir", self.work_dir),
            web.post(prefix + "/files/bulk-upload", self.upload),
            web.post(prefix + "/process/execute", self.execute),
            web.get(prefix + "/process/session", self.list_sessions),
            web.post(prefix + "/process/session", self.create_session),
            web.get(prefix + "/process/session/{session}", self.get_session),
            web.delete(prefix + "/process/session/{session}", self.delete_session),
            web.post(prefix + "/process/session/{session}/exec", self.session_exec),
            web.get(prefix + "/process/session/{session}/command/{command}", self.get_command),
            web.post(prefix + "/process/session/{session}/command/{command}/input", self.send_input),
            web.get(prefix + "/process/session/{session}/command/{command}/logs", self.command_logs),
        ]
        app.add_routes(api + toolbox)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = cast(asyncio.Server | None, site._server)  # the bound port when 0 was asked for
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        for sandbox in list(self.sandboxes.values()):
            await self._destroy(sandbox)
        if self._runner is not None:
            await self._runner.cleanup()

    # ----- what tests look at -----------------------------------------------------------------

    def live_sandboxes(self) -> list[EmulatedSandbox]:
        with self._lock:
            return list(self.sandboxes.values())

    def count(self, operation: str) -> int:
        with self._lock:
            return sum(1 for name, _ in self.requests if name == operation)

    def wait_for(self, operation: str, times: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``operation`` was requested ``times`` times (for tests, off the loop)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: sum(1 for name, _ in self.requests if name == operation) >= times, timeout)

    # ----- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._api_error(401, "Invalid credentials", request)
        return await handler(request)

    @staticmethod
    def _api_error(status: int, message: str, request: web.Request) -> web.Response:
        reasons = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict",
                   410: "Gone", 429: "Too Many Requests", 500: "Internal Server Error"}
        body = {"statusCode": status, "message": message, "error": reasons.get(status, "Error"),
                "path": request.path, "method": request.method, "timestamp": now(),
                "source": SOURCE_API}
        headers = {"Retry-After": "1"} if status == 429 else None
        return web.json_response(body, status=status, headers=headers)

    @staticmethod
    def _daemon_error(status: int, message: str, request: web.Request, code: str | None = None) -> web.Response:
        body: dict[str, Any] = {"statusCode": status, "message": message, "path": request.path,
                                "method": request.method, "timestamp": now(), "source": SOURCE_DAEMON}
        if code:
            body["code"] = code
        return web.json_response(body, status=status)

    async def _fault(self, operation: str, request: web.Request, *, delay_now: bool = True) -> web.Response | None:
        """Record the request and apply any injected fault for this operation."""
        with self._lock:
            self.requests.append((operation, request.match_info.get("sandbox", "")))
            self._lock.notify_all()
            delay = self.faults.delays.get(operation, 0.0) if delay_now else 0.0
            limited = self.faults.rate_limits.get(operation, 0) > 0
            if limited:
                self.faults.rate_limits[operation] -= 1
            failed = not limited and self.faults.errors.get(operation, 0) > 0
            if failed:
                self.faults.errors[operation] -= 1
        if limited:
            return self._api_error(429, "ThrottlerException: Too Many Requests", request)
        if failed:
            return self._api_error(500, f"emulated failure of {operation}", request)
        if delay > 0:
            assert self._stopping is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return None

    def _sandbox(self, request: web.Request) -> EmulatedSandbox | None:
        key = request.match_info["sandbox"]
        with self._lock:
            found = self.sandboxes.get(key)
            if found is None:
                found = next((s for s in self.sandboxes.values() if s.name == key), None)
        return found

    def _dto(self, sandbox: EmulatedSandbox) -> dict[str, Any]:
        req = sandbox.request
        return {
            "id": sandbox.id,
            "organizationId": "emulator-organization",
            "name": sandbox.name,
            "snapshot": req.get("snapshot") or "daytonaio/sandbox:emulated",
            "user": req.get("user") or "daytona",
            "env": dict(req.get("env") or {}),
            "labels": sandbox.labels,
            "public": bool(req.get("public", False)),
            "networkBlockAll": bool(req.get("networkBlockAll", False)),
            "kvm": False,
            "target": req.get("target") or "emulated",
            "cpu": int(req.get("cpu") or 1),
            "gpu": 0,
            "memory": int(req.get("memory") or self.memory_gb),
            "disk": int(req.get("disk") or 3),
            "state": sandbox.state,
            "desiredState": "destroyed" if sandbox.state in ("destroying", "destroyed") else "started",
            "autoStopInterval": req.get("autoStopInterval", 15),
            "autoArchiveInterval": req.get("autoArchiveInterval", 10080),
            "autoDeleteInterval": req.get("autoDeleteInterval", -1),
            "createdAt": sandbox.created_at,
            "updatedAt": sandbox.updated_at,
            "sandboxClass": "container",
            "daemonVersion": "emulator",
            "toolboxProxyUrl": f"{self.base_url}/toolbox",
        }

    # ----- control plane (api.json) -----------------------------------------------------------

    async def create_sandbox(self, request: web.Request) -> web.StreamResponse:
        # Errors are answered before the sandbox exists; a delay only after it was made.
        if (fault := await self._fault("create_sandbox", request, delay_now=False)) is not None:
            return fault
        body = await request.json()
        snapshot = body.get("snapshot")
        if self.snapshots is not None and snapshot and snapshot not in self.snapshots:
            return self._api_error(404, f"Snapshot {snapshot} not found. Did you add it through the "
                                        "Daytona Dashboard?", request)
        sandbox_id = str(uuid.uuid4())
        name = body.get("name") or sandbox_id
        with self._lock:
            if any(s.name == name for s in self.sandboxes.values()):
                return self._api_error(409, f"Sandbox with name {name} already exists", request)
        root = self._workspace / sandbox_id
        root.mkdir(parents=True)
        sandbox = EmulatedSandbox(sandbox_id, name, root.resolve(), body)
        with self._lock:
            self.sandboxes[sandbox_id] = sandbox
        # A slow create answers only after the sandbox exists: the client may give up first.
        delay = self.faults.delays.get("create_sandbox", 0.0)
        if delay > 0:
            assert self._stopping is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return web.json_response(self._dto(sandbox))

    async def get_sandbox(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("get_sandbox", request)) is not None:
            return fault
        sandbox = self._sandbox(request)
        if sandbox is None:
            key = request.match_info["sandbox"]
            gone = self.deleted.get(key) or next((s for s in self.deleted.values() if s.name == key), None)
            if gone is not None:
                return web.json_response(self._dto(gone))
            return self._api_error(404, f"Sandbox with ID or name {key} not found", request)
        return web.json_response(self._dto(sandbox))

    async def delete_sandbox(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("delete_sandbox", request)) is not None:
            return fault
        sandbox = self._sandbox(request)
        if sandbox is None:
            return self._api_error(404, f"Sandbox with ID or name {request.match_info['sandbox']} "
                                        "not found", request)
        await self._destroy(sandbox)
        return web.json_response(self._dto(sandbox))

    async def _destroy(self, sandbox: EmulatedSandbox) -> None:
        with self._lock:
            self.sandboxes.pop(sandbox.id, None)
            self.deleted[sandbox.id] = sandbox
        sandbox.state = "destroyed"
        sandbox.updated_at = now()
        for session in sandbox.sessions.values():
            await self._end_session(session)
        kill_processes_in(sandbox.root)  # as stopping the container would
        await asyncio.to_thread(shutil.rmtree, sandbox.root, True)
        await asyncio.to_thread(shutil.rmtree, self._workspace / f"{sandbox.id}.logs", True)

    async def toolbox_proxy_url(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("toolbox_proxy_url", request)) is not None:
            return fault
        return web.json_response({"url": f"{self.base_url}/toolbox"})

    # ----- toolbox (toolbox.json) -------------------------------------------------------------

    def _toolbox_sandbox(self, request: web.Request) -> EmulatedSandbox | web.Response:
        sandbox = self._sandbox(request)
        if sandbox is None or sandbox.state != "started":
            return self._api_error(404, "Sandbox not found or not started", request)
        return sandbox

    async def work_dir(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("work_dir", request)) is not None:
            return fault
        sandbox = self._toolbox_sandbox(request)
        if isinstance(sandbox, web.Response):
            return sandbox
        return web.json_response({"dir": str(sandbox.root)})

    async def upload(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("upload", request)) is not None:
            return fault
        sandbox = self._toolbox_sandbox(request)
        if isinstance(sandbox, web.Response):
            return sandbox
        reader = await request.multipart()
        paths: dict[str, str] = {}
        async for part in reader:
            name = (part.name if isinstance(part, BodyPartReader) else None) or ""
            if not name.startswith("files[") or "]." not in name:
                continue
            index, _, kind = name[len("files["):].partition("].")
            if kind == "path":
                paths[index] = (await part.text()).strip()  # type: ignore[union-attr]
            elif kind == "file":
                destination = paths.get(index) or part.filename  # type: ignore[union-attr]
                if not destination:
                    return self._daemon_error(400, f"no path for files[{index}]", request)
                try:
                    target = sandbox.resolve(destination)
                except PermissionError as exc:
                    return self._daemon_error(403, str(exc), request, "FILE_ACCESS_DENIED")
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as handle:
                    while chunk := await part.read_chunk(1 << 20):  # type: ignore[union-attr]
                        handle.write(chunk)
        return web.Response(status=200)

    async def execute(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("execute", request)) is not None:
            return fault
        sandbox = self._toolbox_sandbox(request)
        if isinstance(sandbox, web.Response):
            return sandbox
        body = await request.json()
        if not isinstance(body.get("command"), str) or not body["command"].strip():
            return self._daemon_error(400, "command is required", request)
        cwd = sandbox.resolve(body["cwd"]) if body.get("cwd") else sandbox.root
        env = self._environment(sandbox)
        env.update(body.get("envs") or {})
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", body["command"], cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), float(body.get("timeout") or 10))
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            return self._daemon_error(408, "command execution timeout", request, "PROCESS_EXECUTION_TIMEOUT")
        return web.json_response({"exitCode": process.returncode,
                                  "result": output.decode("utf-8", "replace")})

    def _environment(self, sandbox: EmulatedSandbox) -> dict[str, str]:
        """The sandbox's environment: nothing from the host process leaks in but PATH."""
        path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"])
        env = {"PATH": path, "HOME": str(sandbox.root), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        env.update(sandbox.request.get("env") or {})
        return env

    def _session(self, request: web.Request) -> tuple[EmulatedSandbox, EmulatedSession] | web.Response:
        sandbox = self._toolbox_sandbox(request)
        if isinstance(sandbox, web.Response):
            return sandbox
        session = sandbox.sessions.get(request.match_info["session"])
        if session is None:
            return self._daemon_error(404, "session not found", request)
        return sandbox, session

    async def _command(self, request: web.Request, op: str
                       ) -> tuple[EmulatedSandbox, EmulatedSession, EmulatedCommand] | web.Response:
        """Fault injection for ``op``, then the sandbox, session and command a route names."""
        if (fault := await self._fault(op, request)) is not None:
            return fault
        found = self._session(request)
        if isinstance(found, web.Response):
            return found
        sandbox, session = found
        command = session.commands.get(request.match_info["command"])
        if command is None:
            return self._daemon_error(404, "command not found", request)
        return sandbox, session, command

    async def list_sessions(self, request: web.Request) -> web.StreamResponse:
        sandbox = self._toolbox_sandbox(request)
        if isinstance(sandbox, web.Response):
            return sandbox
        return web.json_response([{"sessionId": s.id, "commands": [c.dto() for c in s.commands.values()]}
                                  for s in sandbox.sessions.values()])

    async def create_session(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("create_session", request)) is not None:
            return fault
        sandbox = self._toolbox_sandbox(request)
        if isinstance(sandbox, web.Response):
            return sandbox
        body = await request.json()
        session_id = body.get("sessionId")
        if not isinstance(session_id, str) or not session_id:
            return self._daemon_error(400, "sessionId is required", request)
        if session_id in sandbox.sessions:
            return self._daemon_error(409, "session already exists", request)
        sandbox.sessions[session_id] = EmulatedSession(session_id)
        return web.Response(status=201)

    async def get_session(self, request: web.Request) -> web.StreamResponse:
        found = self._session(request)
        if isinstance(found, web.Response):
            return found
        _, session = found
        return web.json_response({"sessionId": session.id,
                                  "commands": [c.dto() for c in session.commands.values()]})

    async def delete_session(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("delete_session", request)) is not None:
            return fault
        found = self._session(request)
        if isinstance(found, web.Response):
            return found
        sandbox, session = found
        sandbox.sessions.pop(session.id, None)
        await self._end_session(session)
        return web.Response(status=204)

    async def _end_session(self, session: EmulatedSession) -> None:
        session.kill()
        for command in session.commands.values():
            for task in command.tasks:
                task.cancel()
            await asyncio.gather(*command.tasks, return_exceptions=True)
            if command.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    await command.process.wait()
            await command.finish(command.process.returncode if command.process and
                                 command.process.returncode is not None else 137)
            command.close_log()

    async def session_exec(self, request: web.Request) -> web.StreamResponse:
        if (fault := await self._fault("session_exec", request)) is not None:
            return fault
        found = self._session(request)
        if isinstance(found, web.Response):
            return found
        sandbox, session = found
        if session.ended:
            return self._daemon_error(410, "session is no longer accepting commands", request, "SESSION_ENDED")
        body = await request.json()
        command_text = body.get("command")
        if not isinstance(command_text, str) or not command_text.strip():
            return self._daemon_error(400, "command cannot be empty", request)
        run_async = bool(body.get("runAsync") or body.get("async"))
        log_dir = self._workspace / f"{sandbox.id}.logs"  # outside the sandbox's own directory
        log_dir.mkdir(exist_ok=True)
        command = EmulatedCommand(str(uuid.uuid4()), command_text, bool(body.get("suppressInputEcho")), log_dir)
        session.commands[command.id] = command
        # The sandbox's memory quota (GiB), enforced as an address-space limit on the command.
        quota_kb = int(sandbox.request.get("memory") or self.memory_gb) * 1024 * 1024
        command.process = await asyncio.create_subprocess_exec(
            "bash", "-c", f"ulimit -v {quota_kb} 2>/dev/null\n{command_text}", cwd=sandbox.root,
            env=self._environment(sandbox),
            stdin=asyncio.subprocess.PIPE if run_async else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, limit=1 << 30)
        command.tasks.append(asyncio.create_task(self._supervise(command)))
        if run_async:
            return web.json_response({"cmdId": command.id}, status=202)
        while not command.finished:
            await command.wait_change(command.version)
        log_bytes = command.read_log()
        stdout, stderr = demux(log_bytes)
        return web.json_response({"cmdId": command.id, "exitCode": command.exit_code,
                                  "output": log_bytes.decode("utf-8", "replace"),
                                  "stdout": stdout, "stderr": stderr})

    async def _supervise(self, command: EmulatedCommand) -> None:
        """Relabel output line by line into the log, then record the exit code."""
        process = command.process
        assert process is not None and process.stdout is not None and process.stderr is not None

        async def relabel(stream: asyncio.StreamReader, prefix: bytes) -> None:
            line = PartialLine(command.log_dir)
            try:
                while chunk := await stream.read(1 << 16):
                    while chunk:
                        end = chunk.find(b"\n")
                        if end < 0:
                            line.add(chunk)
                            break
                        line.add(chunk[:end])
                        chunk = chunk[end + 1:]
                        await command.append_line(prefix, line)
                        line.clear()
                if line.size:  # a last line without its newline (``read -r line || [[ -n $line ]]``)
                    await command.append_line(prefix, line)
            finally:
                line.clear()

        await asyncio.gather(relabel(process.stdout, STDOUT_PREFIX), relabel(process.stderr, STDERR_PREFIX))
        await command.finish(await process.wait())

    async def get_command(self, request: web.Request) -> web.StreamResponse:
        found = await self._command(request, "get_command")
        if isinstance(found, web.Response):
            return found
        _, session, command = found
        return web.json_response(command.dto())

    async def send_input(self, request: web.Request) -> web.StreamResponse:
        found = await self._command(request, "send_input")
        if isinstance(found, web.Response):
            return found
        sandbox, session, command = found
        body = await request.json()
        data = body.get("data")
        if not isinstance(data, str):
            return self._daemon_error(400, "data is required", request)
        if session.ended or command.finished:
            code = command.exit_code if command.exit_code is not None else 137
            return self._daemon_error(410, f"command has already completed with exit code {code}",
                                      request, "COMMAND_ALREADY_COMPLETED")
        process = command.process
        if process is None or process.stdin is None:
            return self._daemon_error(400, "the command was not started asynchronously", request)
        if not data.endswith("\n"):  # as the daemon does, for commands like `read`
            data += "\n"
        payload = data.encode("utf-8")
        async with command.input_lock:
            try:
                process.stdin.write(payload)
                await process.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                return self._daemon_error(410, "session process is no longer accepting input",
                                          request, "SESSION_ENDED")
            if not command.suppress_input_echo:
                await command.append(STDOUT_PREFIX + payload)
        trigger = self.faults.kill_session_on_input
        if trigger is not None and trigger in data:  # the session's processes die (say, OOM)
            self.faults.kill_session_on_input = None
            session.kill()
            kill_processes_in(sandbox.root)
        return web.Response(status=204)

    async def command_logs(self, request: web.Request) -> web.StreamResponse:
        found = await self._command(request, "command_logs")
        if isinstance(found, web.Response):
            return found
        _, session, command = found
        follow = request.query.get("follow", "").lower() in ("1", "true")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            log_bytes = command.read_log()
            stdout, stderr = demux(log_bytes)
            output = log_bytes.replace(STDOUT_PREFIX, b"").replace(STDERR_PREFIX, b"")
            return web.json_response({"output": output.decode("utf-8", "replace"),
                                      "stdout": stdout, "stderr": stderr})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        closed = asyncio.create_task(_wait_closed(ws))
        offset = 0
        try:
            while not ws.closed:
                version = command.version
                if offset < command.log_size:
                    data = command.read_log(offset, min(command.log_size - offset, 1 << 20))
                    if not data:  # the log is gone with its session
                        break
                    for start in range(0, len(data), LOG_CHUNK):
                        await ws.send_bytes(data[start:start + LOG_CHUNK])
                    offset += len(data)
                    if self.faults.break_log_streams > 0 and not command.finished:
                        self.faults.break_log_streams -= 1
                        await ws.close(code=1011, message=b"emulated proxy failure")
                        break
                    continue
                if command.finished or not follow:
                    break
                change = asyncio.create_task(command.wait_change(version))
                done, _ = await asyncio.wait({change, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    change.cancel()
                    break
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            closed.cancel()
            if not ws.closed:
                await ws.close(code=1000)
        return ws


async def _wait_closed(ws: web.WebSocketResponse) -> None:
    async for message in ws:
        if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            return


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a Daytona API emulator on loopback.")
    parser.add_argument("--port", type=int, default=3986)
    parser.add_argument("--api-key", default="test")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    emulator = DaytonaEmulator(api_key=args.api_key, port=args.port).start()
    print(f"DAYTONA_API_URL={emulator.api_url} DAYTONA_API_KEY={args.api_key}", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    emulator.stop()


if __name__ == "__main__":
    main()
