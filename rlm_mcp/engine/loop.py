"""Runs RLMs: a request is checked and resolved against the settings (and the run it
continues), then its root RLM (:mod:`rlm_mcp.engine.rlm`) runs under the run's limits and
deadline, and whatever happened ends in a :class:`RunResult`. Knows nothing of MCP.

A run: the root model gets the query and the context's shape (never the context), writes code
that runs in a sandboxed REPL holding ``context``, and the loop feeds outputs back until the
model submits an answer or a limit ends the run. ``llm_query`` calls from the REPL are served
on the host (keys stay there, :mod:`rlm_mcp.engine.subcalls`); ``rlm_query`` starts a child RLM
with its own sandbox.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm_mcp.config import Limits, Settings
from rlm_mcp.engine import prompts
from rlm_mcp.engine.budget import Budget, ModelUsage
from rlm_mcp.engine.models import ModelClient, Models
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.engine.results import RunEvent, RunRequest, RunResult, RunStatus
from rlm_mcp.engine.rlm import Rlm, Start
from rlm_mcp.engine.sessions import Earlier, SandboxKeeper, load_earlier
from rlm_mcp.engine.trajectory import check_run_id, read_metadata, unique_run_id
from rlm_mcp.engine.tree import Tree
from rlm_mcp.errors import ConfigError, LimitExceeded, RlmError, describe_os_error
from rlm_mcp.sandbox import ContextFile, SandboxRegistry
from rlm_mcp.sandbox.leftovers import owned_temp_prefix

log = logging.getLogger(__name__)

RESUMABLE_LIMITS = ("max_iterations", "timeout_s", "max_tokens", "max_cost_usd", "max_subcalls", "max_errors")


@dataclass
class _Plan:
    """A request resolved against the settings and the run it continues."""

    model: str
    sub_model: str
    limits: Limits
    sandbox: str | None
    template: str | None
    earlier_meta: dict[str, Any] | None
    resume: bool  # continue the earlier loop (no new query) rather than ask a follow-up


class RlmEngine:
    """Runs RLMs. One engine serves many concurrent runs; runs share no mutable state."""

    def __init__(self, settings: Settings, models: Models | None = None,
                 sandboxes: SandboxRegistry | None = None, *, keep_sandboxes: bool = False) -> None:
        self.settings = settings
        self.models: Models = models or ModelClient(settings)
        self.sandboxes = sandboxes or SandboxRegistry(settings)
        self.trajectory_dir = settings.home / "trajectories"
        # Sandboxes of finished runs are kept for follow-ups only where someone can ask one
        # (the server, an embedder that calls aclose()); a one-shot CLI run closes its own.
        self.keeper = SandboxKeeper(self.sandboxes.slots, ttl_s=settings.session_ttl_s if keep_sandboxes else 0,
                                    max_count=settings.max_kept_sandboxes,
                                    max_memory_mb=settings.kept_sandboxes_memory_mb,
                                    sandbox_memory_mb=settings.sandbox_memory_mb)

    async def aclose(self) -> None:
        """Close kept sandboxes, then the backends."""
        await self.keeper.aclose()
        await self.sandboxes.aclose()

    def context_window(self, model: str) -> int | None:
        """The root model's window in tokens: RLM_MCP_CONTEXT_WINDOW, else litellm's table."""
        return self.settings.context_window or self.models.context_window(model)

    def trajectory_path(self, run_id: str) -> Path:
        return self.trajectory_dir / f"{run_id}.jsonl"

    def prepare(self, request: RunRequest) -> tuple[str, str, Limits]:
        """Validate a request before anything starts: (model, sub_model, limits) or raise."""
        plan = self._plan(request)
        return plan.model, plan.sub_model, plan.limits

    def _plan(self, request: RunRequest) -> _Plan:
        earlier = self._earlier_meta(request.continue_from) if request.continue_from is not None else None
        resume = earlier is not None and not (request.query and request.query.strip())
        if earlier is None and (not request.query or not request.query.strip()):
            raise ConfigError("the query is empty: say what you want to know about the context")
        if earlier is None and (request.context is None or request.shape is None):
            raise ConfigError("no context: give a context (a handle or text), or continue_from=RUN_ID to use "
                              "the context of an earlier run")
        limits = (request.limits or self.settings.limits).validated()
        previous_model = earlier.get("root_model") if earlier else None
        previous_sub = earlier.get("sub_model") if earlier else None
        model = self.models.check_model(request.model or previous_model or self.settings.model)
        sub_model = self.models.check_model(request.sub_model or previous_sub or self.settings.sub_model or model)
        sandbox = request.sandbox or (earlier.get("environment_type") if earlier else None)
        self.sandboxes.get(sandbox)  # unknown names fail here, before the run starts
        template = request.system_prompt if request.system_prompt is not None else self.settings.system_prompt
        if template is not None:
            prompts.check_template(template, "system_prompt" if request.system_prompt is not None
                                   else "RLM_MCP_SYSTEM_PROMPT_FILE")
        if earlier is not None:
            self._check_continuation(earlier, request, limits, resume)
        return _Plan(model, sub_model, limits, sandbox, template, earlier, resume)

    def _earlier_meta(self, run_id: str) -> dict[str, Any]:
        """The metadata line of the run to continue (one line of its trajectory), or ConfigError."""
        check_run_id(run_id)
        path = self.trajectory_path(run_id)
        try:
            meta = read_metadata(path)
        except FileNotFoundError:
            raise ConfigError(f"continue_from: no run {run_id} in this server's data directory: use a run_id "
                              "that rlm_complete returned") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"continue_from: cannot read the trajectory of run {run_id}: {exc}") from None
        if not meta:
            raise ConfigError(f"continue_from: the trajectory of run {run_id} has no metadata line: it cannot be "
                              "continued; start a new run")
        if meta.get("status") == "running":
            raise ConfigError(f"continue_from: run {run_id} is still running: wait for it with "
                              f"rlm_get_result(run_id={run_id!r}), then continue from it")
        if int(meta.get("depth") or 1) != 1:
            raise ConfigError(f"continue_from: {run_id} is a child RLM; continue from its root run "
                              f"{run_id.split('.')[0]}")
        return meta

    def _check_continuation(self, meta: dict[str, Any], request: RunRequest, limits: Limits, resume: bool) -> None:
        run_id = meta.get("run_id")
        if not resume:
            return
        status, limit = meta.get("status"), meta.get("limit")
        if status != "limit_reached" or limit not in RESUMABLE_LIMITS:
            raise ConfigError(f"continue_from: run {run_id} ended {status!r}, not by a limit, so there is nothing "
                              "to resume: give a query to ask a follow-up question in its session")
        if request.context is not None:
            raise ConfigError("continue_from without a query resumes the earlier run over its own context: "
                              "leave out handle/context, or give a query for a follow-up over a new context")
        usage = meta.get("usage") or {}
        tokens = sum(int(u.get("input_tokens") or 0) + int(u.get("output_tokens") or 0) for u in usage.values())
        costs = [u.get("cost_usd") for u in usage.values() if u.get("cost_usd") is not None]
        used = {"max_iterations": int(meta.get("iterations") or 0), "timeout_s": float(meta.get("elapsed_s") or 0),
                "max_tokens": tokens, "max_cost_usd": sum(costs) if costs else None,
                "max_subcalls": int(meta.get("subcalls") or 0)}
        names = {"max_iterations": "iterations", "timeout_s": "seconds", "max_tokens": "tokens",
                 "max_cost_usd": "USD", "max_subcalls": "sub-calls"}
        for name, spent in used.items():
            allowed = getattr(limits, name)
            if allowed is None or spent is None or allowed > spent:
                continue
            raise ConfigError(f"continue_from: run {run_id} has used {spent:g} {names[name]} and the limits "
                              f"hold for both parts together: raise {name} above {spent:g} to continue it")

    async def run(self, request: RunRequest, *, run_id: str | None = None,
                  on_event: Callable[[RunEvent], None] | None = None) -> RunResult:
        """Run to the end. Invalid requests raise; everything after start ends in a RunResult."""
        # The model check needs litellm unless both models take the direct path: wait for its
        # warm-up off the loop (the cheap checks in prepare() ran when the caller started the run).
        model_name = request.model or self.settings.model or ""
        await self.models.ready(model_name, request.sub_model or self.settings.sub_model or model_name)
        plan = self._plan(request)
        model, sub_model, limits = plan.model, plan.sub_model, plan.limits
        run_id = run_id or unique_run_id()
        start = await self._start(plan, request)
        query, context, shape = self._subject(request, start)
        budget = Budget(limits)
        if start.resume and start.earlier is not None:
            meta = start.earlier.meta
            budget.resume({name: ModelUsage.model_validate(value) for name, value in (meta.get("usage") or {}).items()},
                          int(meta.get("subcalls") or 0), float(meta.get("elapsed_s") or 0.0))
        with tempfile.TemporaryDirectory(prefix=owned_temp_prefix("rlm-run")) as workdir:
            tree = Tree(run_id, budget, plan.sandbox, Path(workdir), on_event)
            if start.earlier is not None:
                tree.root_iterations = start.earlier.iterations if start.resume else 0
                if start.kept is None:
                    tree.notes.append(f"the sandbox of run {start.earlier.run_id} is gone (closed after "
                                      f"{self.settings.session_ttl_s:g} s idle, for room, by a restart, or taken "
                                      "by another follow-up): this run continues with the history only, in a "
                                      "fresh REPL")
            rlm = Rlm(self, tree, depth=1, model=model, sub_model=sub_model, run_id=run_id, template=plan.template)
            status: RunStatus = "completed"
            answer = limit = error = None
            try:
                answer, limit = await self._with_deadline(rlm.run(query, context, shape, start), budget)
                status = "limit_reached" if limit else "completed"
            except LimitExceeded as exc:
                status, limit, error, answer = "limit_reached", exc.limit, str(exc), tree.partial
            except RlmError as exc:
                status, error, answer = "failed", str(exc), tree.partial
            except asyncio.CancelledError:
                status, error, answer = "cancelled", "the run was cancelled", tree.partial
                rlm.finish(status, answer, limit, error)
                await rlm.release(keep=False)
                raise
            except OSError as exc:  # the run's own files: a full or read-only disk, most likely
                log.warning("run %s: writing its files failed: %s", run_id, exc.strerror)
                status, answer = "failed", tree.partial
                error = describe_os_error(exc, "writing the run's trajectory", self.trajectory_dir)
            except Exception as exc:
                log.exception("run %s failed", run_id)
                status, error, answer = "failed", f"internal error: {exc!r}", tree.partial
            rlm.finish(status, answer, limit, error)
            # A sandbox interrupted mid-cell (time limit) is not worth keeping; others are.
            await rlm.release(keep=limit != "timeout_s")
        result = self._result(tree, status, answer, limit, error)
        result.continued_from = request.continue_from
        tree.emit("done", 1, tree.root_iterations, force=True)
        return result

    async def _start(self, plan: _Plan, request: RunRequest) -> Start:
        """The earlier run (read in a thread: its trajectory can be megabytes) and its sandbox."""
        if plan.earlier_meta is None or request.continue_from is None:
            return Start()
        run_id = request.continue_from
        try:
            earlier = await asyncio.to_thread(load_earlier, self.trajectory_path(run_id), run_id)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"continue_from: cannot read the trajectory of run {run_id}: {exc}") from None
        kept = self.keeper.take(run_id)
        context_path = request.context.path if request.context is not None else self._earlier_context(earlier)[0].path
        if kept is not None and (kept.backend != (plan.sandbox or self.settings.sandbox)
                                 or kept.context_path != context_path):
            self.keeper.discard(kept)  # another backend or context: this REPL cannot serve the run
            kept = None
        return Start(earlier, plan.resume, kept)

    def _earlier_context(self, earlier: Earlier) -> tuple[ContextFile, ContextShape]:
        info = earlier.meta.get("context") or {}
        path = Path(info["path"]) if info.get("path") else None
        if path is None or not path.is_file():
            raise ConfigError(f"continue_from: the context of run {earlier.run_id} is no longer stored "
                              f"({info.get('name') or 'unnamed'}): give it again with handle= or context=")
        shape = ContextShape(kind=info.get("kind") or "text", characters=int(info.get("characters") or 0),
                             documents=int(info.get("documents") or 0),
                             document_lengths=tuple(info.get("document_lengths") or ()), name=info.get("name"))
        return ContextFile(path, info.get("file_kind") or "text"), shape

    def _subject(self, request: RunRequest, start: Start) -> tuple[str, ContextFile, ContextShape]:
        """(query, context, shape) of the run: the request's, or the earlier run's where left out."""
        query = request.query
        if start.earlier is not None and start.resume:
            query = str(start.earlier.meta.get("query") or "")
        if request.context is not None and request.shape is not None:
            return query, request.context, request.shape
        assert start.earlier is not None  # _plan refused a request without either
        context, shape = self._earlier_context(start.earlier)
        return query, context, shape

    async def _with_deadline(self, work: Any, budget: Budget) -> tuple[str | None, str | None]:
        remaining = budget.remaining_s()
        if remaining is None:
            return await work
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                return await work
        except TimeoutError:
            raise LimitExceeded("timeout_s", f"the run reached its time limit of {budget.limits.timeout_s:g} s") from None

    def _result(self, tree: Tree, status: RunStatus, answer: str | None, limit: str | None,
                error: str | None) -> RunResult:
        budget = tree.budget
        return RunResult(
            run_id=tree.run_id, status=status, answer=answer, limit=limit, error=error,
            iterations=tree.root_iterations, subcalls=budget.subcalls_done,
            max_subcalls_in_flight=budget.max_in_flight,
            usage={k: v.model_copy() for k, v in budget.usage.items()},
            input_tokens=budget.input_tokens, output_tokens=budget.output_tokens,
            cost_usd=budget.cost_usd, elapsed_s=round(budget.elapsed_s, 3),
            trajectory_path=str(self.trajectory_path(tree.run_id)), notes=list(tree.notes),
            partial=status != "completed" and answer is not None, compactions=tree.compactions)
