"""The Recursive Language Model runner. Knows nothing of MCP.

A run: the root model gets the query and the context's shape (never the context), writes code
that runs in a sandboxed REPL holding ``context``, and the loop feeds outputs back until the
model submits an answer or a limit ends the run. ``llm_query`` calls from the REPL are served
here (keys stay on the host); ``rlm_query`` starts a child RLM with its own sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from rlm_mcp.config import Limits, Settings
from rlm_mcp.engine import prompts, replies
from rlm_mcp.engine.budget import Budget, ModelUsage
from rlm_mcp.engine.models import Completion, ModelClient, Models
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.engine.sessions import Dispatch, Earlier, KeptSandbox, SandboxKeeper, load_earlier
from rlm_mcp.engine.trajectory import TrajectoryWriter, check_run_id, excerpt, read_metadata, unique_run_id
from rlm_mcp.errors import ConfigError, LimitExceeded, ModelError, RlmError, describe_os_error
from rlm_mcp.sandbox import CellResult, ContextFile, Sandbox, SandboxRegistry, SandboxSpec
from rlm_mcp.sandbox.leftovers import owned_temp_prefix

log = logging.getLogger(__name__)

RunStatus = Literal["completed", "limit_reached", "failed", "cancelled"]
CHILD_QUERY_CHARS = 2_000
EVENT_INTERVAL_S = 0.25  # sub-call progress events are throttled to this rate
EMPTY_REPLIES_MAX = 3    # empty root-model replies in a row that end a run
LAST_CHANCE_MIN_S = 2.0  # time a run needs left for its one last "answer now" call
RESUMABLE_LIMITS = ("max_iterations", "timeout_s", "max_tokens", "max_cost_usd", "max_subcalls", "max_errors")


@dataclass
class RunRequest:
    """One question over one context. ``None`` fields fall back to the settings."""

    query: str
    context: ContextFile | None = None  # None: the context of the run in ``continue_from``
    shape: ContextShape | None = None
    model: str | None = None
    sub_model: str | None = None
    sandbox: str | None = None
    limits: Limits | None = None
    # A finished run to build on: with a query, a follow-up in its sandbox (if still kept) that
    # is told the earlier turns; with an empty query, the same loop resumed after its limit.
    continue_from: str | None = None
    system_prompt: str | None = None  # a template (prompts.PLACEHOLDERS); None: the settings'


@dataclass(frozen=True)
class RunEvent:
    """Progress, for the CLI's stderr line and the server's progress notifications.

    ``iteration_done`` comes after an iteration of any RLM of the tree was written to its
    trajectory; ``detail`` is then that trajectory line (reply, code blocks with their output and
    sub-calls, final answer) plus ``rlm_id``, the RLM's own run id (``run_id`` is the root's)."""

    run_id: str
    kind: Literal["iteration", "subcalls", "done", "iteration_done"]
    depth: int
    iteration: int
    max_iterations: int
    subcalls_done: int
    subcalls_started: int
    tokens: int
    cost_usd: float | None
    detail: Mapping[str, Any] | None = None

    @property
    def message(self) -> str:
        cost = f", ${self.cost_usd:.4f}" if self.cost_usd is not None else ""
        where = f"iteration {self.iteration}/{self.max_iterations}"
        if self.depth > 1:
            where += f" (child depth {self.depth})"
        return f"{where}, {self.subcalls_done}/{self.subcalls_started} sub-calls, {self.tokens:,} tokens{cost}"


class RunResult(BaseModel):
    """The outcome of a run."""

    run_id: str
    status: RunStatus
    answer: str | None = None
    limit: str | None = None
    error: str | None = None
    iterations: int = 0
    subcalls: int = 0
    max_subcalls_in_flight: int = 0
    usage: dict[str, ModelUsage] = {}
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    elapsed_s: float = 0.0
    trajectory_path: str | None = None
    notes: list[str] = []  # what the sandbox could not enforce on this host, or ran into (limits)
    partial: bool = False  # the answer is a draft or last words of a run cut short, not a submitted one
    continued_from: str | None = None
    compactions: int = 0  # times the root conversation was summarised to fit the model's window


@dataclass
class _Tree:
    """State shared by a run and all its child RLMs."""

    run_id: str
    budget: Budget
    limits: Limits
    sandbox: str | None
    workdir: Path
    on_event: Callable[[RunEvent], None] | None
    root_iterations: int = 0
    child_slots: dict[int, asyncio.Semaphore] = field(default_factory=dict)
    draft: str | None = None  # answer["content"] set but not marked ready
    last_reply: str | None = None  # the root model's last reply
    final_attempt: str | None = None  # the reply to the last "answer now" call after a limit
    compactions: int = 0
    child_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    last_event: float = 0.0
    notes: list[str] = field(default_factory=list)  # from every sandbox of the tree, each once

    @property
    def partial(self) -> str | None:
        """The best partial answer so far, for runs that end early: the last "answer now" reply,
        else the draft answer, else the last reply's substantive text (never a connective
        between two code blocks)."""
        return self.final_attempt or self.draft or (replies.substantive(self.last_reply) if self.last_reply else None)


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


@dataclass
class _Start:
    """How the root RLM of a run starts: fresh, as a follow-up, or resuming an earlier loop."""

    earlier: Earlier | None = None
    resume: bool = False
    kept: KeptSandbox | None = None


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
            tree = _Tree(run_id, budget, limits, plan.sandbox, Path(workdir), on_event)
            if start.earlier is not None:
                tree.root_iterations = start.earlier.iterations if start.resume else 0
                if start.kept is None:
                    tree.notes.append(f"the sandbox of run {start.earlier.run_id} is gone (closed after "
                                      f"{self.settings.session_ttl_s:g} s idle, for room, by a restart, or taken "
                                      "by another follow-up): this run continues with the history only, in a "
                                      "fresh REPL")
            rlm = _Rlm(self, tree, depth=1, model=model, sub_model=sub_model, run_id=run_id, template=plan.template)
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
        self._emit(tree, "done", 1, tree.root_iterations, force=True)
        return result

    async def _start(self, plan: _Plan, request: RunRequest) -> _Start:
        """The earlier run (read in a thread: its trajectory can be megabytes) and its sandbox."""
        if plan.earlier_meta is None or request.continue_from is None:
            return _Start()
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
        return _Start(earlier, plan.resume, kept)

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

    def _subject(self, request: RunRequest, start: _Start) -> tuple[str, ContextFile, ContextShape]:
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

    def _result(self, tree: _Tree, status: RunStatus, answer: str | None, limit: str | None,
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

    def _emit(self, tree: _Tree, kind: Literal["iteration", "subcalls", "done", "iteration_done"], depth: int,
              iteration: int, force: bool = False, detail: Mapping[str, Any] | None = None) -> None:
        if tree.on_event is None:
            return
        now = time.monotonic()
        if not force and kind == "subcalls" and now - tree.last_event < EVENT_INTERVAL_S:
            return
        tree.last_event = now
        budget = tree.budget
        event = RunEvent(tree.run_id, kind, depth, iteration, tree.limits.max_iterations,
                         budget.subcalls_done, budget.subcalls_started,
                         budget.input_tokens + budget.output_tokens, budget.cost_usd, detail)
        try:
            tree.on_event(event)
        except Exception:  # a broken progress consumer must not end the run
            log.exception("progress callback failed")


class _Rlm:
    """One RLM in the tree (the root, or a child started by ``rlm_query``)."""

    def __init__(self, engine: RlmEngine, tree: _Tree, *, depth: int, model: str, sub_model: str,
                 run_id: str, template: str | None = None) -> None:
        self.engine = engine
        self.tree = tree
        self.depth = depth
        self.model = model
        self.sub_model = sub_model
        self.run_id = run_id
        self.template = template  # a custom system prompt (children use it too)
        self.iteration = 0
        self.messages: list[dict[str, str]] = []
        self.logged = 0  # messages[:logged] are in the trajectory already
        self.first_message = ""
        self.held: KeptSandbox | None = None  # the root's sandbox, kept after the run or closed
        self.failed_cells = 0  # in a row
        self.last_error = ""
        self.empty_replies = 0  # in a row
        self.chars_per_token = 4.0  # measured on each root call, for the compaction estimate
        self.compacted = 0
        self.part = 1  # a run resumed after a limit is part 2 (its trajectory holds part 1 too)
        self.cell_calls: list[dict[str, Any]] = []
        self.trajectory: TrajectoryWriter | None = None

    # ----- the loop ----------------------------------------------------------------------------

    async def run(self, query: str, context: ContextFile, shape: ContextShape,
                  start: _Start | None = None) -> tuple[str | None, str | None]:
        """(answer, limit name or None). Raises LimitExceeded / RlmError to end the run."""
        start = start or _Start()
        earlier = start.earlier
        self.trajectory = TrajectoryWriter(self.engine.trajectory_path(self.run_id),
                                           self._metadata(query, shape, context, earlier))
        first_iteration = 1
        if earlier is not None and start.resume:
            for record in earlier.records:  # the first part, so that this file tells the whole run
                self.trajectory.iteration({**record, "part": record.get("part", 1)})
            self.messages = list(earlier.messages)
            pending = len(earlier.meta.get("pending_messages") or [])
            self.logged = len(self.messages) - pending
            first_iteration = earlier.iterations + 1
            self.part = max((int(r.get("part") or 1) for r in earlier.records), default=1) + 1
            self.first_message = next((m["content"] for m in self.messages if m.get("role") == "user"), "")
            self.messages.append({"role": "user", "content": prompts.RESUME.format(
                limit=earlier.meta.get("limit"), iteration=first_iteration,
                max_iterations=self.tree.limits.max_iterations, query=query,
                repl="still holds your variables" if start.kept else
                     "was closed since: your variables are gone, recompute what you need")})
        else:
            history = prompts.history_account(earlier.turns, start.kept is not None) if earlier else None
            self.first_message = prompts.first_user_message(query, shape, history)
            self.messages = [{"role": "system", "content": prompts.system_prompt(shape, template=self.template)},
                             {"role": "user", "content": self.first_message}]
        if self.depth > 1:
            async with self.engine.sandboxes.open(self.tree.sandbox, self._spec(context, self.serve_call),
                                                  depth=self.depth, max_depth=self.tree.limits.max_depth) as sandbox:
                return await self._loop(sandbox, query, first_iteration)
        sandbox = await self._root_sandbox(context, start.kept)
        try:
            return await self._loop(sandbox, query, first_iteration)
        except LimitExceeded as exc:
            await self._last_chance(exc, query)
            raise

    def _spec(self, context: ContextFile, handler: Any) -> SandboxSpec:
        limits = self.tree.limits
        return SandboxSpec(context=context, handler=handler, max_output_chars=limits.max_output_chars,
                           labels={"rlm-mcp.run": self.tree.run_id}, cpu_limit_s=limits.timeout_s)

    async def _root_sandbox(self, context: ContextFile, kept: KeptSandbox | None) -> Sandbox:
        """The kept sandbox of the run this one continues, or a new one; ``self.held`` either way."""
        if kept is not None:
            kept.dispatch.target = self.serve_call
            kept.run_id = self.run_id
            self.held = kept
            return kept.sandbox
        dispatch = Dispatch(self.serve_call)
        closer = contextlib.AsyncExitStack()
        try:
            sandbox = await closer.enter_async_context(self.engine.sandboxes.open(
                self.tree.sandbox, self._spec(context, dispatch), depth=1, max_depth=self.tree.limits.max_depth))
        except BaseException:
            await closer.aclose()
            raise
        self.held = KeptSandbox(self.run_id, sandbox, dispatch, closer,
                                self.tree.sandbox or self.engine.settings.sandbox, context.path)
        return sandbox

    async def release(self, keep: bool) -> None:
        """Hand the root's sandbox to the keeper for follow-ups, or close it."""
        held, self.held = self.held, None
        if held is None:
            return
        if keep and self.engine.keeper.keep(held):
            return
        try:
            await held.closer.aclose()
        except Exception as exc:
            log.warning("run %s: closing its sandbox failed: %r", self.run_id, exc)

    async def _loop(self, sandbox: Any, query: str, first_iteration: int) -> tuple[str | None, str | None]:
        limits = self.tree.limits
        for self.iteration in range(first_iteration, limits.max_iterations + 1):
            if self.depth == 1:
                self.tree.root_iterations = self.iteration
            self.engine._emit(self.tree, "iteration", self.depth, self.iteration, force=True)
            started = time.monotonic()
            compaction = await self._compact_if_needed()
            reply = await self._root_call()
            self.messages.append({"role": "assistant", "content": reply.text})
            final, cells, feedback = await self._act(sandbox, reply.text)
            self._log_iteration(self.messages[self.logged:-1], reply, cells, final, time.monotonic() - started,
                                compaction)
            self.logged = len(self.messages)
            if final is not None:
                return final, None
            if self.tree.budget.tripped is not None:
                raise self.tree.budget.tripped
            self._check_guards(reply)
            self.messages.append({"role": "user", "content": feedback})
        # Out of iterations: one last call asking for the answer in plain text.
        self.messages.append({"role": "user", "content": prompts.ANSWER_NOW.format(query=query)})
        reply = await self._root_call()
        self.messages.append({"role": "assistant", "content": reply.text})
        self._log_iteration(self.messages[self.logged:-1], reply, [], None, 0.0)
        self.logged = len(self.messages)
        return replies.strip_final_wrapper(reply.text), "max_iterations"

    async def _root_call(self) -> Completion:
        chars = sum(len(m.get("content") or "") for m in self.messages)
        reply = await self.call_model("root", self.model, self.messages)
        if reply.input_tokens > 0 and chars > 0:
            self.chars_per_token = min(10.0, max(1.0, chars / reply.input_tokens))
        return reply

    def _check_guards(self, reply: Completion) -> None:
        """End runs that only burn iterations: empty replies or failing cells, in a row."""
        self.empty_replies = self.empty_replies + 1 if not reply.text.strip() else 0
        if self.empty_replies >= EMPTY_REPLIES_MAX:
            raise ModelError(f"{self.model} returned {self.empty_replies} empty replies in a row; the run was "
                             "stopped instead of using up its iterations: check the model (it may not follow "
                             "this prompt, or its provider filtered the output), or use another one")
        max_errors = self.tree.limits.max_errors
        if max_errors is not None and self.failed_cells >= max_errors:
            raise LimitExceeded("max_errors", f"{self.failed_cells} code blocks in a row failed (max_errors is "
                                              f"{max_errors}); the last error: {self.last_error}")

    async def _last_chance(self, exc: LimitExceeded, query: str) -> None:
        """After a limit other than iterations, one last "answer now" call if budget remains."""
        budget = self.tree.budget
        remaining = budget.remaining_s()
        if budget._exceeded("root") is not None or (remaining is not None and remaining < LAST_CHANCE_MIN_S):
            return
        self.messages.append({"role": "user", "content": prompts.LIMIT_ANSWER_NOW.format(reason=str(exc),
                                                                                        query=query)})
        try:
            reply = await self._root_call()
        except RlmError as error:  # the partial answer falls back to the draft or the last reply
            log.info("run %s: the last answer-now call failed: %s", self.run_id, error)
            return
        self.messages.append({"role": "assistant", "content": reply.text})
        self._log_iteration(self.messages[self.logged:-1], reply, [], None, 0.0)
        self.logged = len(self.messages)
        if reply.text.strip():
            self.tree.final_attempt = replies.strip_final_wrapper(reply.text)

    async def _compact_if_needed(self) -> dict[str, Any] | None:
        """Summarise the older turns with one model call when the conversation nears the root
        model's window; the REPL is untouched. Returns the trajectory's record of it, or None."""
        threshold = self.engine.settings.compaction_threshold
        window = self.engine.context_window(self.model) if threshold else None
        if not window or len(self.messages) < 5:
            return None
        chars = sum(len(m.get("content") or "") for m in self.messages)
        estimate = int(chars / self.chars_per_token)
        if estimate < threshold * window:
            return None
        # Keep the system prompt, the first message (query and context shape) and the last
        # reply with its feedback; a summary replaces the rest (with any earlier summary).
        older = self.messages[1:-2] if self.compacted else self.messages[2:-2]
        request = prompts.compaction_request(older, int(window * self.chars_per_token * 0.5))
        try:
            reply = await self.call_model("root", self.model, request)
            summary, usage = reply.text.strip(), {"model": reply.model, "input_tokens": reply.input_tokens,
                                                   "output_tokens": reply.output_tokens, "cost_usd": reply.cost_usd}
        except LimitExceeded:
            raise
        except ModelError as exc:  # better a run without the old turns than one that fails on them
            summary, usage = f"(no summary: the summary call failed: {exc})", None
        dropped = len(older)
        self.compacted += 1
        self.messages = [self.messages[0],
                         {"role": "user", "content": prompts.compacted_first_message(self.first_message, summary,
                                                                                    dropped)},
                         *self.messages[-2:]]
        self.logged = len(self.messages)
        if self.depth == 1:
            self.tree.compactions += 1
        return {"summary": summary, "dropped_messages": dropped, "estimated_tokens": estimate, "window": window,
                "threshold": threshold, "usage": usage, "messages": self.messages}

    async def _act(self, sandbox: Any, reply: str) -> tuple[str | None, list[dict[str, Any]], str]:
        """Run the reply's code blocks; (final answer or None, logged cells, next user message)."""
        blocks = replies.code_blocks(reply)
        directive = replies.final_directive(reply)
        if self.depth == 1:
            self.tree.last_reply = reply
        cells: list[dict[str, Any]] = []
        rendered: list[tuple[str, str]] = []
        for code in blocks:
            result = await self._execute(sandbox, code)
            cells.append(self._cell_record(code, result))
            rendered.append((code, result.render()))
            if result.error or result.timed_out:
                self.failed_cells += 1
                self.last_error = excerpt((result.error or "timed out").strip(), 300)
            else:
                self.failed_cells = 0
            if self.depth == 1 and (result.draft or result.final):
                self.tree.draft = result.draft or result.final
            if self.tree.budget.tripped is not None:
                return None, cells, ""  # an answer built on refused sub-calls is only partial
            if result.final is not None:
                return result.final, cells, ""
        if directive is not None and directive.text is not None:
            return directive.text, cells, ""
        if directive is not None and directive.variable is not None:
            code = f"FINAL_VAR({directive.variable!r})"
            result = await self._execute(sandbox, code)
            cells.append(self._cell_record(code, result))
            if result.final is not None:
                return result.final, cells, ""
            rendered.append((code, result.render()))
        if not blocks and directive is None:
            return None, cells, prompts.NUDGE
        return None, cells, prompts.cell_outputs_message(rendered, self.iteration, self.tree.limits.max_iterations)

    async def _execute(self, sandbox: Any, code: str) -> CellResult:
        self.cell_calls = []
        timeout = self.tree.limits.cell_timeout_s
        remaining = self.tree.budget.remaining_s()
        if remaining is not None:
            timeout = max(0.1, min(timeout, remaining))
        result = await sandbox.execute(code, timeout=timeout)
        self.tree.notes.extend(note for note in sandbox.notes if note not in self.tree.notes)
        return result

    # ----- model calls -------------------------------------------------------------------------

    async def call_model(self, kind: Literal["root", "sub"], model: str,
                         messages: list[dict[str, str]]) -> Completion:
        budget = self.tree.budget
        if kind == "root":
            budget.check(kind)
            completion = await self.engine.models.complete(model, messages)
            budget.record(completion)
            return completion
        async with budget.subcall() as done:
            completion = await self.engine.models.complete(model, messages)
            done(completion)
        self.engine._emit(self.tree, "subcalls", self.depth, self.iteration, force=budget.in_flight == 0)
        return completion

    async def serve_call(self, op: str, prompt: str, model: str | None) -> str:
        """The sandbox's ``llm_query`` / ``rlm_query`` handler."""
        started = time.monotonic()
        if model is not None and model not in self.allowed_models():
            # The model name comes from code the root model wrote, possibly steered by the input.
            raise RlmError(f"model {model!r} is not allowed for sub-calls: omit model= to use "
                           f"{self.sub_model!r}, or use one of {sorted(self.allowed_models())}")
        if op == "rlm_query" and self.depth < self.tree.limits.max_depth:
            text, usage = await self._child(prompt, model)
            used_model = model or self.model
            tokens_in = tokens_out = 0  # a child RLM's tokens are in its own trajectory (usage_summary.tokens)
        elif op in ("llm_query", "rlm_query"):
            used_model = model or self.sub_model
            completion = await self.call_model("sub", used_model, [{"role": "user", "content": prompt}])
            text = completion.text
            usage = {"input_tokens": completion.input_tokens, "output_tokens": completion.output_tokens,
                     "cost_usd": completion.cost_usd}
            tokens_in, tokens_out = completion.input_tokens, completion.output_tokens
        else:
            raise RlmError(f"unknown sub-call {op!r}")
        # prompt_tokens / completion_tokens / execution_time: the reference visualizer's names;
        # start_s (seconds since the root run started) lets the viewer draw sub-calls in flight.
        self.cell_calls.append({"root_model": used_model, "prompt": excerpt(prompt, 500),
                                "response": excerpt(text, 500), "usage_summary": usage,
                                "prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                                "start_s": round(started - self.tree.budget.started, 4),
                                "execution_time": round(time.monotonic() - started, 4)})
        return text

    def allowed_models(self) -> set[str]:
        """Models REPL code may name: the run's two and those in RLM_MCP_ALLOWED_MODELS."""
        return {self.model, self.sub_model, *self.engine.settings.allowed_models}

    async def _child(self, prompt: str, model: str | None) -> tuple[str, dict[str, Any]]:
        # One limit per depth level (a shared one could deadlock parents waiting on children).
        slots = self.tree.child_slots.setdefault(self.depth + 1, asyncio.Semaphore(self.tree.limits.max_concurrency))
        async with slots:
            return await self._run_child(prompt, model)

    async def _run_child(self, prompt: str, model: str | None) -> tuple[str, dict[str, Any]]:
        tree = self.tree
        child_id = f"{self.run_id}.{next(tree.child_ids)}"
        path = tree.workdir / f"{child_id}.txt"
        path.write_text(prompt, encoding="utf-8")
        query = prompt if len(prompt) <= CHILD_QUERY_CHARS else (
            prompt[:CHILD_QUERY_CHARS] + "\n[... the full prompt continues in `context`]")
        child = _Rlm(self.engine, tree, depth=self.depth + 1, model=model or self.model,
                     sub_model=self.sub_model, run_id=child_id)
        status, answer, limit, error = "cancelled", None, None, None
        before = tree.budget.input_tokens + tree.budget.output_tokens
        try:
            answer, limit = await child.run(query, ContextFile(path, "text"),
                                            ContextShape("text", len(prompt)))
            status = "limit_reached" if limit else "completed"
        except RlmError as exc:
            status, error = ("limit_reached" if isinstance(exc, LimitExceeded) else "failed"), str(exc)
            limit = exc.limit if isinstance(exc, LimitExceeded) else None
            raise RlmError(f"child RLM {child_id} failed: {exc}") from exc
        except Exception as exc:
            status, error = "failed", f"internal error: {exc!r}"
            raise
        finally:
            child.finish(status, answer, limit, error)
            with contextlib.suppress(OSError):
                path.unlink()
        used = tree.budget.input_tokens + tree.budget.output_tokens - before
        return answer or "", {"tokens": used, "child_run_id": child_id}

    # ----- trajectory --------------------------------------------------------------------------

    def _metadata(self, query: str, shape: ContextShape, context: ContextFile | None = None,
                  earlier: Earlier | None = None) -> dict[str, Any]:
        limits = self.tree.limits
        settings = self.engine.settings
        return {
            "root_model": self.model, "max_depth": limits.max_depth,
            "max_iterations": limits.max_iterations, "backend": "litellm",
            "backend_kwargs": {"model_name": self.model, "api_base": settings.api_base},
            "environment_type": self.tree.sandbox or settings.sandbox, "environment_kwargs": {},
            "other_backends": [self.sub_model] if self.sub_model != self.model else [],
            "run_id": self.run_id, "root_run_id": self.tree.run_id, "depth": self.depth,
            "query": excerpt(query, 4_000),
            "context": {"kind": shape.kind, "characters": shape.characters,
                        "documents": shape.documents, "name": shape.name,
                        # where it is stored, so that continue_from can use it again
                        **({"path": str(context.path), "file_kind": context.kind,
                            "document_lengths": list(shape.document_lengths[:100])}
                           if self.depth == 1 and context is not None and context.path is not None else {})},
            "sub_model": self.sub_model,
            **({"continued_from": earlier.run_id, "turns": earlier.turns} if earlier is not None else {}),
            "limits": limits.__dict__,
        }

    def _cell_record(self, code: str, result: CellResult) -> dict[str, Any]:
        return {"code": code, "result": {
            "stdout": result.stdout, "stderr": (result.stderr + ("\n" + result.error if result.error else "")).strip(),
            "locals": result.locals, "execution_time": round(result.elapsed, 4),
            "final_answer": result.final, "rlm_calls": self.cell_calls,
            "state_lost": result.state_lost, "timed_out": result.timed_out,
            "stdout_dropped": result.stdout_dropped, "stderr_dropped": result.stderr_dropped,
            "notices": list(result.notices)}}

    def _log_iteration(self, new_messages: list[dict[str, str]], reply: Completion,
                       cells: list[dict[str, Any]], final: str | None, elapsed: float,
                       compaction: dict[str, Any] | None = None) -> None:
        assert self.trajectory is not None
        record: dict[str, Any] = {
            "iteration": self.iteration, "prompt": new_messages, "response": reply.text,
            "code_blocks": cells, "final_answer": final, "iteration_time": round(elapsed, 4),
            "usage": {"model": reply.model, "input_tokens": reply.input_tokens,
                      "output_tokens": reply.output_tokens, "cost_usd": reply.cost_usd}}
        if compaction is not None:
            record["compaction"] = compaction
        if self.part > 1:
            record["part"] = self.part
        self.trajectory.iteration(record)
        if self.tree.on_event is not None:  # e.g. `rlm-mcp run --verbose`
            self.engine._emit(self.tree, "iteration_done", self.depth, self.iteration, force=True,
                              detail={**record, "rlm_id": self.run_id})

    def finish(self, status: str, answer: str | None, limit: str | None, error: str | None) -> None:
        if self.trajectory is None:
            return
        budget = self.tree.budget
        try:
            self.trajectory.finish(
                status=status, answer=answer, limit=limit, error=error, iterations=self.iteration,
                elapsed_s=round(budget.elapsed_s, 3),
                usage={k: v.model_dump() for k, v in budget.usage.items()} if self.depth == 1 else None,
                subcalls=budget.subcalls_done if self.depth == 1 else None,
                # sent after the last logged reply: a continuation rebuilds the conversation exactly
                pending_messages=self.messages[self.logged:] if self.depth == 1 else None)
        except OSError as exc:  # the result still reaches the caller; only the file lags behind
            log.warning("run %s: could not record its outcome in %s: %s", self.run_id, self.trajectory.path,
                        exc.strerror)
