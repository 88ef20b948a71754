"""A model client that answers from a script in-process: no litellm, no HTTP.

The engine takes any object with the methods of ``engine.models.Models`` (``check_model``,
``complete``, ``ready``, ``context_window``), as httpx takes any transport; this one is for tests of the loop (what
the engine does with replies), the way ``httpx.MockTransport`` is for tests of code above the network. What litellm
does (routing, retries, error mapping, pricing) is tested against the scripted HTTP server in
``model_server``, whose policies this client plays by default so both behave the same::

    models = FakeModelClient(["```repl\\nprint(len(context))\\n```", "FINAL(3)"])
    engine = RlmEngine(settings, models=models)

Root calls (requests carrying the RLM system prompt) take the scripted replies in order, then
the policy named by the model (``openai/needle`` plays ``needle``); sub-calls answer with the
secret code found in their prompt (or ``NONE``) unless ``subcalls`` is given. Token counts are
the server's (a quarter of the characters, at least 1), so token limits trip at the same points.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from rlm_mcp.engine.failures import MODEL_HINT
from rlm_mcp.engine.models import Completion
from rlm_mcp.errors import ModelError
from rlm_mcp.testing.model_server import answer_subcall, is_rlm_root_call, rlm_policy


@dataclass(frozen=True)
class ModelRequest:
    """One call the engine made: the model string as given, and the messages."""

    model: str
    messages: tuple[dict[str, str], ...]

    @property
    def root(self) -> bool:
        """A root-model turn (it carries the RLM system prompt), not a sub-call."""
        return is_rlm_root_call(list(self.messages))

    @property
    def last_user_message(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")


# A reply is text, an exception to raise from ``complete`` (e.g. ModelError or LimitExceeded),
# or a function of the request returning text (sync or async: an async one can wait on a gate).
Responder = Callable[[ModelRequest], "str | Awaitable[str]"]
Reply = str | BaseException | Responder


def tokens_of(text: str) -> int:
    """The scripted server's token count: a quarter of the characters, at least 1."""
    return max(1, len(text) // 4)


class FakeModelClient:
    """Scripted completions with usage; records every request in ``requests``."""

    def __init__(self, replies: Iterable[Reply] = (), *, subcalls: Responder | None = None,
                 cost_per_token_usd: float | None = None, context_window: int | None = None) -> None:
        self._replies: deque[Reply] = deque(replies)
        self._subcalls = subcalls
        self.cost_per_token_usd = cost_per_token_usd  # None: unpriced, as for unknown models
        self.window = context_window  # None: unknown, as litellm says for models missing from its table
        self.requests: list[ModelRequest] = []
        self.calls_by_model: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()  # scripts may be extended from another thread

    def script(self, replies: Iterable[Reply]) -> None:
        """Queue more root replies (consumed in order, before the model's policy)."""
        with self._lock:
            self._replies.extend(replies)

    def start_warm_up(self) -> None:
        """Nothing to load: the real client imports litellm here."""

    async def ready(self, *models: str) -> None:
        """Always ready (the real client waits for litellm's import)."""

    def check_model(self, model: str | None) -> str:
        """Any non-empty model string is accepted (routing is litellm's, tested elsewhere)."""
        if not model or not model.strip():
            raise ModelError("no model configured: set RLM_MCP_MODEL (or pass model=...); " + MODEL_HINT)
        return model

    def context_window(self, model: str) -> int | None:
        return self.window

    async def aclose(self) -> None:
        """Nothing to close: the real client closes its HTTP connections here."""

    def user_messages(self, model: str) -> list[str]:
        """The last user message of each request sent to ``model``, in order."""
        return [r.last_user_message for r in self.requests if r.model == model]

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
        request = ModelRequest(model, tuple(dict(m) for m in messages))
        self.requests.append(request)
        self.calls_by_model[model] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # a real call yields to the loop; so does this one
            text = await self._answer(request)
        finally:
            self.in_flight -= 1
        input_tokens = tokens_of("".join(m.get("content") or "" for m in messages))
        output_tokens = tokens_of(text)
        cost = None if self.cost_per_token_usd is None else (input_tokens + output_tokens) * self.cost_per_token_usd
        return Completion(model, text, input_tokens, output_tokens, cost, 0.0)

    async def _answer(self, request: ModelRequest) -> str:
        reply: Reply
        if request.root:
            with self._lock:
                scripted = self._replies.popleft() if self._replies else None
            if scripted is None:
                return rlm_policy(request.model.split("/")[-1], list(request.messages))
            reply = scripted
        else:
            reply = self._subcalls or (lambda r: answer_subcall(list(r.messages)))
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, str):
            return reply
        text = reply(request)
        if inspect.isawaitable(text):
            text = await text
        return text
