"""Host CPU per sub-call, event-loop stalls and import cost: what one model call costs us.

    python -m bench.subcall_cost                          # every section, ~3 min on 2 cores
    python -m bench.subcall_cost --sections cpu --variants rlm-mcp,litellm,httpx --calls 400
    python -m bench.subcall_cost --profile litellm        # cProfile of one variant's calls
    python -m bench.subcall_cost --sections import,warm,json

Issue 12's figures. Every client variant runs in a fresh process of its own (litellm's knobs are
module-wide, and an earlier variant must not leave a warm cache or a flag behind), against the
scripted OpenAI-compatible server (``rlm_mcp.testing.model_server``) in another process at 0 ms
model latency, so the CPU counted (``time.process_time()``: every thread of the client process)
is the client's alone. Calls run ``--concurrency`` at a time (32, rlm-mcp's default), small
prompt; the first ``--warmup`` calls (imports, connection pool, caches) are not counted.

Sections:

* ``cpu``: CPU ms per call, wall per call and the event loop's longest stall for each client
  variant (``--variants``; ``VARIANTS`` below says what each is). ``litellm+knob+knob`` runs raw
  ``litellm.acompletion`` with public knobs set (``KNOBS`` below).
* ``import``: ``import litellm`` wall, CPU and resident memory in a fresh process.
* ``warm``: the event loop's longest stall while litellm is imported (a) on the loop, as the
  first model call does today, and (b) in a worker thread while the loop keeps serving.
* ``json``: the JSON work a multi-MB prompt costs on the loop: encoding the request body,
  decoding a worker's ``call`` line, and one whole litellm call with that prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The price map ships with litellm; without this it is fetched from GitHub at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-a-real-key")

SMALL_PROMPT = "Find the secret code in the text below. Reply with only the code, or NONE.\n\n" + (
    "lorem ipsum dolor sit amet " * 20) + " The secret code is QX-7. "
Call = Callable[[list[dict[str, str]]], Awaitable[str]]


# ----- the event-loop lag probe ----------------------------------------------------------------


@dataclass
class LagReport:
    """How late the loop ran a timer that was due every ``interval_s``: the loop's stalls."""

    interval_s: float
    samples: int = 0
    max_stall_ms: float = 0.0
    stalls_over_10ms: int = 0
    p99_ms: float = 0.0

    def line(self) -> str:
        return (f"loop stall max {self.max_stall_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
                f"{self.stalls_over_10ms} stalls > 10 ms ({self.samples} samples)")


class LoopLagProbe:
    """Measures event-loop stalls: a task sleeps ``interval_s`` and records how late it woke.

    A late wake-up is time the loop spent on something else without yielding (a callback, a
    synchronous import, a big ``json.dumps``); with nothing else runnable the lateness is the
    stall. Use as ``async with LoopLagProbe() as probe: ...`` then ``probe.report``.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.lateness: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = False
        self.report = LagReport(interval_s)

    async def _run(self) -> None:
        clock = time.perf_counter
        while not self._stop:
            due = clock() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.lateness.append(max(0.0, clock() - due))

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)  # let the probe take its first timestamp
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task
        late = sorted(self.lateness)
        ms = [x * 1000 for x in late]
        self.report = LagReport(
            self.interval_s, samples=len(ms), max_stall_ms=ms[-1] if ms else 0.0,
            stalls_over_10ms=sum(1 for x in ms if x > 10.0),
            p99_ms=ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else 0.0)


class StepWatch:
    """The longest single step the loop ran (one callback or one task step, between two awaits),
    in CPU time of the loop's thread.

    Under load the lag probe also measures queueing (32 ready tasks each running 2 ms make the
    probe 64 ms late with no single step over 2 ms); this tells the two apart. It wraps
    ``asyncio.events.Handle._run`` for the life of the ``with`` block (benchmark processes only).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.over_10ms = 0
        self.max_ms = 0.0
        self.max_what = ""
        self._original: Any = None

    def __enter__(self) -> Self:
        watch = self
        original = self._original = asyncio.events.Handle._run
        # This thread's CPU time, not wall time: on a shared machine a step can be descheduled
        # for tens of ms without doing any work, and that is not a stall we caused.
        clock = time.thread_time

        def _run(handle: asyncio.events.Handle) -> None:
            began = clock()
            try:
                original(handle)
            finally:
                took = (clock() - began) * 1000
                watch.steps += 1
                if took > 10.0:
                    watch.over_10ms += 1
                if took > watch.max_ms:
                    watch.max_ms = took
                    watch.max_what = repr(handle)[:160]

        asyncio.events.Handle._run = _run  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "max_step_ms": self.max_ms, "steps_over_10ms": self.over_10ms,
                "max_step": self.max_what}


