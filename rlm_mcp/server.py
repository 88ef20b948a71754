"""MCP wiring: the only module that imports ``mcp``. Tools stay thin and delegate to the
context store, the run manager and the trajectory view."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import secrets
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from rlm_mcp import __version__
from rlm_mcp.config import Settings
from rlm_mcp.engine import RlmEngine, RunEvent, RunRequest, RunResult
from rlm_mcp.errors import ConfigError, RlmError, describe_os_error, quoted
from rlm_mcp.private import private_dir, write_private_text
from rlm_mcp.engine.runs import Run, RunManager, shape_of
from rlm_mcp.sandbox import reap_leftovers
from rlm_mcp.store import ContextInfo, ContextPage, ContextStore
from rlm_mcp.engine.trajectory import trajectory_page

log = logging.getLogger(__name__)

INLINE_CONTEXT_CHARS = 200_000  # larger inline text belongs in rlm_load_context
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANSWER_META = {"anthropic/maxResultSizeChars": 500_000}
ERROR_CHARS = 2_000  # longest tool error message (and its log line)

INSTRUCTIONS = """\
rlm-mcp answers questions over inputs far larger than your context window. Load the input \
server-side with rlm_load_context (a path, URL or text: the content never passes through you), \
then call rlm_complete with the handle and your question. A run can take minutes: if \
rlm_complete returns status "running", call rlm_get_result with its run_id. \
rlm_get_trajectory shows how an answer was reached."""


class ContextList(BaseModel):
    contexts: list[ContextInfo]


class CompleteResult(BaseModel):
    """A run's state: finished (completed / limit_reached / failed / cancelled) or running."""

    status: Literal["completed", "running", "queued", "failed", "cancelled", "limit_reached"]
    run_id: str
    answer: str | None = None
    limit: str | None = Field(None, description="which limit ended the run, for status limit_reached")
    error: str | None = None
    progress: str | None = Field(None, description="latest progress, while running")
    iterations: int = 0
    subcalls: int = 0
    usage: dict[str, Any] = {}
    cost_usd: float | None = None
    elapsed_s: float = 0.0
    trajectory_path: str | None = None
    next_step: str | None = None


class TrajectoryPage(BaseModel):
    run_id: str
    status: str | None
    answer: str | None
    root_model: str | None
    total_iterations: int
    offset: int
    next_offset: int | None
    iterations: list[dict[str, Any]]
    child_trajectories: list[str]
    path: str


@dataclass
class Services:
    """What the tools delegate to; one per server process."""

    settings: Settings
    store: ContextStore
    engine: RlmEngine
    runs: RunManager

    @classmethod
    def create(cls, settings: Settings) -> "Services":
        engine = RlmEngine(settings)
        return cls(settings, ContextStore(settings), engine, RunManager(engine, settings.max_runs))

    async def aclose(self) -> None:
        await self.runs.aclose()
        await self.engine.sandboxes.aclose()


def bounded(message: str, limit: int = ERROR_CHARS) -> str:
    """An error message of at most about ``limit`` characters: the start (what went wrong)
    and the end (what to do) are kept, the middle (an echoed input, say) is cut."""
    if len(message) <= limit:
        return message
    tail = limit // 4
    return f"{message[:limit - tail]} [... {len(message) - limit:,} characters cut ...] {message[-tail:]}"


def _reply(model: BaseModel, summary: str, meta: dict[str, Any] | None = None) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=summary)],
                          structured_content=model.model_dump(mode="json"), meta=meta)


def _context_summary(info: ContextInfo) -> str:
    shape = (f"{info.documents:,} documents, " if info.kind == "documents" else "") + f"{info.characters:,} characters"
    notes = ("\n" + "\n".join(info.notes)) if info.notes else ""
    return (f"Loaded context {info.handle} ({info.name}): {shape}, {info.bytes:,} bytes.{notes}\n"
            f"Preview: {info.preview[:200]!r}\nNext: rlm_complete(query=..., handle={info.handle!r})")


