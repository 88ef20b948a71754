"""Tool, resource and prompt registration. Tools stay thin and delegate to the services (context
store, run manager, trajectory view)."""

# No ``from __future__ import annotations``: the tools' argument descriptions are f-strings over
# the server's settings (each default stated from config), evaluated where the tool is defined;
# as strings, the SDK would evaluate them later without build_server's locals.

import asyncio
import contextlib
import functools
import inspect
import logging
import traceback
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, Tool as MCPTool, ToolAnnotations
from pydantic import Field

from rlm_mcp import __version__
from rlm_mcp.engine import Run, RunEvent, RunRequest
from rlm_mcp.engine.trajectory import trajectory_page
from rlm_mcp.errors import ConfigError, RlmError, describe_os_error, quoted
from rlm_mcp.server.results import (
    ERROR_CHARS,
    CompleteResult,
    ContextList,
    LoadedContext,
    PeekResult,
    RunView,
    TrajectoryPage,
    bounded,
    complete_result,
    complete_summary,
    context_summary,
    finished,
    context_list,
    deleted,
    loaded,
    peeked,
    reply,
    trajectory_next_step,
)
from rlm_mcp.server.pages import view_links
from rlm_mcp.services import Services
from rlm_mcp.store.front import PEEK_MAX
from rlm_mcp.viewer import APP_RESOURCE_URI, MCP_APP_MIME, VIEW_TOOL, app_html, build_view, view_etag

log = logging.getLogger(__name__)

ANSWER_META = {"anthropic/maxResultSizeChars": 500_000}
# Claude Code replaces a result over MAX_MCP_OUTPUT_TOKENS (25,000 by default) with an error
# unless the tool admits more. Bounds: a context report holds <= 1,000 document lengths and a
# 300-character preview (~12 KB); a list <= 100 of them with <= 20 lengths each (~70 KB); a
# peek <= 20,000 characters; a trajectory page <= 20 bounded iterations.
CONTEXT_META = {"anthropic/maxResultSizeChars": 100_000}
PAGE_META = {"anthropic/maxResultSizeChars": 200_000}
# MCP Apps (SEP-1865): hosts that render apps show the run viewer beside these tools' results;
# "ui/resourceUri" is the extension's earlier, flat spelling, which some hosts still read.
UI_META = {"ui": {"resourceUri": APP_RESOURCE_URI}, "ui/resourceUri": APP_RESOURCE_URI}
# The app's own data tool: "visibility": ["app"] asks hosts to keep it from the model.
VIEW_TOOL_META = {"ui": {"resourceUri": APP_RESOURCE_URI, "visibility": ["app"]},
                  "anthropic/maxResultSizeChars": 2_000_000}
VIEW_BUDGET_CHARS = 1_000_000  # excerpts in one rlm_get_run_view result (its JSON stays near 2 MB)

class _Server(MCPServer):
    """The SDK's server with the tools' input schemas trimmed of the titles pydantic derives from
    names ("Max Bytes" for max_bytes, "rlm_load_contextArguments"): hosts put every input schema
    into the model's prompt, where those titles only repeat the names next to the descriptions.
    (pydantic sets a field's title after any json_schema_extra runs, so Field cannot drop it.)"""

    async def list_tools(self) -> list[MCPTool]:
        return [tool.model_copy(update={"input_schema": _untitled(tool.input_schema)}) for tool in await super().list_tools()]


def _untitled(schema: dict[str, Any]) -> dict[str, Any]:
    """The object schema without its own title and its properties' (an argument named "title" stays)."""
    trimmed = {key: value for key, value in schema.items() if key != "title"}
    if isinstance(schema.get("properties"), dict):
        trimmed["properties"] = {name: ({k: v for k, v in spec.items() if k != "title"} if isinstance(spec, dict) else spec)
                                 for name, spec in schema["properties"].items()}
    return trimmed


INSTRUCTIONS = """\
rlm-mcp answers questions over inputs far larger than your context window. Load the input \
server-side with rlm_load_context (a path, URL or text: the content never passes through you), \
then call rlm_complete with the handle and your question. A run can take minutes: if \
rlm_complete returns status "running", call rlm_get_result with its run_id. \
rlm_get_trajectory shows how an answer was reached."""


