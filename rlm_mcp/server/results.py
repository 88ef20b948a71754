"""What the tools return: result models and the text a host model reads beside them."""

from __future__ import annotations

from typing import Any, Literal

from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from rlm_mcp.engine import Run, RunResult
from rlm_mcp.store import ContextInfo, ContextPage

ERROR_CHARS = 2_000  # longest tool error message (and its log line)


# Hosts such as Claude Code show the model only JSON.stringify(structuredContent): every result
# says what to call next, and each result's size has a bound that its tool's
# _meta["anthropic/maxResultSizeChars"] (tools.py) admits.
DOCUMENT_LENGTHS_SHOWN = 1_000  # a directory can hold RLM_MCP_MAX_FILES (20,000) documents
CONTEXTS_LISTED = 100           # newest first; the rest are counted
LENGTHS_LISTED = 20             # document lengths per listed context (rlm_load_context shows more)


class LoadedContext(ContextInfo):
    """A stored context as a tool reports it, with the call to make next."""

    next_step: str = ""


class ContextList(BaseModel):
    contexts: list[LoadedContext]
    total: int = Field(0, description=f"contexts stored; at most {CONTEXTS_LISTED} are listed, newest first")
    next_step: str = ""


class PeekResult(ContextPage):
    next_step: str = ""


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
    partial: bool = Field(False, description="the answer is the draft or last words of a run cut short, not a submitted answer")
    continued_from: str | None = Field(None, description="the run this one continued (continue_from)")
    compactions: int = Field(0, description="times the root conversation was summarised to fit the model's window")
    notes: list[str] = Field([], description="what the run ran into: limits the sandbox could not enforce, a follow-up "
                                             "whose earlier sandbox was gone")
    view_url: str | None = Field(None, description="the run's viewer page on this server (HTTP transports)")
    view_command: str | None = Field(None, description="the command that opens the run's viewer (stdio)")


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
    next_step: str = ""
    view_url: str | None = Field(None, description="the run's viewer page on this server (HTTP transports)")
    view_command: str | None = Field(None, description="the command that opens the run's viewer (stdio)")


class RunView(BaseModel, extra="allow"):
    """What rlm_get_run_view returns: the viewer's view-model (``rlm_mcp.viewer``, format
    ``rlm-mcp-view/1``; its other fields pass through as they are), or ``unchanged``."""

    run_id: str
    etag: str
    unchanged: bool = False
    format: str | None = None


def bounded(message: str, limit: int = ERROR_CHARS) -> str:
    """An error message of at most about ``limit`` characters: the start (what went wrong)
    and the end (what to do) are kept, the middle (an echoed input, say) is cut."""
    if len(message) <= limit:
        return message
    tail = limit // 4
    return f"{message[:limit - tail]} [... {len(message) - limit:,} characters cut ...] {message[-tail:]}"


def reply(model: BaseModel, summary: str, meta: dict[str, Any] | None = None) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=summary)],
                          structured_content=model.model_dump(mode="json"), meta=meta)


def shown(info: ContextInfo, next_step: str, lengths_shown: int = DOCUMENT_LENGTHS_SHOWN) -> LoadedContext:
    """``info`` bounded for a tool result (the first ``lengths_shown`` document lengths; a note
    says so) with ``next_step``."""
    data = info.model_dump()
    lengths = data["document_lengths"]
    if len(lengths) > lengths_shown:
        data["document_lengths"] = lengths[:lengths_shown]
        data["notes"] = [*data["notes"], f"document_lengths lists the first {lengths_shown:,} of "
                                         f"{len(lengths):,} documents"]
    return LoadedContext(**data, next_step=next_step)


def loaded(info: ContextInfo) -> LoadedContext:
    return shown(info, f"call rlm_complete(query=<your question>, handle={info.handle!r}); "
                       f"rlm_peek_context(handle={info.handle!r}) shows a slice")


def deleted(info: ContextInfo) -> LoadedContext:
    return shown(info, f"handle {info.handle!r} no longer works; rlm_load_context loads an input again")


def context_list(contexts: list[ContextInfo]) -> ContextList:
    listed = [shown(c, f"rlm_complete(query=<your question>, handle={c.handle!r})", LENGTHS_LISTED)
              for c in contexts[:CONTEXTS_LISTED]]
    older = len(contexts) - len(listed)
    step = ("call rlm_complete(query=<your question>, handle=<a handle above>)"
            + (f"; {older:,} older contexts are not listed" if older else "") if contexts
            else "no contexts yet: call rlm_load_context(path=... or url=... or text=...)")
    return ContextList(contexts=listed, total=len(contexts), next_step=step)