class GcWatch:
    """Garbage-collector pauses (they stall the loop like any other synchronous work)."""

    def __init__(self) -> None:
        self.pauses_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._began = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses_ms[info["generation"]].append((time.perf_counter() - self._began) * 1000)

    def __enter__(self) -> Self:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {f"gen{g}": {"count": len(p), "max_ms": max(p, default=0.0), "total_ms": sum(p)}
                for g, p in self.pauses_ms.items()}


# ----- the model server --------------------------------------------------------------------------


@contextlib.contextmanager
def model_server(latency_ms: float = 0.0) -> Iterator[str]:
    """The scripted server in a process of its own (its CPU must not count as the client's)."""
    # The stdlib server listens with a backlog of 5: 32 clients connecting at once overflow it and
    # the kernel resets some connections (TcpExtListenOverflows). Raised here for this process only;
    # model_server.py itself should set ``request_queue_size`` (proposed for issue 12's phase B).
    code = (f"import sys, threading, http.server; sys.path.insert(0, {str(REPO)!r})\n"
            "http.server.ThreadingHTTPServer.request_queue_size = 256\n"
            "from rlm_mcp.testing.model_server import ScriptedModelServer\n"
            f"with ScriptedModelServer({latency_ms / 1000!r}) as s:\n"
            "    print('scripted model server on', s.api_base, flush=True); threading.Event().wait()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("scripted model server on "):
            raise RuntimeError(f"the model server did not start: {line!r}")
        yield line.rsplit(" ", 1)[1]
    finally:
        proc.kill()
        proc.wait()


# ----- client variants ---------------------------------------------------------------------------


def _litellm() -> Any:
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def _priced(litellm: Any, model: str) -> bool:
    try:
        info = litellm.get_model_info(model)
    except Exception:  # noqa: BLE001 (litellm raises a bare Exception for a model it does not know)
        return False
    return bool(info.get("input_cost_per_token") or info.get("output_cost_per_token"))


async def rlm_mcp_client(api_base: str, model: str, knobs: list[str], model_client: str = "auto") -> Call:
    from rlm_mcp.config import Settings
    from rlm_mcp.engine.models import ModelClient

    client = ModelClient(Settings(api_base=api_base, api_key="sk-bench", model_retries=0, model_timeout_s=60,
                                  model_client=model_client))

    async def call(messages: list[dict[str, str]]) -> str:
        return (await client.complete(model, messages)).text

    return call


async def litellm_client(api_base: str, model: str, knobs: list[str]) -> Call:
    litellm = _litellm()
    kwargs: dict[str, Any] = {"api_base": api_base, "api_key": "sk-bench", "num_retries": 0, "timeout": 60}
    context: contextvars.Context | None = None
    for knob in knobs:
        KNOBS[knob][1](litellm, kwargs, context, api_base)
    if "register" in knobs and not _priced(litellm, model):
        litellm.register_model({model: {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
                                        "litellm_provider": model.split("/", 1)[0], "mode": "chat"}})

    async def call(messages: list[dict[str, str]]) -> str:
        response = await litellm.acompletion(model=model, messages=messages, **kwargs)
        return str(response.choices[0].message.content)

    if context is None:
        return call

    async def in_context(messages: list[dict[str, str]]) -> str:
        # Runs the call as a task in ``context`` (the contextvar knobs live there).
        return await asyncio.get_running_loop().create_task(call(messages), context=context)

    return in_context


async def openai_client(api_base: str, model: str, knobs: list[str]) -> Call:
    import openai

    client = openai.AsyncOpenAI(base_url=api_base, api_key="sk-bench", max_retries=0, timeout=60)
    name = model.split("/", 1)[1]

    async def call(messages: list[dict[str, str]]) -> str:
        response = await client.chat.completions.create(model=name, messages=messages)  # type: ignore[arg-type]
        return str(response.choices[0].message.content)

    return call


async def httpx_client(api_base: str, model: str, knobs: list[str]) -> Call:
    import httpx

    client = httpx.AsyncClient(base_url=api_base, timeout=60,
                               limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
                               headers={"Authorization": "Bearer sk-bench"})
    name = model.split("/", 1)[1]

    async def call(messages: list[dict[str, str]]) -> str:
        response = await client.post("/chat/completions", json={"model": name, "messages": messages})
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])

    return call