def build_server(services: Services, view_base: str | None = None) -> MCPServer:
    """The MCP server with every tool, resource and prompt registered.

    ``services`` outlive MCP sessions (a run started over one HTTP session can be polled from
    another); whoever created them closes them when the process stops serving. ``view_base``:
    the URL the run pages are served under (HTTP transports), for the results' ``view_url``.
    """

    def linked(result: Any) -> Any:
        """A result with where a person can see its run."""
        return result.model_copy(update=view_links(view_base, result.run_id))

    def svc() -> Services:
        return services

    server = _Server("rlm-mcp", version=__version__, instructions=INSTRUCTIONS)

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
        # Hosts send the description to the model as it is: without the docstring's indentation.
        wrapper.__doc__ = inspect.cleandoc(fn.__doc__ or "")
        return wrapper

    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(title="Load a large input as a context handle",
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=True, open_world_hint=True),
                 meta=CONTEXT_META)
    @guarded
    async def rlm_load_context(
        path: Annotated[str | None, Field(description="a file or directory on the server's machine")] = None,
        url: Annotated[str | None, Field(description="an http(s) URL to download server-side")] = None,
        text: Annotated[str | None, Field(description="the content itself (small inputs only)")] = None,
        name: Annotated[str | None, Field(description="a label for the context")] = None,
        include: Annotated[list[str] | None, Field(description="globs of files to keep from a directory, e.g. ['*.py']")] = None,
        exclude: Annotated[list[str] | None, Field(description="globs of files to skip from a directory")] = None,
        max_bytes: Annotated[int | None, Field(description="refuse inputs larger than this many bytes", gt=0)] = None,
    ) -> Annotated[CallToolResult, LoadedContext]:
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
        return reply(loaded(info), context_summary(info), CONTEXT_META)

    @server.tool(title="List loaded contexts", annotations=read_only, meta=CONTEXT_META)
    @guarded
    async def rlm_list_contexts() -> Annotated[CallToolResult, ContextList]:
        """List the contexts stored on the server, newest first."""
        contexts = await asyncio.to_thread(svc().store.list)
        lines = [f"{c.handle}  {c.kind:9} {c.characters:>14,} chars  {c.name}" for c in contexts]
        summary = f"{len(contexts)} contexts" + (":\n" + "\n".join(lines) if lines else ". Load one with rlm_load_context.")
        return reply(context_list(contexts), summary, CONTEXT_META)

    @server.tool(title="Delete a context",
                 annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=False),
                 meta=CONTEXT_META)
    @guarded
    async def rlm_delete_context(
        handle: Annotated[str, Field(description="the handle from rlm_load_context")],
    ) -> Annotated[CallToolResult, LoadedContext]:
        """Delete a stored context and free its disk space."""
        info = await asyncio.to_thread(svc().store.delete, handle)
        return reply(deleted(info), f"Deleted context {info.handle} ({info.name}).", CONTEXT_META)

    @server.tool(title="Read a slice of a context", annotations=read_only, meta=PAGE_META)
    @guarded
    async def rlm_peek_context(
        handle: Annotated[str, Field(description="the handle from rlm_load_context")],
        start: Annotated[int, Field(description="character offset to start at", ge=0)] = 0,
        length: Annotated[int, Field(description=f"characters to return (at most {PEEK_MAX})", gt=0)] = 2000,
        document: Annotated[int | None, Field(description="for document lists: read this document only", ge=0)] = None,
    ) -> Annotated[CallToolResult, PeekResult]:
        """Read a bounded slice of a context (for a quick look; use rlm_complete for questions)."""
        page = await asyncio.to_thread(svc().store.peek, handle, start, length, document)
        more = f"\n[continue with start={page.next_start}]" if page.next_start is not None else "\n[end of context]"
        return reply(peeked(page, length), f"{handle} [{page.start:,}:{page.end:,} of {page.total:,}]\n{page.text}{more}", PAGE_META)

    @server.tool(title="Answer a question over a context with an RLM",
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=False, open_world_hint=True),
                 meta={**ANSWER_META, **UI_META})
    @guarded
    async def rlm_complete(
        ctx: Context,
        query: Annotated[str, Field(description="the question or task; may be empty only with continue_from, to "
                                                "resume a run that a limit stopped")] = "",
        handle: Annotated[str | None, Field(description="a context handle from rlm_load_context")] = None,
        handles: Annotated[list[str] | None, Field(description="several handles, treated as one list of documents")] = None,
        context: Annotated[str | None, Field(description=f"small inline context text (at most {services.settings.max_inline_chars:,} characters)")] = None,
        model: Annotated[str | None, Field(description="litellm model string for the root model")] = None,
        sub_model: Annotated[str | None, Field(description="model for llm_query sub-calls")] = None,
        sandbox: Annotated[Literal["local", "docker", "daytona"] | None, Field(description="where the REPL runs")] = None,
        max_iterations: Annotated[int | None, Field(description=f"root-model turns (default {services.settings.limits.max_iterations})")] = None,
        max_depth: Annotated[int | None, Field(description="1: no child RLMs; 2: rlm_query starts child RLMs")] = None,
        timeout_s: Annotated[float | None, Field(description="wall-clock limit for the run, seconds")] = None,
        cell_timeout_s: Annotated[float | None, Field(description=f"time limit per REPL code block, seconds (default {services.settings.limits.cell_timeout_s:g}, never more than timeout_s)")] = None,
        max_cost_usd: Annotated[float | None, Field(description="spending limit over the whole run, USD")] = None,
        max_errors: Annotated[int | None, Field(description="end the run (limit_reached) after this many code blocks in a row fail")] = None,
        continue_from: Annotated[str | None, Field(description="a finished run_id: with a query, a follow-up in that run's REPL "
                                                              "(its variables kept; context defaults to its context); with "
                                                              "no query, resume a run a limit stopped (raise that limit)")] = None,
        system_prompt: Annotated[str | None, Field(description="a custom system prompt template; placeholders {context_type}, "
                                                              "{context_total_chars}, {context_document_count}, "
                                                              "{context_document_lengths}, {context_name}, "
                                                              "{sub_model_capacity_chars}; literal braces as {{ }}")] = None,
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
                                 max_cost_usd=max_cost_usd, max_errors=max_errors),
                             continue_from=continue_from, system_prompt=system_prompt,
                             **await asyncio.to_thread(services.context_for, handle, handles, context, continue_from))
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
        result = linked(complete_result(run))
        return reply(result, complete_summary(result), ANSWER_META)

    @server.tool(title="Get (or wait for) a run's result", annotations=read_only, meta={**ANSWER_META, **UI_META})
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
            result = linked(finished(await asyncio.to_thread(services.stored_result, run_id)))
            return reply(result, complete_summary(result), ANSWER_META)
        result = linked(complete_result(await _wait_with_progress(services, run, ctx, wait_s)))
        return reply(result, complete_summary(result), ANSWER_META)

    @server.tool(title="Cancel a run", annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False),
                 meta=ANSWER_META)
    @guarded
    async def rlm_cancel(run_id: Annotated[str, Field(description="the run_id from rlm_complete")]) -> Annotated[CallToolResult, CompleteResult]:
        """Stop a running run and its sandboxes; returns its final state."""
        services = svc()
        if run_id in services.runs.runs:
            result = complete_result(await services.runs.cancel(run_id))
        else:  # finished before a restart, or left behind by a server that stopped: nothing to stop
            result = finished(await asyncio.to_thread(services.stored_result, run_id))
        return reply(result, complete_summary(result), ANSWER_META)

    @server.tool(title="Inspect how a run reached its answer", annotations=read_only, meta={**PAGE_META, **UI_META})
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
        page = linked(TrajectoryPage(**await asyncio.to_thread(trajectory_page, path, offset, limit, detail)))
        more = f" Next page: offset={page.next_offset}." if page.next_offset is not None else ""
        lines = [f"Run {page.run_id} ({page.status}), iterations {page.offset + 1}-{page.offset + len(page.iterations)} "
                 f"of {page.total_iterations}.{more} Full log: {page.path}"]
        for item in page.iterations:  # one line each: the details are in the structured content
            reasoning = " ".join(str(item.get("reasoning") or "").split())[:160]
            lines.append(f"- iteration {item.get('iteration')}: {len(item.get('code_blocks') or [])} code blocks, "
                         f"{item.get('subcalls')} sub-calls" + (f"; {reasoning}" if reasoning else "")
                         + ("; FINAL ANSWER" if item.get("final_answer") is not None else ""))
        page.next_step = trajectory_next_step(page, limit, detail)
        return reply(page, "\n".join(lines), PAGE_META)

    @server.tool(name=VIEW_TOOL, title="The run viewer's data (for the MCP App)", annotations=read_only,
                 meta=VIEW_TOOL_META)
    @guarded
    async def rlm_get_run_view(
        run_id: Annotated[str, Field(description="the run_id from rlm_complete")],
        etag: Annotated[str | None, Field(description="the etag of the view the app already shows")] = None,
    ) -> Annotated[CallToolResult, RunView]:
        """The run viewer's data for one run (used by the rlm-mcp MCP App; the text tools show the
        same run to a model: rlm_get_result, rlm_get_trajectory)."""
        services = svc()
        path = await asyncio.to_thread(services.runs.trajectory, run_id)  # checks the id, settles a dead run
        if path is None:
            raise ConfigError(f"run {run_id} has no trajectory yet (queued or starting): call again shortly"
                              if run_id in services.runs.runs else
                              f"no trajectory for run_id {run_id!r}: use a run_id returned by rlm_complete")
        directory = services.engine.trajectory_dir
        current = await asyncio.to_thread(view_etag, directory, run_id)
        if etag is not None and etag == current:
            return CallToolResult(content=[TextContent(type="text", text=f"Run {run_id}: unchanged.")],
                                  structured_content={"run_id": run_id, "etag": current, "unchanged": True})
        view = await asyncio.to_thread(functools.partial(build_view, directory, run_id,
                                                         budget_chars=VIEW_BUDGET_CHARS))
        root = view["root"]
        return CallToolResult(content=[TextContent(type="text", text=(
            f"Run {run_id} ({root['status']}): {len(root['iterations'])} iterations, "
            f"{len(root['children'])} child RLMs."))], structured_content=view)

    @server.resource(APP_RESOURCE_URI, name="run-viewer", title="RLM run viewer", mime_type=MCP_APP_MIME,
                     description="The run viewer as an MCP App (SEP-1865): shows a run beside rlm_complete, "
                                 "rlm_get_result and rlm_get_trajectory results",
                     meta={"ui": {"prefersBorder": True}})
    def run_viewer_app() -> str:
        return app_html()

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
        if event.kind == "iteration_done":  # a trajectory line, for the CLI's --verbose: not progress
            return
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