def peeked(page: ContextPage, length: int) -> PeekResult:
    where = f", document={page.document}" if page.document is not None else ""
    step = (f"rlm_peek_context(handle={page.handle!r}, start={page.next_start}, length={length}{where}) reads on; "
            if page.next_start is not None else "end of the context; ")
    return PeekResult(**page.model_dump(), next_step=step + f"ask with rlm_complete(query=..., handle={page.handle!r})")


def trajectory_next_step(page: TrajectoryPage, limit: int, detail: str) -> str:
    if page.next_offset is not None:
        return (f"rlm_get_trajectory(run_id={page.run_id!r}, offset={page.next_offset}, limit={limit}, "
                f"detail={detail!r}) shows the next iterations")
    return f"last page; the full log (JSON lines) is {page.path}"


def context_summary(info: ContextInfo) -> str:
    shape = (f"{info.documents:,} documents, " if info.kind == "documents" else "") + f"{info.characters:,} characters"
    notes = ("\n" + "\n".join(info.notes)) if info.notes else ""
    return (f"Loaded context {info.handle} ({info.name}): {shape}, {info.bytes:,} bytes.{notes}\n"
            f"Preview: {info.preview[:200]!r}\nNext: rlm_complete(query=..., handle={info.handle!r})")


def complete_result(run: Run) -> CompleteResult:
    result = run.result
    if result is None:
        status = "queued" if run.queued else "running"
        return CompleteResult(status=status, run_id=run.run_id, progress=run.progress_message(),
                              iterations=run.last_event.iteration if run.last_event else 0,
                              subcalls=run.last_event.subcalls_done if run.last_event else 0,
                              cost_usd=run.last_event.cost_usd if run.last_event else None,
                              next_step=f"call rlm_get_result(run_id={run.run_id!r}) to wait for the answer, "
                                        f"or rlm_cancel(run_id={run.run_id!r}) to stop it")
    return finished(result)


def finished(result: RunResult) -> CompleteResult:
    trajectory = f"rlm_get_trajectory(run_id={result.run_id!r}) shows how it went"
    if result.status == "completed":
        next_step = f"the answer is final; {trajectory}"
    elif result.status == "cancelled":
        next_step = f"the run was stopped ({result.error}): call rlm_complete again to start over; {trajectory}"
    elif result.status == "limit_reached":
        next_step = (f"the {result.limit} limit ended the run; to go on where it stopped, call "
                     f"rlm_complete(continue_from={result.run_id!r}) with {result.limit} raised and no query "
                     f"(the answer is partial or missing); {trajectory}")
    else:
        next_step = f"the run failed: see error; {trajectory} before it failed"
    return CompleteResult(status=result.status, run_id=result.run_id, answer=result.answer, limit=result.limit,
                          error=result.error, iterations=result.iterations, subcalls=result.subcalls,
                          usage={k: v.model_dump() for k, v in result.usage.items()}, cost_usd=result.cost_usd,
                          elapsed_s=result.elapsed_s, trajectory_path=result.trajectory_path, next_step=next_step,
                          partial=result.partial, continued_from=result.continued_from,
                          compactions=result.compactions, notes=list(result.notes))


def complete_summary(result: CompleteResult) -> str:
    cost = f", ${result.cost_usd:.4f}" if result.cost_usd is not None else ""
    stats = f"{result.iterations} iterations, {result.subcalls} sub-calls{cost}, {result.elapsed_s:.1f} s"
    if result.status in ("running", "queued"):
        return f"Run {result.run_id} is {result.status} ({result.progress}). {result.next_step}."
    lines = [f"Run {result.run_id}: {result.status}"
             + (f" ({result.limit})" if result.limit else "") + f" after {stats}."]
    if result.error:
        lines.append(f"Error: {result.error}")
    if result.answer is not None:
        lines.append(("Partial answer (the run was cut short; this is its draft or last words):\n"
                      if result.partial else "Answer:\n") + result.answer)
    if result.next_step:
        lines.append(f"Next: {result.next_step}")
    lines.extend(f"Note: {note}" for note in result.notes)
    return "\n".join(lines)