async def aiohttp_client(api_base: str, model: str, knobs: list[str]) -> Call:
    import aiohttp

    session = aiohttp.ClientSession(headers={"Authorization": "Bearer sk-bench"},
                                    connector=aiohttp.TCPConnector(limit=64))
    url = api_base.rstrip("/") + "/chat/completions"
    name = model.split("/", 1)[1]

    async def call(messages: list[dict[str, str]]) -> str:
        async with session.post(url, json={"model": name, "messages": messages}) as response:
            response.raise_for_status()
            body = await response.json()
        return str(body["choices"][0]["message"]["content"])

    return call


VARIANTS: dict[str, tuple[str, Callable[[str, str, list[str]], Awaitable[Call]]]] = {
    "rlm-mcp": ("rlm_mcp.engine.models.ModelClient.complete as shipped (direct path for openai/<name> + api_base)",
                rlm_mcp_client),
    "rlm-mcp-litellm": ("ModelClient.complete with RLM_MCP_MODEL_CLIENT=litellm (warm-up, gc.freeze, limiter)",
                        lambda api_base, model, knobs: rlm_mcp_client(api_base, model, knobs, "litellm")),
    "litellm": ("raw litellm.acompletion(num_retries=0), defaults otherwise", litellm_client),
    "openai-sdk": ("openai.AsyncOpenAI, one client reused", openai_client),
    "httpx": ("httpx.AsyncClient POST + response.json(), one client reused", httpx_client),
    "aiohttp": ("aiohttp.ClientSession POST + json(), one session reused", aiohttp_client),
}


def _set(attr: str, value: Any) -> Callable[[Any, dict[str, Any], Any, str], None]:
    def apply(litellm: Any, kwargs: dict[str, Any], context: Any, api_base: str) -> None:
        setattr(litellm, attr, value)
    return apply


def _kwarg(name: str, value: Any) -> Callable[[Any, dict[str, Any], Any, str], None]:
    def apply(litellm: Any, kwargs: dict[str, Any], context: Any, api_base: str) -> None:
        kwargs[name] = value
    return apply


def _openai_client_kwarg(litellm: Any, kwargs: dict[str, Any], context: Any, api_base: str) -> None:
    import openai

    kwargs["client"] = openai.AsyncOpenAI(base_url=api_base, api_key="sk-bench", max_retries=0, timeout=60)


KNOBS: dict[str, tuple[str, Callable[[Any, dict[str, Any], Any, str], None]]] = {
    "nolog": ('per-call kwarg "no-log": True (callbacks skipped)', _kwarg("no-log", True)),
    "client": ("per-call kwarg client=<one openai.AsyncOpenAI> (litellm's client cache skipped)",
               _openai_client_kwarg),
    "httpx": ("litellm.disable_aiohttp_transport = True (httpx transport instead of aiohttp)",
              _set("disable_aiohttp_transport", True)),
    "notokens": ("litellm.disable_token_counter = True", _set("disable_token_counter", True)),
    "internal": (("EXPERIMENT, private API: litellm._internal_context.is_internal_call set for the calls "
                  "(litellm then schedules no success logging); measures what that logging costs"),
                 lambda litellm, kwargs, context, api_base: __import__(
                     "litellm._internal_context", fromlist=["is_internal_call"]).is_internal_call.set(True)),
    "register": (("litellm.register_model() for a model its price map lacks (zero prices): its "
                  "per-call lookup then hits at once instead of searching fallbacks"),
                 lambda litellm, kwargs, context, api_base: None),  # applied per model in litellm_client
    "price0": ("per-call kwargs input_cost_per_token=0, output_cost_per_token=0 (custom pricing)",
               lambda litellm, kwargs, context, api_base: kwargs.update(input_cost_per_token=0.0,
                                                                          output_cost_per_token=0.0)),
}


PROCESS_KNOBS: dict[str, tuple[str, Callable[[], None]]] = {
    # litellm's import leaves ~200 MB of long-lived objects that every full collection walks.
    "gcfreeze": ("gc.freeze() after the warm-up: imported modules leave the collector's generations",
                 gc.freeze),
}


# ----- running one variant -----------------------------------------------------------------------


