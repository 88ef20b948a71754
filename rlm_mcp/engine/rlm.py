"""One RLM of a run's tree (the root, or a child started by ``rlm_query``): its conversation
with the model, the REPL its code runs in, and what ends it early (the iteration limit, empty
replies or failing cells in a row, one last "answer now" call after another limit); older
turns are summarised when the conversation nears the model's window."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rlm_mcp.config import Settings
from rlm_mcp.engine import prompts, replies
from rlm_mcp.engine.budget import Tally
from rlm_mcp.engine.models import Completion, Models
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.engine.sessions import Dispatch, Earlier, KeptSandbox, SandboxKeeper
from rlm_mcp.engine.subcalls import SubCalls
from rlm_mcp.engine.trajectory import TrajectoryWriter, cell_record, excerpt, iteration_record
from rlm_mcp.engine.tree import Tree
from rlm_mcp.errors import LimitExceeded, ModelError, RlmError
from rlm_mcp.sandbox import CellResult, ContextFile, Sandbox, SandboxRegistry, SandboxSpec

log = logging.getLogger(__name__)

CHILD_QUERY_CHARS = 2_000
EMPTY_REPLIES_MAX = 3    # empty root-model replies in a row that end a run
LAST_CHANCE_MIN_S = 2.0  # time a run needs left for its one last "answer now" call


class Host(Protocol):
    """What an RLM uses of the engine that runs it (:class:`rlm_mcp.engine.loop.RlmEngine`)."""

    settings: Settings
    models: Models
    sandboxes: SandboxRegistry
    keeper: SandboxKeeper

    def trajectory_path(self, run_id: str) -> Path: ...

    def context_window(self, model: str) -> int | None: ...


@dataclass
class Start:
    """How the root RLM of a run starts: fresh, as a follow-up, or resuming an earlier loop."""

    earlier: Earlier | None = None
    resume: bool = False
    kept: KeptSandbox | None = None


class Rlm:
    """One RLM in the tree (the root, or a child started by ``rlm_query``)."""

    def __init__(self, engine: Host, tree: Tree, *, depth: int, model: str, sub_model: str,
                 run_id: str, template: str | None = None, parent: Tally | None = None) -> None:
        self.engine = engine
        self.tree = tree
        self.depth = depth
        self.model = model
        self.sub_model = sub_model
        self.run_id = run_id
        self.template = template  # a custom system prompt (children use it too)
        self.usage = Tally(parent)  # this RLM's calls and its children's, added to the parent's too
        self.calls = SubCalls(engine.models, tree, depth=depth, model=model, sub_model=sub_model,
                              extra_models=engine.settings.allowed_models, run_child=self._run_child,
                              tally=self.usage)
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
        self.trajectory: TrajectoryWriter | None = None

    @property
    def iteration(self) -> int:
        return self.calls.iteration  # one count: the sub-calls' progress events report it too

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.calls.iteration = value

    # ----- the loop ----------------------------------------------------------------------------

    async def run(self, query: str, context: ContextFile, shape: ContextShape,
                  start: Start | None = None) -> tuple[str | None, str | None]:
        """(answer, limit name or None). Raises LimitExceeded / RlmError to end the run."""
        start = start or Start()
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
            async with self.engine.sandboxes.open(self.tree.sandbox, self._spec(context, self.calls.serve),
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
            kept.dispatch.target = self.calls.serve
            kept.run_id = self.run_id
            self.held = kept
            return kept.sandbox
        dispatch = Dispatch(self.calls.serve)
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
            self.tree.emit("iteration", self.depth, self.iteration, force=True)
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
        reply = await self.calls.call_model("root", self.model, self.messages)
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
            reply = await self.calls.call_model("root", self.model, request)
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
            cells.append(cell_record(code, result, self.calls.cell_calls))
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
            cells.append(cell_record(code, result, self.calls.cell_calls))
            if result.final is not None:
                return result.final, cells, ""
            rendered.append((code, result.render()))
        if not blocks and directive is None:
            return None, cells, prompts.NUDGE
        return None, cells, prompts.cell_outputs_message(rendered, self.iteration, self.tree.limits.max_iterations)

    async def _execute(self, sandbox: Any, code: str) -> CellResult:
        self.calls.start_cell()
        timeout = self.tree.limits.cell_timeout_s
        remaining = self.tree.budget.remaining_s()
        if remaining is not None:
            timeout = max(0.1, min(timeout, remaining))
        result = await sandbox.execute(code, timeout=timeout)
        self.tree.notes.extend(note for note in sandbox.notes if note not in self.tree.notes)
        return result

    # ----- child RLMs ------------------------------------------------------------------------

    async def _run_child(self, prompt: str, model: str | None) -> tuple[str, dict[str, Any]]:
        """``rlm_query``: a child RLM whose context is the prompt; (its answer, its usage record)."""
        tree = self.tree
        child_id = f"{self.run_id}.{next(tree.child_ids)}"
        path = tree.workdir / f"{child_id}.txt"
        path.write_text(prompt, encoding="utf-8")
        query = prompt if len(prompt) <= CHILD_QUERY_CHARS else (
            prompt[:CHILD_QUERY_CHARS] + "\n[... the full prompt continues in `context`]")
        child = Rlm(self.engine, tree, depth=self.depth + 1, model=model or self.model,
                     sub_model=self.sub_model, run_id=child_id, parent=self.usage)
        status, answer, limit, error = "cancelled", None, None, None
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
        return answer or "", {"tokens": child.usage.tokens, "child_run_id": child_id}

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

    def _log_iteration(self, new_messages: list[dict[str, str]], reply: Completion,
                       cells: list[dict[str, Any]], final: str | None, elapsed: float,
                       compaction: dict[str, Any] | None = None) -> None:
        assert self.trajectory is not None
        record = iteration_record(self.iteration, new_messages, reply, cells, final, elapsed, compaction, self.part)
        self.trajectory.iteration(record)
        if self.tree.on_event is not None:  # e.g. `rlm-mcp run --verbose`
            self.tree.emit("iteration_done", self.depth, self.iteration, force=True,
                           detail={**record, "rlm_id": self.run_id})

    def finish(self, status: str, answer: str | None, limit: str | None, error: str | None) -> None:
        if self.trajectory is None:
            return
        budget = self.tree.budget
        try:
            self.trajectory.finish(
                status=status, answer=answer, limit=limit, error=error, iterations=self.iteration,
                elapsed_s=round(budget.elapsed_s, 3),
                # the root: the whole tree's, with an earlier part's (resumed); a child: its own and
                # its children's
                usage={k: v.model_dump() for k, v in (budget.usage if self.depth == 1 else self.usage.usage).items()},
                subcalls=budget.subcalls_done if self.depth == 1 else None,
                # sent after the last logged reply: a continuation rebuilds the conversation exactly
                pending_messages=self.messages[self.logged:] if self.depth == 1 else None)
        except OSError as exc:  # the result still reaches the caller; only the file lags behind
            log.warning("run %s: could not record its outcome in %s: %s", self.run_id, self.trajectory.path,
                        exc.strerror)
