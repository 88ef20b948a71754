"""What the tools return: result models and the text a host model reads beside them."""

from __future__ import annotations

from typing import Any, Literal

from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from rlm_mcp.engine import Run, RunResult
from rlm_mcp.store import ContextInfo

ERROR_CHARS = 2_000  # longest tool error message (and its log line)


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
    next_step = None
    if result.status == "limit_reached":
        next_step = f"the {result.limit} limit ended the run; raise it and call rlm_complete again for a fuller answer"
    elif result.status == "failed":
        next_step = "see error; rlm_get_trajectory shows what happened before it"
    return CompleteResult(status=result.status, run_id=result.run_id, answer=result.answer, limit=result.limit,
                          error=result.error, iterations=result.iterations, subcalls=result.subcalls,
                          usage={k: v.model_dump() for k, v in result.usage.items()}, cost_usd=result.cost_usd,
                          elapsed_s=result.elapsed_s, trajectory_path=result.trajectory_path, next_step=next_step)


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
        lines.append(f"Answer:\n{result.answer}")
    if result.next_step:
        lines.append(f"Next: {result.next_step}")
    return "\n".join(lines)