async def drive(call: Call, calls: int, concurrency: int, prompt: str) -> None:
    """``calls`` calls, ``concurrency`` at a time, each with its own message list."""
    counter = iter(range(calls))

    async def worker() -> None:
        for _ in counter:
            reply = await call([{"role": "user", "content": prompt}])
            if reply.strip() != "QX-7" and "secret code is QX-7" in prompt:
                raise RuntimeError(f"wrong reply from the scripted model: {reply!r}")

    await asyncio.gather(*(worker() for _ in range(min(concurrency, calls))))


async def measure_variant(variant: str, api_base: str, model: str, calls: int, concurrency: int,
                          warmup: int, prompt: str, profile: bool) -> dict[str, Any]:
    base, *knobs = variant.split("+")
    unknown = [k for k in knobs if k not in KNOBS and k not in PROCESS_KNOBS]
    if base not in VARIANTS or unknown or (base != "litellm" and set(knobs) - set(PROCESS_KNOBS)):
        raise SystemExit(f"unknown variant {variant!r}: variants {sorted(VARIANTS)}; knobs for litellm "
                         f"{sorted(KNOBS)}; knobs for any variant {sorted(PROCESS_KNOBS)}")
    call = await VARIANTS[base][1](api_base, model, [k for k in knobs if k in KNOBS])
    await drive(call, warmup, concurrency, prompt)
    for knob in knobs:
        if knob in PROCESS_KNOBS:
            PROCESS_KNOBS[knob][1]()
    profiler = cProfile.Profile() if profile else None
    with GcWatch() as gcw, StepWatch() as steps:
        async with LoopLagProbe() as probe:
            cpu, wall = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            await drive(call, calls, concurrency, prompt)
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    out: dict[str, Any] = {"variant": variant, "model": model, "calls": calls, "concurrency": concurrency,
                           "cpu_ms_per_call": cpu / calls * 1000, "wall_ms_per_call": wall / calls * 1000,
                           "loop": probe.report.__dict__, "gc": gcw.summary(),
                           "steps": steps.summary()}
    # A deterministic measure of work next to the noisy CPU time (this machine is shared): the
    # Python function calls one model call makes, counted by cProfile over 64 more calls.
    counter = cProfile.Profile()
    counter.enable()
    await drive(call, 64, concurrency, prompt)
    counter.disable()
    out["py_calls_per_call"] = sum(row[1] for row in pstats.Stats(counter).stats.values()) / 64  # type: ignore[attr-defined]
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
        out["profile"] = text.getvalue()
    return out


