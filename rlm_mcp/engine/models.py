"""Model calls: through litellm (the only module that imports it), or, for OpenAI-compatible
endpoints, over a direct HTTP path (:mod:`rlm_mcp.engine.openai_http`) that costs ~20x less CPU.

litellm costs ~2-4 s of CPU and ~200 MB to import, so it is imported in a background thread
(:meth:`ModelClient.start_warm_up`, started by the server and the CLI as early as they can);
code on the event loop waits for it with ``await ModelClient.ready()`` and never imports it
itself. Both paths map their failures to :class:`ModelError` with the same messages (what to set
or change), retry the same failures with the same backoff, and report the same usage and cost.
Every attempt takes a slot from the provider's adaptive limiter (:mod:`rlm_mcp.engine.limiter`),
so a provider answering 429 sees fewer calls instead of the same number of retries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from rlm_mcp.config import Settings
from rlm_mcp.engine.failures import (MODEL_HINT, Failure, auth_failure, context_failure, not_found, rate_limited,
                                     timeout_failure, unavailable)
from rlm_mcp.engine.limiter import AdaptiveLimiter, ProviderLimiters, Slot, provider_key, retry_after_s
from rlm_mcp.engine.prices import Prices, bundled_model_entry, load_bundled_table
from rlm_mcp.errors import ModelError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # a hostile or broken Retry-After must not stall a call for hours
# Models litellm had no price for, which we registered with zero prices (litellm's table is
# process-wide, so this is too): their cost is reported as null, never as 0.
_REGISTERED_UNPRICED: set[str] = set()


@dataclass(frozen=True)
class Completion:
    """One model reply with what it cost."""

    model: str
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    elapsed_s: float


class Models(Protocol):
    """What the engine needs of a model client: :class:`ModelClient` (litellm), or the scripted
    ``rlm_mcp.testing.fake_models.FakeModelClient`` in tests of the loop."""

    def start_warm_up(self) -> None: ...

    async def ready(self, *models: str) -> None: ...

    def check_model(self, model: str | None) -> str: ...

    def context_window(self, model: str) -> int | None: ...

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion: ...

    async def aclose(self) -> None: ...


def _load_litellm() -> Any:
    # The cost map would otherwise be fetched from the network at import; ours is offline.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    # litellm logs every call at INFO on its own handler; keep stderr for our progress.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


def warm_up_litellm() -> Any:
    """Import litellm and make its first real call cheap; blocking, for a worker thread.

    One ``mock_response`` completion (no network) imports the ~60 modules litellm loads lazily
    on its first call (~0.1 s of CPU that would otherwise land on the event loop). Then
    ``gc.freeze()``: the ~200 MB of long-lived objects the import leaves would otherwise be
    walked by every full collection, 200-600 ms with the event loop stopped."""
    litellm = _load_litellm()
    try:
        litellm.completion(model="openai/warm-up", messages=[{"role": "user", "content": "hi"}],
                           mock_response="ok", api_key="warm-up-not-a-key")
    except Exception as exc:  # only a warm-up: the first real call pays the lazy imports instead
        log.debug("litellm warm-up call failed: %r", exc)
    gc.freeze()
    global _PROCESS_LITELLM
    _PROCESS_LITELLM = litellm
    return litellm


_PROCESS_LITELLM: Any = None  # set once the default warm-up finished: litellm is process-wide


def warm_up_direct() -> None:
    """Import the direct path's module (and aiohttp); blocking, for a worker thread. Then
    ``gc.freeze()``, as after litellm's import: long-lived module objects leave the collector's
    generations, so full collections during a run stay short. Also reads litellm's price table
    (prices and context windows of direct-path models), which the first run would otherwise
    read on the event loop (~5-10 ms)."""
    import rlm_mcp.engine.openai_http  # noqa: F401

    load_bundled_table()
    gc.freeze()


def _in_thread(work: Callable[[], Any], name: str) -> concurrent.futures.Future[Any]:
    """Run ``work`` in a daemon thread of its own; its outcome in the returned future. Not the
    default executor: a multi-second import must not hold a slot that ``asyncio.to_thread``
    callers (context checks, file work) need meanwhile."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to whoever awaits the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class ModelClient:
    """Async completions for any litellm provider, with retries, error mapping and an adaptive
    concurrency limit per provider (shared by every run that uses this client)."""

    def __init__(self, settings: Settings, limiters: ProviderLimiters | None = None,
                 loader: Callable[[], Any] = warm_up_litellm) -> None:
        self.settings = settings
        self.limiters = limiters or ProviderLimiters(settings.limits.max_concurrency)
        self._loader = loader
        self._litellm: Any = None
        self._warm: concurrent.futures.Future[Any] | None = None
        self._warm_lock = threading.Lock()
        self._direct_warm: concurrent.futures.Future[Any] | None = None
        self._prices: dict[str, Prices | None] = {}
        self._windows: dict[str, int | None] = {}  # context windows, read once per model
        self._direct: Any = None  # rlm_mcp.engine.openai_http.DirectClient, created on first use

    # ----- warm-up: litellm is imported in a thread, never on the event loop ----------------

    def start_warm_up(self) -> None:
        """Start importing litellm in a daemon thread if the configured models need it; returns
        at once. Models on the direct path never need it (a request naming another model
        imports it then, off the event loop too): the process then saves the ~200 MB and the
        seconds of GIL contention the import costs."""
        configured = [m for m in (self.settings.model, self.settings.effective_sub_model) if m]
        if configured and all(self.uses_direct_path(m) for m in configured):
            self._start_direct_import()
            return
        self._start_import()

    def _start_import(self) -> None:
        """Import litellm in a daemon thread (once)."""
        with self._warm_lock:
            if self._warm is None:
                self._warm = _in_thread(self._loader, "rlm-mcp-litellm-warm-up")

    def _start_direct_import(self) -> concurrent.futures.Future[Any]:
        """Import the direct path's HTTP client (aiohttp: ~0.1-0.2 s) in a thread (once)."""
        with self._warm_lock:
            if self._direct_warm is None:
                self._direct_warm = _in_thread(warm_up_direct, "rlm-mcp-http-warm-up")
            return self._direct_warm

    def _adopt_loaded(self) -> None:
        """Use litellm at once if another client of this process loaded it already."""
        if self._litellm is None and self._loader is warm_up_litellm and _PROCESS_LITELLM is not None:
            self._litellm = _PROCESS_LITELLM

    @property
    def is_ready(self) -> bool:
        return self._litellm is not None

    async def ready(self, *models: str) -> None:
        """Wait (off the event loop) until ``models`` can be called: until litellm is imported,
        unless every one of them takes the direct path (no models: litellm)."""
        self._adopt_loaded()
        if self._litellm is not None or (models and all(m and self.uses_direct_path(m) for m in models)):
            return
        self._start_import()
        assert self._warm is not None
        try:
            litellm = await asyncio.wrap_future(self._warm)
        except Exception as exc:
            raise ModelError(f"the model library (litellm) failed to load: {exc!r}; reinstall rlm-mcp") from exc
        self._litellm = litellm

    def wait_ready(self, timeout: float | None = None) -> None:
        """The blocking form of :meth:`ready` (litellm), for code with no event loop to keep free."""
        if self._litellm is None:
            self._start_import()
            assert self._warm is not None
            self._litellm = self._warm.result(timeout)

    @property
    def litellm(self) -> Any:
        if self._litellm is None:
            raise RuntimeError("litellm is not loaded yet: await ModelClient.ready() first")
        return self._litellm

    # ----- checks ---------------------------------------------------------------------------

    def check_model(self, model: str | None) -> str:
        """Return the model string, or raise ModelError if it cannot be used.

        Never imports: before the warm-up is done only the cheap checks run, and
        :meth:`RlmEngine.run` checks again after ``await ready()``."""
        if not model or not model.strip():
            raise ModelError("no model configured: set RLM_MCP_MODEL (or pass model=...); " + MODEL_HINT)
        self._adopt_loaded()
        if self._litellm is None or self.uses_direct_path(model):
            return model  # openai/<name> at an api_base: litellm routes any name there
        try:
            self._litellm.get_llm_provider(model=model, api_base=self.settings.api_base)
        except Exception as exc:  # litellm raises BadRequestError for unknown providers
            raise ModelError(f"unknown model {model!r}: {MODEL_HINT}") from exc
        return model

    def context_window(self, model: str) -> int | None:
        """Input tokens ``model`` accepts, from litellm's model table; None when it does not know."""
        if model not in self._windows:
            info = self._model_info(model)
            window = (info.get("max_input_tokens") or info.get("max_tokens")) if info else None
            self._windows[model] = int(window) if isinstance(window, int) and window > 0 else None
        return self._windows[model]

    def uses_direct_path(self, model: str) -> bool:
        """OpenAI-compatible endpoint (``openai/<name>`` with an api_base), unless forced to litellm."""
        return (self.settings.model_client == "auto" and bool(self.settings.api_base)
                and model.startswith("openai/") and len(model) > len("openai/"))

    def limiter(self, model: str) -> AdaptiveLimiter:
        return self.limiters.for_key(provider_key(model, self.settings.api_base))

    # ----- calls ----------------------------------------------------------------------------

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
        """One chat completion; retries 429, 5xx, timeouts and connection errors with backoff."""
        if self._litellm is None:
            await self.ready(model)
        attempts = self.settings.model_retries + 1
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            async with self._slot(model) as slot:
                try:
                    reply = await self._attempt(model, messages)
                except Failure as failure:
                    if failure.overloaded:
                        slot.overloaded(failure.retry_after_s)
                    error = failure
                else:
                    slot.succeeded()
                    input_tokens, output_tokens, cost = reply[1], reply[2], reply[3]
                    return Completion(model, reply[0], input_tokens, output_tokens, cost,
                                      time.perf_counter() - started)
            if not error.retryable or attempt == attempts:
                suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise ModelError(error.message + suffix) from error.__cause__
            delay = self._backoff(attempt, error)
            log.warning("model call failed (%s); retry %d/%d in %.1fs", error.message, attempt,
                        attempts - 1, delay)
            if delay > 0:
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _slot(self, model: str) -> AsyncIterator[Slot | _NoSlot]:
        if not self.settings.adaptive_concurrency:
            yield _NO_SLOT
            return
        async with self.limiter(model).slot() as slot:
            yield slot

    def _backoff(self, attempt: int, failure: Failure) -> float:
        """Seconds before the next attempt: the provider's Retry-After when it gave one (with the
        adaptive limit, no backoff on top: the lowered limit paces the calls), else an
        exponential backoff with jitter."""
        wait = None if failure.retry_after_s is None else min(failure.retry_after_s, MAX_RETRY_AFTER_S)
        if self.settings.adaptive_concurrency and failure.overloaded and wait is not None:
            return wait * (1.0 + 0.1 * random.random())  # jitter: the refused calls must not return together
        delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
        return delay if wait is None else max(delay, wait)

    async def _attempt(self, model: str, messages: list[dict[str, str]]) -> tuple[str, int, int, float | None]:
        """(text, input tokens, output tokens, cost) of one attempt, or raise Failure."""
        if self.uses_direct_path(model):
            if self._direct is None:
                await asyncio.wrap_future(self._start_direct_import())  # never import on the loop
                from rlm_mcp.engine.openai_http import DirectClient

                self._direct = DirectClient(self.settings)
            text, input_tokens, output_tokens = await self._direct.complete(model, messages)
            return text, input_tokens, output_tokens, self._own_cost(model, input_tokens, output_tokens)
        kwargs: dict[str, Any] = {"timeout": self.settings.model_timeout_s, "num_retries": 0}
        if self.settings.api_base:
            kwargs["api_base"] = self.settings.api_base
        if self.settings.api_key:
            kwargs["api_key"] = self.settings.api_key
        self._register_if_unpriced(model)
        try:
            response = await self.litellm.acompletion(model=model, messages=messages, **kwargs)
        except Exception as exc:
            raise self._classify(model, exc) from exc
        text, input_tokens, output_tokens = self._read_reply(model, response)
        return text, input_tokens, output_tokens, self._litellm_cost(model, response)

    async def aclose(self) -> None:
        """Close the direct path's connections (litellm keeps its own, process-wide)."""
        if self._direct is not None:
            await self._direct.aclose()

    # ----- replies and prices ---------------------------------------------------------------

    @staticmethod
    def _read_reply(model: str, response: Any) -> tuple[str, int, int]:
        try:
            text = response.choices[0].message.content
        except (AttributeError, IndexError) as exc:
            raise ModelError(f"{model} returned a reply with no message: {str(response)[:200]}") from exc
        if text is None:
            raise ModelError(f"{model} returned an empty reply (no text content)")
        usage = getattr(response, "usage", None)
        return (str(text), int(getattr(usage, "prompt_tokens", 0) or 0),
                int(getattr(usage, "completion_tokens", 0) or 0))

    def prices(self, model: str) -> Prices | None:
        """litellm's prices for a model, read once per model; None when it has none."""
        if model not in self._prices:
            self._prices[model] = self._read_prices(model)
        return self._prices[model]

    def _model_info(self, model: str) -> dict[str, Any] | None:
        """litellm's entry for a model (prices, context window); None when it has none. Without
        importing litellm for direct-path models: their entry is read from the table it ships."""
        if self._litellm is not None:
            try:
                info = self._litellm.get_model_info(model)
            except Exception:  # litellm raises for models missing from its table
                return None
            return dict(info) if info else None
        if self.uses_direct_path(model):
            return bundled_model_entry(model.split("/", 1)[1])
        return None

    def _read_prices(self, model: str) -> Prices | None:
        return None if model in _REGISTERED_UNPRICED else Prices.from_info(self._model_info(model))

    def _register_if_unpriced(self, model: str) -> None:
        """Give a model litellm cannot price zero prices, once: its per-reply cost step then
        stops walking every fallback table (~0.5 ms of CPU per call). We report null, not 0."""
        if model in _REGISTERED_UNPRICED or model in self._prices:
            return
        if self.prices(model) is None:
            _REGISTERED_UNPRICED.add(model)
            with contextlib.suppress(Exception):
                self.litellm.register_model({model: {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
                                                     "litellm_provider": model.split("/", 1)[0],
                                                     "mode": "chat"}})

    def _litellm_cost(self, model: str, response: Any) -> float | None:
        """litellm prices every reply itself (tier-aware) while building it: read that, never
        call ``completion_cost`` again; null for a model it has no price for."""
        if model in _REGISTERED_UNPRICED:
            return None
        hidden = getattr(response, "_hidden_params", None) or {}
        cost = hidden.get("response_cost")
        return float(cost) if isinstance(cost, (int, float)) else None

    def _own_cost(self, model: str, input_tokens: int, output_tokens: int) -> float | None:
        prices = self.prices(model)
        return None if prices is None else prices.cost(input_tokens, output_tokens)

    # ----- errors ---------------------------------------------------------------------------

    def _classify(self, model: str, exc: Exception) -> Failure:
        """The Failure for a litellm exception."""
        errors = self.litellm.exceptions
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        status = getattr(exc, "status_code", None)
        headers = getattr(exc, "litellm_response_headers", None)
        if headers is None:
            headers = getattr(getattr(exc, "response", None), "headers", None)
        wait = retry_after_s(headers) if isinstance(headers, Mapping) else None
        if isinstance(exc, errors.AuthenticationError) or "api_key" in str(exc).lower():
            return auth_failure(model)
        if isinstance(exc, errors.ContextWindowExceededError):
            return context_failure(model, detail)
        if isinstance(exc, errors.RateLimitError):
            return rate_limited(model, detail, wait)
        if isinstance(exc, errors.Timeout):
            return timeout_failure(model, self.settings.model_timeout_s)
        if isinstance(exc, (errors.APIConnectionError, errors.InternalServerError,
                            errors.ServiceUnavailableError, errors.BadGatewayError)):
            return unavailable(model, detail, status if isinstance(status, int) else None, wait)
        if isinstance(exc, errors.NotFoundError):
            return not_found(model, detail)
        if isinstance(exc, errors.BadRequestError) and "provider" in str(exc).lower():
            return Failure(f"unknown model {model!r}: {MODEL_HINT}", retryable=False)
        if isinstance(status, int) and (status == 429 or status >= 500):
            return unavailable(model, detail, status, wait)
        return Failure(f"{model}: {type(exc).__name__}: {detail}", retryable=False)


class _NoSlot:
    """The slot when adaptive concurrency is off: reports go nowhere."""

    def succeeded(self) -> None:
        return None

    def overloaded(self, retry_after_s: float | None = None) -> None:
        return None


_NO_SLOT = _NoSlot()
