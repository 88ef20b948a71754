"""Where the time of a big needle run goes: a breakdown for when the speed target fails.

    python -m bench.profile_subcalls [--size-mb 100] [--runs 2]

Measures, against a scripted model server in a subprocess (50 ms per call unless said):

1. the local sandbox alone: start with the context, the needle policy's prompt-building cell,
   and ``llm_query_batched`` over every chunk with an instant in-process handler (the JSON-lines
   channel's own cost per 400,000-character sub-call);
2. host CPU per sub-call of litellm (what rlm-mcp uses) and of the OpenAI SDK (what the
   reference uses), 40 sequential 400,000-character calls at 0 ms model latency;
3. whole ``RlmEngine`` runs with rlm-mcp's ModelClient, then (an experiment, not rlm-mcp's code)
   with ModelClient.complete replaced by a direct OpenAI SDK call: wall time, server CPU time and
   the most sub-calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENAI_API_KEY", "sk-bench")

from bench.common import MB, write_haystack  # noqa: E402

PIECE = "Find the secret code in the text below. Reply with only the code, or NONE.\n\n" + "lorem ipsum " * 33_333


@contextlib.contextmanager
def model_server(latency_ms: float):
    repo = str(Path(__file__).resolve().parents[1])
    code = (f"import sys, threading; sys.path.insert(0, {repo!r})\n"
            "from rlm_mcp.testing.model_server import ScriptedModelServer\n"
            f"with ScriptedModelServer({latency_ms / 1000!r}) as s:\n"
            "    print(s.api_base, flush=True); threading.Event().wait()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


async def sandbox_alone(path: Path) -> None:
    from rlm_mcp.config import Settings
    from rlm_mcp.sandbox import ContextFile, SandboxSpec
    from rlm_mcp.sandbox.local import LocalProvider

    async def echo(op: str, prompt: str, model: str | None) -> str:
        return "NONE"

    spec = SandboxSpec(context=ContextFile(path, "text"), handler=echo)
    began = time.perf_counter()
    async with LocalProvider(Settings()).create(spec) as sandbox:
        started = time.perf_counter()
        await sandbox.execute("pieces = [context[i:i + 400000] for i in range(0, len(context), 400000)]\n"
                              "prompts = ['Find the secret code. ' + p for p in pieces]", timeout=120)
        built = time.perf_counter()
        cpu = time.process_time()
        await sandbox.execute("replies = llm_query_batched(prompts)", timeout=120)
        done = time.perf_counter()
        host_cpu = time.process_time() - cpu
        result = await sandbox.execute("print(len(prompts))", timeout=30)
    n = int(result.stdout.strip())
    print(f"1. local sandbox: start with context {started - began:.2f} s; building {n} prompts "
          f"{built - started:.2f} s; "
          f"llm_query_batched with an instant handler {done - built:.2f} s = {(done - built) / n * 1000:.1f} ms per "
          f"sub-call (host CPU {host_cpu / n * 1000:.1f} ms per sub-call)")


async def per_call_cpu(api_base: str, calls: int = 40) -> None:
    import litellm
    import openai

    litellm.suppress_debug_info = True
    client = openai.AsyncOpenAI(base_url=api_base, api_key="sk-bench", max_retries=0)
    messages = [{"role": "user", "content": PIECE}]

    async def sdk() -> None:
        await client.chat.completions.create(model="needle", messages=messages)

    async def lite() -> None:
        await litellm.acompletion(model="openai/needle", messages=messages, api_base=api_base, num_retries=0)

    for name, fn in (("OpenAI SDK", sdk), ("litellm", lite)):
        await fn()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await fn()
        print(f"2. {name:10}: {(time.process_time() - cpu) / calls * 1000:.1f} ms CPU, "
              f"{(time.perf_counter() - wall) / calls * 1000:.1f} ms wall per 400,000-character call (model at 0 ms)")


async def engine_runs(api_base: str, path: Path, runs: int, direct: bool) -> None:
    import openai

    from rlm_mcp.config import Settings
    from rlm_mcp.engine import RlmEngine, RunRequest, models, shape_of
    from rlm_mcp.store import ContextStore

    original = models.ModelClient.complete
    if direct:
        client = openai.AsyncOpenAI(base_url=api_base, api_key="sk-bench", max_retries=0)

        async def complete(self: object, model: str, messages: list[dict[str, str]]) -> models.Completion:
            began = time.perf_counter()
            r = await client.chat.completions.create(model=model.split("/", 1)[1], messages=messages)
            return models.Completion(model, r.choices[0].message.content or "", r.usage.prompt_tokens,
                                     r.usage.completion_tokens, None, time.perf_counter() - began)
        models.ModelClient.complete = complete  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as home:
            settings = Settings(home=Path(home), model="openai/needle", api_base=api_base)
            store = ContextStore(settings)
            info = store.load_path(str(path))
            engine = RlmEngine(settings)
            request = RunRequest(query="q", context=store.context_file(info.handle), shape=shape_of(info))
            await engine.run(request)  # warm-up
            label = "direct OpenAI SDK (experiment)" if direct else "rlm-mcp ModelClient (litellm)"
            for _ in range(runs):
                cpu, wall = time.process_time(), time.perf_counter()
                result = await engine.run(request)
                print(f"3. {label}: wall {time.perf_counter() - wall:.2f} s, server CPU "
                      f"{time.process_time() - cpu:.2f} s, {result.subcalls} sub-calls, most in flight "
                      f"{result.max_subcalls_in_flight}, answer {result.answer}")
            await engine.sandboxes.aclose()
    finally:
        models.ModelClient.complete = original  # type: ignore[method-assign]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "haystack.txt"
        write_haystack(path, args.size_mb * MB, "PROFILE-1")
        await sandbox_alone(path)
        with model_server(0) as api_base:
            await per_call_cpu(api_base)
        with model_server(args.latency_ms) as api_base:
            await engine_runs(api_base, path, args.runs, direct=False)
            await engine_runs(api_base, path, args.runs, direct=True)


if __name__ == "__main__":
    asyncio.run(main())