def run_child(args: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run this module in a fresh process; its last stdout line is a JSON result."""
    done = subprocess.run([sys.executable, "-m", "bench.subcall_cost", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- sections ----------------------------------------------------------------------------------


def section_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with (contextlib.nullcontext("in-process") if args.server_in_process else model_server(0)) as api_base:
        for model in args.models:
            for variant in args.variants:
                runs = [run_child(["--child", variant, "--api-base", api_base, "--model", model,
                                   "--calls", str(args.calls), "--concurrency", str(args.concurrency),
                                   "--warmup", str(args.warmup)]) for _ in range(args.repeats)]
                cpu = [r["cpu_ms_per_call"] for r in runs]
                wall = [r["wall_ms_per_call"] for r in runs]
                stall = max(r["loop"]["max_stall_ms"] for r in runs)
                step = max(r["steps"]["max_step_ms"] for r in runs)
                gen2 = max(r["gc"]["gen2"]["max_ms"] for r in runs)
                result = {"variant": variant, "model": model, "cpu_ms": statistics.median(cpu),
                          "cpu_ms_all": cpu, "wall_ms": statistics.median(wall), "max_stall_ms": stall,
                          "max_step_ms": step, "max_gen2_ms": gen2, "py_calls": runs[0]["py_calls_per_call"]}
                results.append(result)
                print(f"cpu  {variant:22} {model:20} CPU {result['cpu_ms']:5.2f} ms/call "
                      f"(runs {', '.join(f'{c:.2f}' for c in cpu)}), wall {result['wall_ms']:5.2f} ms/call, "
                      f"{result['py_calls']:.0f} Python calls/call, longest loop step {step:.1f} ms CPU, "
                      f"longest full GC {gen2:.0f} ms", flush=True)
    return results


async def measure_engine(variant: str, api_base: str, documents: int) -> dict[str, Any]:
    """One whole ``RlmEngine`` run over ``documents`` small files (policy ``count``: one sub-call
    per document, 32 in flight): host CPU per sub-call of the server side (channel, engine,
    budget, model client; the sandbox worker is another process and is not counted)."""
    import tempfile

    from bench.common import write_documents
    from rlm_mcp.config import Settings
    from rlm_mcp.engine import RlmEngine, RunRequest
    from rlm_mcp.engine.models import Completion, ModelClient
    from rlm_mcp.engine.runs import shape_of
    from rlm_mcp.store import ContextStore
    from rlm_mcp.testing.model_server import answer_subcall

    base, *knobs = variant.split("+")

    class NullClient(ModelClient):
        """Sub-calls answered without HTTP: what the rest of the path costs (an experiment)."""

        async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
            if model.endswith("/count") and len(messages) == 1:
                await asyncio.sleep(0)  # a real call yields to the loop at least once
                return Completion(model, answer_subcall(messages), 1, 1, None, 0.0)
            return await super().complete(model, messages)

    class DirectClient(ModelClient):
        """Sub-calls through one reused openai.AsyncOpenAI (an experiment, not rlm-mcp's code)."""

        def __init__(self, settings: Settings) -> None:
            super().__init__(settings)
            import openai

            self.direct = openai.AsyncOpenAI(base_url=settings.api_base, api_key="sk-bench", max_retries=0)

        async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
            began = time.perf_counter()
            r = await self.direct.chat.completions.create(model=model.split("/", 1)[1], messages=messages)  # type: ignore[arg-type]
            assert r.usage is not None
            return Completion(model, r.choices[0].message.content or "", r.usage.prompt_tokens,
                              r.usage.completion_tokens, None, time.perf_counter() - began)

    class AiohttpClient(ModelClient):
        """Sub-calls as one aiohttp POST each on a reused session (an experiment: the wire's floor)."""

        def __init__(self, settings: Settings) -> None:
            super().__init__(settings)
            self.session: Any = None

        async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
            import aiohttp

            if self.session is None:
                self.session = aiohttp.ClientSession(headers={"Authorization": "Bearer sk-bench"})
            began = time.perf_counter()
            url = str(self.settings.api_base).rstrip("/") + "/chat/completions"
            async with self.session.post(url, json={"model": model.split("/", 1)[1], "messages": messages}) as r:
                r.raise_for_status()
                body = await r.json()
            usage = body.get("usage") or {}
            return Completion(model, body["choices"][0]["message"]["content"] or "", int(usage.get("prompt_tokens", 0)),
                              int(usage.get("completion_tokens", 0)), None, time.perf_counter() - began)

    clients = {"engine": ModelClient, "engine-litellm": ModelClient, "engine-null": NullClient,
               "engine-direct": DirectClient, "engine-aiohttp": AiohttpClient}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp) / "home", model="openai/count", api_base=api_base, api_key="sk-bench",
                            model_client="litellm" if base == "engine-litellm" else "auto")
        store = ContextStore(settings)
        needles = write_documents(Path(tmp) / "docs", documents)
        info = store.load_path(str(Path(tmp) / "docs"))
        engine = RlmEngine(settings, models=clients[base](settings))
        request = RunRequest(query="How many documents hold a secret code?", context=store.context_file(info.handle),
                             shape=shape_of(info))
        try:
            warm = await engine.run(request)  # imports, sandbox path, connections
            if warm.answer != str(needles):
                raise RuntimeError(f"warm-up run answered {warm.answer!r}, expected {needles}: {warm.error}")
            for knob in knobs:
                PROCESS_KNOBS[knob][1]()
            with GcWatch() as gcw, StepWatch() as steps:
                async with LoopLagProbe() as probe:
                    cpu, wall = time.process_time(), time.perf_counter()
                    result = await engine.run(request)
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            await engine.sandboxes.aclose()
            session = getattr(engine.models, "session", None)
            if session is not None:
                await session.close()
    if result.answer != str(needles):
        raise RuntimeError(f"run answered {result.answer!r}, expected {needles}: {result.error}")
    return {"variant": variant, "subcalls": result.subcalls, "max_in_flight": result.max_subcalls_in_flight,
            "wall_s": wall, "cpu_s": cpu, "cpu_ms_per_subcall": cpu / result.subcalls * 1000,
            "loop": probe.report.__dict__, "gc": gcw.summary(), "steps": steps.summary()}


