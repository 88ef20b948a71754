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
from rlm_mcp.engine.trajectory import TrajectoryWriter, excerpt, unique_run_id
from rlm_mcp.errors import ConfigError, LimitExceeded, RlmError, describe_os_error
from rlm_mcp.sandbox import CellResult, ContextFile, SandboxRegistry, SandboxSpec
from rlm_mcp.sandbox.leftovers import owned_temp_prefix

log = logging.getLogger(__name__)

RunStatus = Literal["completed", "limit_reached", "failed", "cancelled"]
CHILD_QUERY_CHARS = 2_000
EVENT_INTERVAL_S = 0.25  # sub-call progress events are throttled to this rate


@dataclass
class RunRequest:
    """One question over one context. ``None`` fields fall back to the settings."""

    query: str
    context: ContextFile
    shape: ContextShape
    model: str | None = None
    sub_model: str | None = None
    sandbox: str | None = None
    limits: Limits | None = None


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
    prose: str | None = None  # the root model's last words outside code
    child_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    last_event: float = 0.0
    notes: list[str] = field(default_factory=list)  # from every sandbox of the tree, each once

    @property
    def partial(self) -> str | None:
        """The best partial answer so far, for runs that end early."""
        return self.draft or self.prose


class RlmEngine:
    """Runs RLMs. One engine serves many concurrent runs; runs share no mutable state."""

    def __init__(self, settings: Settings, models: Models | None = None,
                 sandboxes: SandboxRegistry | None = None) -> None:
        self.settings = settings
        self.models: Models = models or ModelClient(settings)
        self.sandboxes = sandboxes or SandboxRegistry(settings)
        self.trajectory_dir = settings.home / "trajectories"

    def trajectory_path(self, run_id: str) -> Path:
        return self.trajectory_dir / f"{run_id}.jsonl"

    def prepare(self, request: RunRequest) -> tuple[str, str, Limits]:
        """Validate a request before anything starts: (model, sub_model, limits) or raise."""
        if not request.query or not request.query.strip():
            raise ConfigError("the query is empty: say what you want to know about the context")
        limits = (request.limits or self.settings.limits).validated()
        model = self.models.check_model(request.model or self.settings.model)
        sub_model = self.models.check_model(request.sub_model or self.settings.sub_model or model)
        self.sandboxes.get(request.sandbox)  # unknown names fail here, before the run starts
        return model, sub_model, limits

    async def run(self, request: RunRequest, *, run_id: str | None = None,
                  on_event: Callable[[RunEvent], None] | None = None) -> RunResult:
        """Run to the end. Invalid requests raise; everything after start ends in a RunResult."""
        # The model check needs litellm: wait for the warm-up off the loop (the cheap checks in
        # prepare() ran already when the caller started the run).
        await self.models.ready()
        model, sub_model, limits = self.prepare(request)
        run_id = run_id or unique_run_id()
        budget = Budget(limits)
        with tempfile.TemporaryDirectory(prefix=owned_temp_prefix("rlm-run")) as workdir:
            tree = _Tree(run_id, budget, limits, request.sandbox, Path(workdir), on_event)
            rlm = _Rlm(self, tree, depth=1, model=model, sub_model=sub_model, run_id=run_id)
            status: RunStatus = "completed"
            answer = limit = error = None
            try:
                answer, limit = await self._with_deadline(
                    rlm.run(request.query, request.context, request.shape), limits)
                status = "limit_reached" if limit else "completed"
            except LimitExceeded as exc:
                status, limit, error, answer = "limit_reached", exc.limit, str(exc), tree.partial
            except RlmError as exc:
                status, error, answer = "failed", str(exc), tree.partial
            except asyncio.CancelledError:
                status, error, answer = "cancelled", "the run was cancelled", tree.partial
                rlm.finish(status, answer, limit, error)
                raise
            except OSError as exc:  # the run's own files: a full or read-only disk, most likely
                log.warning("run %s: writing its files failed: %s", run_id, exc.strerror)
                status, answer = "failed", tree.partial
                error = describe_os_error(exc, "writing the run's trajectory", self.trajectory_dir)
            except Exception as exc:
                log.exception("run %s failed", run_id)
                status, error, answer = "failed", f"internal error: {exc!r}", tree.partial
            rlm.finish(status, answer, limit, error)
        result = self._result(tree, status, answer, limit, error)
        self._emit(tree, "done", 1, tree.root_iterations, force=True)
        return result

    async def _with_deadline(self, work: Any, limits: Limits) -> tuple[str | None, str | None]:
        if limits.timeout_s is None:
            return await work
        try:
            async with asyncio.timeout(limits.timeout_s):
                return await work
        except TimeoutError:
            raise LimitExceeded("timeout_s", f"the run reached its time limit of {limits.timeout_s:g} s") from None

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
            trajectory_path=str(self.trajectory_path(tree.run_id)), notes=list(tree.notes))

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
                 run_id: str) -> None:
        self.engine = engine
        self.tree = tree
        self.depth = depth
        self.model = model
        self.sub_model = sub_model
        self.run_id = run_id
        self.iteration = 0
        self.cell_calls: list[dict[str, Any]] = []
        self.trajectory: TrajectoryWriter | None = None

    # ----- the loop ----------------------------------------------------------------------------

    async def run(self, query: str, context: ContextFile, shape: ContextShape) -> tuple[str | None, str | None]:
        """(answer, limit name or None). Raises LimitExceeded / RlmError to end the run."""
        limits = self.tree.limits
        self.trajectory = TrajectoryWriter(self.engine.trajectory_path(self.run_id), self._metadata(query, shape))
        spec = SandboxSpec(context=context, handler=self.serve_call, max_output_chars=limits.max_output_chars,
                           labels={"rlm-mcp.run": self.tree.run_id}, cpu_limit_s=limits.timeout_s)
        messages = [{"role": "system", "content": prompts.system_prompt(shape)},
                    {"role": "user", "content": prompts.first_user_message(query, shape)}]
        logged = 0
        async with self.engine.sandboxes.open(self.tree.sandbox, spec, depth=self.depth,
                                              max_depth=limits.max_depth) as sandbox:
            for self.iteration in range(1, limits.max_iterations + 1):
                if self.depth == 1:
                    self.tree.root_iterations = self.iteration
                self.engine._emit(self.tree, "iteration", self.depth, self.iteration, force=True)
                started = time.monotonic()
                reply = await self.call_model("root", self.model, messages)
                messages.append({"role": "assistant", "content": reply.text})
                final, cells, feedback = await self._act(sandbox, reply.text)
                self._log_iteration(messages[logged:-1], reply, cells, final, time.monotonic() - started)
                logged = len(messages)
                if final is not None:
                    return final, None
                if self.tree.budget.tripped is not None:
                    raise self.tree.budget.tripped
                messages.append({"role": "user", "content": feedback})
            # Out of iterations: one last call asking for the answer in plain text.
            messages.append({"role": "user", "content": prompts.ANSWER_NOW.format(query=query)})
            reply = await self.call_model("root", self.model, messages)
            self._log_iteration(messages[logged:], reply, [], None, 0.0)
            return replies.strip_final_wrapper(reply.text), "max_iterations"

    async def _act(self, sandbox: Any, reply: str) -> tuple[str | None, list[dict[str, Any]], str]:
        """Run the reply's code blocks; (final answer or None, logged cells, next user message)."""
        blocks = replies.code_blocks(reply)
        directive = replies.final_directive(reply)
        words = replies.prose(reply) if self.depth == 1 else ""
        if words:
            self.tree.prose = words
        cells: list[dict[str, Any]] = []
        rendered: list[tuple[str, str]] = []
        for code in blocks:
            result = await self._execute(sandbox, code)
            cells.append(self._cell_record(code, result))
            rendered.append((code, result.render()))
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

    def _metadata(self, query: str, shape: ContextShape) -> dict[str, Any]:
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
                        "documents": shape.documents, "name": shape.name},
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
                       cells: list[dict[str, Any]], final: str | None, elapsed: float) -> None:
        assert self.trajectory is not None
        record = {
            "iteration": self.iteration, "prompt": new_messages, "response": reply.text,
            "code_blocks": cells, "final_answer": final, "iteration_time": round(elapsed, 4),
            "usage": {"model": reply.model, "input_tokens": reply.input_tokens,
                      "output_tokens": reply.output_tokens, "cost_usd": reply.cost_usd}}
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
                subcalls=budget.subcalls_done if self.depth == 1 else None)
        except OSError as exc:  # the result still reaches the caller; only the file lags behind
            log.warning("run %s: could not record its outcome in %s: %s", self.run_id, self.trajectory.path,
                        exc.strerror)