def _complete_result(run: Run) -> CompleteResult:
    result = run.result
    if result is None:
        status = "queued" if run.queued else "running"
        return CompleteResult(status=status, run_id=run.run_id, progress=run.progress_message(),
                              iterations=run.last_event.iteration if run.last_event else 0,
                              subcalls=run.last_event.subcalls_done if run.last_event else 0,
                              cost_usd=run.last_event.cost_usd if run.last_event else None,
                              next_step=f"call rlm_get_result(run_id={run.run_id!r}) to wait for the answer, "
                                        f"or rlm_cancel(run_id={run.run_id!r}) to stop it")
    return _finished(result)


def _finished(result: RunResult) -> CompleteResult:
    next_step = None
    if result.status == "limit_reached":
        next_step = f"the {result.limit} limit ended the run; raise it and call rlm_complete again for a fuller answer"
    elif result.status == "failed":
        next_step = "see error; rlm_get_trajectory shows what happened before it"
    return CompleteResult(status=result.status, run_id=result.run_id, answer=result.answer, limit=result.limit,
                          error=result.error, iterations=result.iterations, subcalls=result.subcalls,
                          usage={k: v.model_dump() for k, v in result.usage.items()}, cost_usd=result.cost_usd,
                          elapsed_s=result.elapsed_s, trajectory_path=result.trajectory_path, next_step=next_step)


def _complete_summary(result: CompleteResult) -> str:
    cost = f", ${result.cost_usd:.4f}" if result.cost_usd is not None else ""
    stats = f"{result.iterations} iterations, {result.subcalls} sub-calls{cost}, {result.elapsed_s:.1f} s"
    if result.status in ("running", "queued"):
        return f"Run {result.run_id} is {result.status} ({result.progress}). {result.next_step}."
    lines = [f"Run {result.run_id}: {result.status}"
             + (f" ({result.limit})" if result.limit else "") + f" after {stats}."]
    if result.error:
        lines.append(f"Error: {result.error}")
    if result.answer is not None:
        lines.append(f"Answer:\n{result.answer}")
    if result.next_step:
        lines.append(f"Next: {result.next_step}")
    return "\n".join(lines)