async def measure_needle(api_base: str, size_mb: int, model_client: str = "auto") -> dict[str, Any]:
    """Two ``RlmEngine`` runs over a ``size_mb`` MB haystack (policy ``needle``) in a fresh
    process, the event loop watched throughout: the first run includes litellm's warm-up (in its
    thread), the second is warm. The loop's longest stall is the figure issue 12 bounds (~10 ms)."""
    import tempfile

    from bench.common import MB, write_haystack
    from rlm_mcp.config import Settings
    from rlm_mcp.engine import RlmEngine, RunRequest
    from rlm_mcp.engine.runs import shape_of
    from rlm_mcp.store import ContextStore

    out: dict[str, Any] = {"size_mb": size_mb, "model_client": model_client, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp) / "home", model="openai/needle", api_base=api_base, api_key="sk-bench",
                            model_client=model_client)
        path = Path(tmp) / "haystack.txt"
        write_haystack(path, size_mb * MB, "LAG-7Q")
        engine = RlmEngine(settings)
        engine.models.start_warm_up()  # as the server does when it starts
        try:
            for label in ("first (fresh process)", "warm"):
                with GcWatch() as gcw, StepWatch() as steps:
                    async with LoopLagProbe() as probe:
                        began = time.perf_counter()
                        store = ContextStore(settings)
                        info = await asyncio.to_thread(store.load_path, str(path))
                        request = RunRequest(query="What is the secret code?", context=store.context_file(info.handle),
                                             shape=shape_of(info))
                        result = await engine.run(request)
                        wall = time.perf_counter() - began
                if result.answer != "LAG-7Q":
                    raise RuntimeError(f"needle run answered {result.answer!r}: {result.error}")
                out["runs"].append({"run": label, "wall_s": wall, "run_s": result.elapsed_s,
                                    "subcalls": result.subcalls, "loop": probe.report.__dict__,
                                    "gc": gcw.summary(), "steps": steps.summary()})
        finally:
            await engine.sandboxes.aclose()
            await engine.models.aclose()
    return out