def build_server(services: Services) -> MCPServer:
    """The MCP server with every tool, resource and prompt registered.

    ``services`` outlive MCP sessions (a run started over one HTTP session can be polled from
    another); whoever created them closes them when the process stops serving.
    """

    def svc() -> Services:
        return services

    server = MCPServer("rlm-mcp", version=__version__, instructions=INSTRUCTIONS)

    def guarded(fn: Any) -> Any:
        """Every failure as a tool error whose message the host model reads and can act on.
        Anything else would reach the model as a bare "Error executing tool X" (the SDK hides
        unexpected exceptions) with the cause only in the server log."""
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except RlmError as exc:
                message = str(exc)
            except OSError as exc:  # the server's own files: a full disk, permissions, ...
                message = describe_os_error(exc, fn.__name__, services.settings.home)
                log.warning("%s: %s", fn.__name__, message)
            except Exception as exc:
                log.error("%s crashed: %s\n%s", fn.__name__, quoted(repr(exc), ERROR_CHARS),
                          "".join(traceback.format_tb(exc.__traceback__)))  # frames; no input in them
                message = (f"{fn.__name__} failed on an internal error ({type(exc).__name__}): retry; if it "
                           "happens again, report it with the server log, which has the details")
            raise ToolError(bounded(message)) from None
        return wrapper

    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(title="Load a large input as a context handle",
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=True, open_world_hint=True))
    @guarded
    async def rlm_load_context(
        path: Annotated[str | None, Field(description="a file or directory on the server's machine")] = None,
        url: Annotated[str | None, Field(description="an http(s) URL to download server-side")] = None,
        text: Annotated[str | None, Field(description="the content itself (small inputs only)")] = None,
        name: Annotated[str | None, Field(description="a label for the context")] = None,
        include: Annotated[list[str] | None, Field(description="globs of files to keep from a directory, e.g. ['*.py']")] = None,
        exclude: Annotated[list[str] | None, Field(description="globs of files to skip from a directory")] = None,
        max_bytes: Annotated[int | None, Field(description="refuse inputs larger than this many bytes", gt=0)] = None,
    ) -> Annotated[CallToolResult, ContextInfo]:
        """Load a file, a directory (as a list of documents), a URL or text on the server and
        return a handle for rlm_complete. The content stays on the server; you get its size,
        a short preview and what was skipped."""
        given = [n for n, v in (("path", path), ("url", url), ("text", text)) if v is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of path, url or text" + (f" (got {', '.join(given)})" if given else ""))
        store = svc().store
        if path is not None:
            info = await asyncio.to_thread(store.load_path, path, name=name, include=include,
                                           exclude=exclude, max_bytes=max_bytes)
        elif url is not None:
            info = await store.load_url(url, name=name, max_bytes=max_bytes)
        else:
            info = await asyncio.to_thread(store.load_text, text or "", name=name)
        return _reply(info, _context_summary(info))

    @server.tool(title="List loaded contexts", annotations=read_only)
    @guarded
    async def rlm_list_contexts() -> Annotated[CallToolResult, ContextList]:
        """List the contexts stored on the server, newest first."""
        contexts = await asyncio.to_thread(svc().store.list)
        lines = [f"{c.handle}  {c.kind:9} {c.characters:>14,} chars  {c.name}" for c in contexts]
        summary = f"{len(contexts)} contexts" + (":\n" + "\n".join(lines) if lines else ". Load one with rlm_load_context.")
        return _reply(ContextList(contexts=contexts), summary)

    @server.tool(title="Delete a context",
                 annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=False))
    @guarded
    async def rlm_delete_context(
        handle: Annotated[str, Field(description="the handle from rlm_load_context")],
    ) -> Annotated[CallToolResult, ContextInfo]:
        """Delete a stored context and free its disk space."""
        info = await asyncio.to_thread(svc().store.delete, handle)
        return _reply(info, f"Deleted context {info.handle} ({info.name}).")

    @server.tool(title="Read a slice of a context", annotations=read_only)
    @guarded
    async def rlm_peek_context(
        handle: Annotated[str, Field(description="the handle from rlm_load_context")],
        start: Annotated[int, Field(description="character offset to start at", ge=0)] = 0,
        length: Annotated[int, Field(description="characters to return (at most 20000)", gt=0)] = 2000,
        document: Annotated[int | None, Field(description="for document lists: read this document only", ge=0)] = None,
    ) -> Annotated[CallToolResult, ContextPage]:
        """Read a bounded slice of a context (for a quick look; use rlm_complete for questions)."""
        page = await asyncio.to_thread(svc().store.peek, handle, start, length, document)
        more = f"\n[continue with start={page.next_start}]" if page.next_start is not None else "\n[end of context]"
        return _reply(page, f"{handle} [{page.start:,}:{page.end:,} of {page.total:,}]\n{page.text}{more}")

    @server.tool(title="Answer a question over a context with an RLM",
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=False, open_world_hint=True),
                 meta=ANSWER_META)
    @guarded
    async def rlm_complete(
        ctx: Context,
        query: Annotated[str, Field(description="the question or task")],
        handle: Annotated[str | None, Field(description="a context handle from rlm_load_context")] = None,
        handles: Annotated[list[str] | None, Field(description="several handles, treated as one list of documents")] = None,
        context: Annotated[str | None, Field(description=f"small inline context text (at most {INLINE_CONTEXT_CHARS:,} characters)")] = None,
        model: Annotated[str | None, Field(description="litellm model string for the root model")] = None,
        sub_model: Annotated[str | None, Field(description="model for llm_query sub-calls")] = None,
        sandbox: Annotated[Literal["local", "docker", "daytona"] | None, Field(description="where the REPL runs")] = None,
        max_iterations: Annotated[int | None, Field(description="root-model turns (default 30)")] = None,
        max_depth: Annotated[int | None, Field(description="1: no child RLMs; 2: rlm_query starts child RLMs")] = None,
        timeout_s: Annotated[float | None, Field(description="wall-clock limit for the run, seconds")] = None,
        cell_timeout_s: Annotated[float | None, Field(description="time limit per REPL code block, seconds (default 300, never more than timeout_s)")] = None,
        max_cost_usd: Annotated[float | None, Field(description="spending limit over the whole run, USD")] = None,
        wait_s: Annotated[float, Field(description="seconds to wait before returning status 'running' (0-300)", ge=0, le=300)] = 50,
    ) -> Annotated[CallToolResult, CompleteResult]:
        """Answer `query` over a large context with a Recursive Language Model: a root model
        explores the context in a sandboxed Python REPL and calls sub-models on pieces of it.
        Runs longer than wait_s keep going: poll rlm_get_result(run_id)."""
        services = svc()
        request = RunRequest(query=query, model=model, sub_model=sub_model, sandbox=sandbox,
                             limits=services.settings.limits.with_overrides(
                                 max_iterations=max_iterations, max_depth=max_depth,
                                 timeout_s=timeout_s, cell_timeout_s=cell_timeout_s,
                                 max_cost_usd=max_cost_usd),
                             **await asyncio.to_thread(_context_for, services, handle, handles, context))
        stored = handle if handle is not None else (handles[0] if handles and len(handles) == 1 else None)
        # A stored handle is checked against its sha256 as the run starts; fresh content (inline,
        # combined just now) was hashed moments ago.
        check = functools.partial(services.store.verify, stored) if stored is not None else None
        run = services.runs.start(request, check=check)
        try:
            run = await _wait_with_progress(services, run, ctx, wait_s)
        except asyncio.CancelledError:
            await services.runs.cancel(run.run_id)
            raise
        result = _complete_result(run)
        return _reply(result, _complete_summary(result), ANSWER_META)

    @server.tool(title="Get (or wait for) a run's result", annotations=read_only, meta=ANSWER_META)
    @guarded
    async def rlm_get_result(
        ctx: Context,
        run_id: Annotated[str, Field(description="the run_id from rlm_complete")],
        wait_s: Annotated[float, Field(description="seconds to wait for it to finish (0-300)", ge=0, le=300)] = 50,
    ) -> Annotated[CallToolResult, CompleteResult]:
        """The result of a run started by rlm_complete, waiting up to wait_s if it is still running."""
        services = svc()
        run = services.runs.runs.get(run_id)
        if run is None:
            result = await asyncio.to_thread(_stored, services, run_id)
            return _reply(result, _complete_summary(result), ANSWER_META)
        result = _complete_result(await _wait_with_progress(services, run, ctx, wait_s))
        return _reply(result, _complete_summary(result), ANSWER_META)

    @server.tool(title="Cancel a run", annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    @guarded
    async def rlm_cancel(run_id: Annotated[str, Field(description="the run_id from rlm_complete")]) -> Annotated[CallToolResult, CompleteResult]:
        """Stop a running run and its sandboxes; returns its final state."""
        services = svc()
        if run_id in services.runs.runs:
            result = _complete_result(await services.runs.cancel(run_id))
        else:  # finished before a restart, or left behind by a server that stopped: nothing to stop
            result = await asyncio.to_thread(_stored, services, run_id)
        return _reply(result, _complete_summary(result))

    @server.tool(title="Inspect how a run reached its answer", annotations=read_only)
    @guarded
    async def rlm_get_trajectory(
        run_id: Annotated[str, Field(description="the run_id from rlm_complete")],
        offset: Annotated[int, Field(description="first iteration to show (0-based)", ge=0)] = 0,
        limit: Annotated[int, Field(description="iterations per page (1-20)", ge=1, le=20)] = 5,
        detail: Annotated[Literal["summary", "full"], Field(description="summary: short excerpts; full: longer code and output")] = "summary",
    ) -> Annotated[CallToolResult, TrajectoryPage]:
        """A page of a run's trajectory: per iteration the model's reasoning, code, output,
        sub-call counts and usage, plus where the full JSONL file is."""
        services = svc()
        path = await asyncio.to_thread(services.runs.trajectory, run_id)
        if path is None:
            if run_id in services.runs.runs:
                raise ConfigError(f"run {run_id} has not written its first iteration yet (it is queued or "
                                  "starting): call rlm_get_trajectory again shortly")
            raise ConfigError(f"no trajectory for run_id {run_id!r}: use a run_id returned by rlm_complete")
        page = TrajectoryPage(**await asyncio.to_thread(trajectory_page, path, offset, limit, detail))
        more = f" Next page: offset={page.next_offset}." if page.next_offset is not None else ""
        lines = [f"Run {page.run_id} ({page.status}), iterations {page.offset + 1}-{page.offset + len(page.iterations)} "
                 f"of {page.total_iterations}.{more} Full log: {page.path}"]
        for item in page.iterations:  # one line each: the details are in the structured content
            reasoning = " ".join(str(item.get("reasoning") or "").split())[:160]
            lines.append(f"- iteration {item.get('iteration')}: {len(item.get('code_blocks') or [])} code blocks, "
                         f"{item.get('subcalls')} sub-calls" + (f"; {reasoning}" if reasoning else "")
                         + ("; FINAL ANSWER" if item.get("final_answer") is not None else ""))
        return _reply(page, "\n".join(lines))

    @server.resource("rlm://contexts/{handle}", name="context", mime_type="application/json",
                     description="A stored context's metadata and preview")
    def context_resource(handle: str) -> str:
        return svc().store.get(handle).model_dump_json(indent=2)

    @server.resource("rlm://trajectories/{run_id}", name="trajectory", mime_type="application/jsonl",
                     description="A run's full trajectory (JSON lines, reference RLM logger format)")
    def trajectory_resource(run_id: str) -> str:
        path = svc().runs.trajectory(run_id)
        if path is None:
            raise ValueError(f"no trajectory for run_id {run_id!r}")
        return path.read_text(encoding="utf-8")

    @server.prompt(name="analyze_large_file", title="Analyse a large file with an RLM")
    def analyze_large_file(path: str, question: str) -> str:
        """Load a large file or directory server-side and answer a question about it."""
        return (f"Use the rlm-mcp tools to answer a question about {path} without reading it yourself.\n"
                f"1. Call rlm_load_context with path={path!r}.\n"
                f"2. Call rlm_complete with the returned handle and the query: {question}\n"
                "3. If the status is 'running', call rlm_get_result with the run_id until it finishes.\n"
                "4. Report the answer; if it looks doubtful, inspect rlm_get_trajectory.")

    return server


def _stored(services: Services, run_id: str) -> CompleteResult:
    """The state of a run this server is not running, from its trajectory (blocking)."""
    stored = services.runs.stored_result(run_id)
    if stored is None:
        services.runs.get(run_id)  # raises the "unknown run_id" error
    assert stored is not None
    return _finished(stored)


def _context_for(services: Services, handle: str | None, handles: list[str] | None,
                 context: str | None) -> dict[str, Any]:
    given = [n for n, v in (("handle", handle), ("handles", handles), ("context", context)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of handle, handles or context"
                          + (f" (got {', '.join(given)})" if given else "; load large inputs with rlm_load_context first"))
    store = services.store
    if handle is not None:
        info = store.get(handle)
    elif handles is not None:
        if not handles:
            raise ConfigError("handles is empty: pass at least one handle from rlm_load_context")
        info = store.combine(handles) if len(handles) > 1 else store.get(handles[0])
    else:
        assert context is not None
        if len(context) > INLINE_CONTEXT_CHARS:
            raise ConfigError(f"the inline context has {len(context):,} characters (limit {INLINE_CONTEXT_CHARS:,}): "
                              "load it with rlm_load_context (path, url or text) and pass the handle")
        info = store.load_text(context, name="inline context")
    return {"context": store.context_file(info.handle), "shape": shape_of(info)}


async def _wait_with_progress(services: Services, run: Run, ctx: Context, wait_s: float) -> Run:
    """Wait up to wait_s for a run, relaying its progress to this tool call meanwhile."""
    progress = _ProgressForwarder(ctx)
    run.listeners.append(progress)
    try:
        return await services.runs.wait(run.run_id, wait_s)
    finally:
        with contextlib.suppress(ValueError):
            run.listeners.remove(progress)
        await progress.drain()


class _ProgressForwarder:
    """Turns engine events into MCP progress notifications for one tool call."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.count = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self, event: RunEvent) -> None:
        self.count += 1
        task = asyncio.get_running_loop().create_task(self._send(self.count, event.message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, progress: int, message: str) -> None:
        with contextlib.suppress(Exception):  # a client gone away must not break the run
            await self.ctx.report_progress(progress, None, message)

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)


# ----- transports -------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


class BearerAuth:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, supplied = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(supplied.strip(), self.token):
                body = (b'{"error": "missing or wrong bearer token: send Authorization: Bearer <token>, where the '
                        b'token is RLM_MCP_AUTH_TOKEN or the one the server printed at start and wrote to its '
                        b'token file"}')
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class HttpAuth:
    """How an HTTP server checks its clients: a bearer token (given or generated), or none."""

    token: str | None
    token_file: Path | None = None  # where a generated token was written

    @property
    def generated(self) -> bool:
        return self.token_file is not None


def token_file_path(settings: Settings, port: int) -> Path:
    """Where an HTTP server on ``port`` writes the token it generated."""
    return Path(settings.home).expanduser() / f"http-{port}.token"


def http_auth(settings: Settings, host: str, port: int) -> HttpAuth:
    """The token rule, as in Jupyter: a token always, generated when none is given; no token
    only when asked explicitly, and only on loopback (any local user could reach it, but no one
    else)."""
    if settings.no_auth:
        if settings.auth_token:
            raise ConfigError("RLM_MCP_AUTH_TOKEN is set and --no-auth (or RLM_MCP_NO_AUTH) asks for no token: "
                              "drop one of the two")
        if not is_loopback(host):
            raise ConfigError(f"refusing --no-auth (RLM_MCP_NO_AUTH) on {host}, which is not a loopback address: "
                              "anyone who can reach it could read files as this server's user. Serve without "
                              "--no-auth (a token is then generated, or set RLM_MCP_AUTH_TOKEN), or bind 127.0.0.1")
        return HttpAuth(None)
    if settings.auth_token:
        return HttpAuth(settings.auth_token)
    token = secrets.token_urlsafe(32)
    path = token_file_path(settings, port)
    private_dir(path.parent, tighten=False)
    write_private_text(path, token + "\n")
    return HttpAuth(token, path)


def forget_generated_token(auth: HttpAuth) -> None:
    """Remove the token file at shutdown (unless a newer server on the port rewrote it)."""
    if auth.token_file is None:
        return
    with contextlib.suppress(OSError):
        if auth.token_file.read_text(encoding="utf-8").strip() == auth.token:
            auth.token_file.unlink()


def announce(transport: str, host: str, port: int, auth: HttpAuth) -> str:
    """What the operator needs to connect, printed to stderr at start."""
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}{'/sse' if transport == 'sse' else '/mcp'}"
    name = "SSE" if transport == "sse" else "streamable HTTP"
    lines = [f"rlm-mcp: serving MCP ({name}) at {url}"]
    if auth.token is None:
        lines.append("rlm-mcp: WARNING: no token (--no-auth): every local user can use this server, "
                     "and read any file it can read")
        return "\n".join(lines) + "\n"
    if auth.generated:
        lines.append(f"rlm-mcp: token (new at each start; also in {auth.token_file}, readable only by this user): "
                     f"{auth.token}")
        header = f"Authorization: Bearer {auth.token}"
    else:
        lines.append("rlm-mcp: token: the value of RLM_MCP_AUTH_TOKEN")
        header = "Authorization: Bearer $RLM_MCP_AUTH_TOKEN"
    lines.append(f"rlm-mcp: send it with every request as the header  {header}")
    lines.append(f"rlm-mcp: e.g. claude mcp add --transport {'sse' if transport == 'sse' else 'http'} rlm {url} "
                 f"--header \"{header}\"")
    return "\n".join(lines) + "\n"


def http_app(server: MCPServer, transport: str, host: str, auth: HttpAuth) -> Any:
    """The Starlette app for sse/http, with the bind rules applied."""
    if is_loopback(host):
        # The SDK turns DNS-rebinding protection on by itself only for the exact names
        # 127.0.0.1 / localhost / ::1; any loopback bind (127.0.0.2, ...) gets it explicitly.
        names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{name}:*" for name in sorted(names)],
            allowed_origins=[f"http://{name}:*" for name in sorted(names)])
    else:
        # Host names cannot be known for a public bind; the bearer token is what protects it.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if transport == "sse":
        app = server.sse_app(transport_security=security, host=host)
    else:
        app = server.streamable_http_app(transport_security=security, host=host)
    return BearerAuth(app, auth.token) if auth.token else app


class OnShutdown:
    """ASGI wrapper running ``cleanup`` when the app shuts down, before it reports so: uvicorn
    re-raises SIGTERM/SIGINT right after its shutdown, so code after ``serve()`` never runs then."""

    def __init__(self, app: Any, cleanup: Callable[[], Awaitable[None]]) -> None:
        self.app = app
        self.cleanup = cleanup

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_after_cleanup(message: dict[str, Any]) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.cleanup()
            await send(message)

        await self.app(scope, receive, send_after_cleanup)


def serve(settings: Settings, transport: str = "stdio", host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the server until it is stopped; runs and sandboxes are cleaned up on the way out."""
    # The token rule first: a refused bind must not leave anything behind.
    auth = None if transport == "stdio" else http_auth(settings, host, port)
    services = Services.create(settings)
    server = build_server(services)
    closed = asyncio.Event()

    async def close() -> None:
        if not closed.is_set():
            closed.set()
            await services.aclose()
            if auth is not None:
                forget_generated_token(auth)

    app = None if auth is None else OnShutdown(http_app(server, transport, host, auth), close)

    async def main() -> None:
        # What servers that died left behind (containers, temporary directories), off the loop.
        reaper = asyncio.create_task(reap_leftovers(settings))
        # Runs a killed server left "running" become failed in their files too (in a thread:
        # one line read per trajectory; the tools settle any run they touch in the meantime).
        settling = asyncio.create_task(_settle_stopped_runs(services))
        warm_up = None
        # Docker with a warm pool fills it; local decides its isolation now, so that a missing
        # wall (no bubblewrap, no control groups) is logged when the server starts.
        if settings.docker_pool_size > 0 or settings.sandbox == "local":
            warm_up = asyncio.create_task(_warm_up(services))
        try:
            if app is None:
                await server.run_stdio_async()
            else:
                import uvicorn

                assert auth is not None
                # Printed, not logged: the operator needs it whatever RLM_MCP_LOG_LEVEL says.
                sys.stderr.write(announce(transport, host, port, auth))
                sys.stderr.flush()
                # log_config=None: uvicorn logs through our stderr handler (its default puts the
                # access log on stdout, which belongs to the protocol on stdio).
                config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level.lower(),
                                        lifespan="on", log_config=None)
                await uvicorn.Server(config).serve()
        finally:
            reaper.cancel()
            settling.cancel()
            if warm_up is not None:
                warm_up.cancel()
            await close()

    try:
        asyncio.run(main())
    finally:
        if auth is not None:  # e.g. the port was taken: uvicorn exits before any lifespan
            forget_generated_token(auth)


async def _settle_stopped_runs(services: Services) -> None:
    try:
        await asyncio.to_thread(services.runs.settle_all)
    except OSError as exc:  # an unreadable data dir shows up again, clearly, when a tool uses it
        log.warning("could not check the trajectories of earlier runs: %s", exc)


async def _warm_up(services: Services) -> None:
    try:
        await services.engine.sandboxes.warm_up()
    except RlmError as exc:  # the first run will report it to the host model
        log.warning("sandbox warm-up failed: %s", exc)