def section_engine(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    with model_server(0) as api_base:
        for variant in args.engine_variants:
            runs = [run_child(["--child-engine", variant, "--api-base", api_base, "--documents",
                               str(args.documents)]) for _ in range(args.repeats)]
            cpu = [r["cpu_ms_per_subcall"] for r in runs]
            result = {"variant": variant, "cpu_ms": statistics.median(cpu), "cpu_ms_all": cpu,
                      "wall_s": statistics.median(r["wall_s"] for r in runs),
                      "max_stall_ms": max(r["loop"]["max_stall_ms"] for r in runs),
                      "max_step_ms": max(r["steps"]["max_step_ms"] for r in runs), "runs": runs}
            out.append(result)
            print(f"engine {variant:24} {runs[0]['subcalls']} sub-calls: host CPU {result['cpu_ms']:.2f} ms/sub-call "
                  f"(runs {', '.join(f'{c:.2f}' for c in cpu)}), wall {result['wall_s']:.2f} s, loop stall max "
                  f"{result['max_stall_ms']:.1f} ms, longest step {result['max_step_ms']:.1f} ms CPU", flush=True)
    return out


def section_knobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each litellm knob against the same baseline, in interleaved pairs (the host is shared and
    its load drifts: a pair's two runs see nearly the same conditions)."""
    out = []
    base = args.knob_baseline
    with model_server(0) as api_base:
        for model in args.models:
            for knob in args.knobs:
                pairs = []
                for _ in range(args.repeats):
                    pair = []
                    for variant in (base, f"{base}+{knob}"):
                        pair.append(run_child(["--child", variant, "--api-base", api_base, "--model", model,
                                               "--calls", str(args.calls), "--concurrency", str(args.concurrency),
                                               "--warmup", str(args.warmup)]))
                    pairs.append(pair)
                before = [p[0]["cpu_ms_per_call"] for p in pairs]
                after = [p[1]["cpu_ms_per_call"] for p in pairs]
                delta = statistics.median(b - a for a, b in zip(before, after))
                fcalls = (pairs[0][0]["py_calls_per_call"], pairs[0][1]["py_calls_per_call"])
                result = {"model": model, "knob": knob, "what": (KNOBS.get(knob) or PROCESS_KNOBS[knob])[0],
                          "baseline_ms": statistics.median(before), "with_knob_ms": statistics.median(after),
                          "median_delta_ms": delta, "py_calls": fcalls}
                out.append(result)
                print(f"knob {knob:9} {model:20} {result['baseline_ms']:.2f} -> {result['with_knob_ms']:.2f} ms/call "
                      f"(median paired delta {delta:+.2f} ms over {len(pairs)} pairs); Python calls per call "
                      f"{fcalls[0]:.0f} -> {fcalls[1]:.0f}", flush=True)
    return out


IMPORT_PROBE = """
import json, os, time, resource
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
def rss():
    return {k: int(v.split()[0]) for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
            if k in ("VmRSS", "VmHWM")}
before = rss()
wall, cpu = time.perf_counter(), time.process_time()
import litellm
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
after = rss()
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_before_mb": before["VmRSS"] / 1024,
                  "rss_after_mb": after["VmRSS"] / 1024, "hwm_mb": after["VmHWM"] / 1024}))
"""


def section_import(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for _ in range(args.repeats):
        done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"import litellm: wall {statistics.median(r['wall_s'] for r in out):.2f} s, CPU "
          f"{statistics.median(r['cpu_s'] for r in out):.2f} s, RSS {out[0]['rss_before_mb']:.0f} -> "
          f"{statistics.median(r['rss_after_mb'] for r in out):.0f} MB (median of {len(out)})", flush=True)
    return out


async def import_with_probe(mode: str) -> dict[str, Any]:
    """Import litellm ``on-loop``, in a ``thread``, or in a thread with a 1 ms GIL switch
    interval (``thread-1ms``) while the lag probe runs on the loop; ``idle`` imports nothing
    (the machine's own noise: on a loaded host the OS deschedules even an idle loop)."""
    wall = time.perf_counter()
    async with LoopLagProbe(0.002) as probe:
        if mode == "on-loop":
            import litellm  # noqa: F401  (what the first model call does today)
        elif mode == "idle":
            await asyncio.sleep(2.0)
        elif mode in ("thread", "thread-1ms"):
            previous = sys.getswitchinterval()
            if mode == "thread-1ms":
                # A thread holding the GIL gives it up after this interval when another waits;
                # the default 5 ms lets each loop wake-up wait up to ~2 intervals.
                sys.setswitchinterval(0.001)
            try:
                await asyncio.to_thread(__import__, "litellm")
            finally:
                sys.setswitchinterval(previous)
        else:
            raise SystemExit(f"unknown import mode {mode!r}")
    return {"mode": mode, "wall_s": time.perf_counter() - wall, "loop": probe.report.__dict__}


def section_warm(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for mode in ("idle", "on-loop", "thread", "thread-1ms"):
        for _ in range(args.repeats):
            result = run_child(["--child-import", mode])
            out.append(result)
            report = LagReport(**result["loop"])
            print(f"warm import {mode:8}: {result['wall_s']:.2f} s, {report.line()}", flush=True)
    return out


def section_json(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = args.json_mb * 1024 * 1024
    prompt = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
    messages = [{"role": "user", "content": prompt}]
    out: dict[str, Any] = {"prompt_mb": args.json_mb}

    def best_ms(fn: Callable[[], object], n: int = 5) -> float:
        times = []
        for _ in range(n):
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1000)
        return min(times)

    body = {"model": "needle", "messages": messages}
    out["dumps_ms"] = best_ms(lambda: json.dumps(body))
    out["dumps_encode_ms"] = best_ms(lambda: json.dumps(body).encode())
    line = json.dumps({"type": "call", "id": 1, "op": "llm_query", "prompt": prompt},
                      ensure_ascii=False).encode() + b"\n"
    out["channel_loads_ms"] = best_ms(lambda: json.loads(line))
    non_ascii = ("Grüße, 世界 " * (size // 14 + 1))[:size // 2]
    out["dumps_non_ascii_ms"] = best_ms(lambda: json.dumps({"messages": [{"content": non_ascii}]}))
    out["dumps_non_ascii_chars"] = len(non_ascii)
    out["copy_ms"] = best_ms(lambda: prompt.encode())
    print(f"json {args.json_mb} MB prompt: json.dumps {out['dumps_ms']:.1f} ms (+encode "
          f"{out['dumps_encode_ms']:.1f} ms); channel json.loads {out['channel_loads_ms']:.1f} ms; "
          f"str.encode alone {out['copy_ms']:.1f} ms; json.dumps of {len(non_ascii) / 1e6:.1f} M non-ASCII "
          f"chars {out['dumps_non_ascii_ms']:.1f} ms", flush=True)
    with model_server(0) as api_base:
        for variant in args.json_variants:
            result = run_child(["--child", variant, "--api-base", api_base, "--model", args.models[0],
                                "--calls", "8", "--concurrency", "1", "--warmup", "2", "--prompt-mb",
                                str(args.json_mb)])
            out[f"call_{variant}"] = result
            print(f"json {args.json_mb} MB prompt, one {variant} call: CPU {result['cpu_ms_per_call']:.1f} ms, "
                  f"wall {result['wall_ms_per_call']:.1f} ms, {LagReport(**result['loop']).line()}", flush=True)
    return [out]


def child_main(args: argparse.Namespace) -> None:
    if args.child_engine:
        print(json.dumps(asyncio.run(measure_engine(args.child_engine, args.api_base, args.documents))))
        return
    if args.child_import:
        print(json.dumps(asyncio.run(import_with_probe(args.child_import))))
        return
    if args.child_needle:
        print(json.dumps(asyncio.run(measure_needle(args.api_base, args.child_needle, args.model_client))))
        return
    prompt = SMALL_PROMPT
    if args.prompt_mb:
        size = int(args.prompt_mb * 1024 * 1024)
        prompt = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size] + " The secret code is QX-7. "
    with contextlib.ExitStack() as stack:
        api_base = args.api_base
        if api_base == "in-process":
            # The server's threads in this process: its CPU then counts as the client's, as in the
            # figures issue 12 started from (7.6 ms per litellm call).
            import http.server

            from rlm_mcp.testing.model_server import ScriptedModelServer

            http.server.ThreadingHTTPServer.request_queue_size = 256
            api_base = stack.enter_context(ScriptedModelServer(0.0)).api_base
        result = asyncio.run(measure_variant(args.child, api_base, args.model, args.calls, args.concurrency,
                                             args.warmup, prompt, args.profile_child))
    if "profile" in result:
        print(result.pop("profile"), file=sys.stderr)
    print(json.dumps(result))


SECTIONS = {"cpu": section_cpu, "knobs": section_knobs, "engine": section_engine, "import": section_import, "warm": section_warm, "json": section_json}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="cpu,engine,import,warm,json")
    parser.add_argument("--variants", default="rlm-mcp,litellm,openai-sdk,httpx,aiohttp")
    parser.add_argument("--models", default="openai/needle,openai/gpt-4.1-mini",
                        help="model strings; the scripted server answers any name. needle has no price in "
                             "litellm's map, gpt-4.1-mini has one (pricing runs a different path)")
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--knobs", default="nolog,price0,notokens,client,httpx,internal",
                        help="knobs section: litellm knobs to compare with --knob-baseline")
    parser.add_argument("--knob-baseline", default="litellm+gcfreeze")
    parser.add_argument("--documents", type=int, default=1000, help="engine section: documents (sub-calls)")
    parser.add_argument("--engine-variants",
                        default="engine,engine+gcfreeze,engine-direct+gcfreeze,engine-aiohttp+gcfreeze,engine-null")
    parser.add_argument("--json-mb", type=int, default=5)
    parser.add_argument("--json-variants", default="rlm-mcp,httpx")
    parser.add_argument("--server-in-process", action="store_true",
                        help="cpu section: run the scripted server inside each client process (its CPU counts "
                             "too; the method behind the issue's first figures)")
    parser.add_argument("--profile", metavar="VARIANT", help="print a cProfile of VARIANT's measured calls")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    # internal: one measurement in this process
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-import", help=argparse.SUPPRESS)
    parser.add_argument("--child-engine", help=argparse.SUPPRESS)
    parser.add_argument("--child-needle", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-client", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--api-base", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="openai/needle", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-mb", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.child_import or args.child_engine or args.child_needle:
        child_main(args)
        return
    args.variants = [v for v in args.variants.split(",") if v]
    args.models = [m for m in args.models.split(",") if m]
    args.json_variants = [v for v in args.json_variants.split(",") if v]
    args.engine_variants = [v for v in args.engine_variants.split(",") if v]
    args.knobs = [k for k in args.knobs.split(",") if k]
    if args.profile:
        with model_server(0) as api_base:
            done = subprocess.run([sys.executable, "-m", "bench.subcall_cost", "--child", args.profile,
                                   "--api-base", api_base, "--model", args.models[0], "--calls", str(args.calls),
                                   "--concurrency", str(args.concurrency), "--warmup", str(args.warmup),
                                   "--profile-child"], cwd=REPO, capture_output=True, text=True, timeout=600,
                              check=False)
        print(done.stderr)
        print(done.stdout)
        return
    figures: dict[str, Any] = {}
    for name in (s for s in args.sections.split(",") if s):
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}: one of {', '.join(SECTIONS)}")
        figures[name] = SECTIONS[name](args)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
