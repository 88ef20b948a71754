"""Fixtures for the viewer tests: runs made by the real engine (litellm over HTTP to the scripted
model server, local sandboxes), hand-written trajectories, and a headless Chromium.

The browser is Debian's chromium driven by Playwright for Python (tests/tools/install-browser.sh
installs both). Without them the browser tests are skipped with the reason on a developer
machine and fail under CI=true.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from rlm_mcp.config import Limits, Settings
from rlm_mcp.engine import RlmEngine, RunRequest, RunResult
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.engine.trajectory import TrajectoryWriter
from rlm_mcp.sandbox import ContextFile
from rlm_mcp.testing.model_server import Fault, ScriptedModelServer
from tests.conftest import haystack
from tests.support import unavailable

CHROMIUM = os.environ.get("RLM_MCP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "viewer"
HOSTILE = '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><!--'


def _unavailable(reason: str) -> None:
    unavailable(f"{reason} (tests/tools/install-browser.sh installs the browser)")


# ----- runs made by the real engine ---------------------------------------------------------------

@dataclass
class EngineRun:
    directory: Path
    run_id: str
    result: RunResult

    @property
    def path(self) -> Path:
        return self.directory / f"{self.run_id}.jsonl"


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"


async def _run(settings: Settings, model: str, text: str, query: str, tmp: Path, **limits: Any) -> RunResult:
    context = tmp / f"{model}.txt"
    context.write_text(text, encoding="utf-8")
    run_settings = replace(settings, model=f"openai/{model}", limits=replace(settings.limits, **limits))
    engine = RlmEngine(run_settings)
    try:
        return await engine.run(RunRequest(query=query, context=ContextFile(context),
                                           shape=ContextShape("text", len(text))))
    finally:
        await engine.sandboxes.aclose()


@pytest.fixture(scope="session")
def engine_runs(model_server: ScriptedModelServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, EngineRun]:
    """Runs of the real engine, made once: a finished needle search, a run with child RLMs, a
    failed run, a run stopped by a limit, a scripted multi-step run, and a hostile one."""
    tmp = tmp_path_factory.mktemp("viewer-runs")
    settings = Settings(home=tmp / "home", model="openai/needle", api_base=model_server.api_base,
                        model_retries=1, model_timeout_s=30, limits=Limits(cell_timeout_s=20, timeout_s=120))
    model_server.script("viewer-steps", [
        "First I look at the shape.\n" + repl("print('alpha-marker', len(context))"),
        "Now the second step.\n" + repl("print('bravo-marker')\nimport sys\nprint('warned', file=sys.stderr)"),
        "Checking the answer.\n" + repl("x = 1 / 0"),
        "FINAL(charlie-answer)"])
    model_server.script("viewer-fail", [repl("print('before the failure')"), Fault(500, "upstream exploded"),
                                        Fault(500, "upstream exploded")])
    model_server.script("viewer-limit", [repl("print(1)"), repl("print(2)"), "FINAL(best guess)"])
    model_server.script("viewer-hostile", [
        f"Prose with markup {HOSTILE}\n" + repl(f"print({HOSTILE!r})\nprint('tail')"),
        f"FINAL(answer {HOSTILE})"])

    async def make() -> dict[str, EngineRun]:
        jobs = {
            "finished": ("needle", haystack(900_000, "VIEW-7"), "What is the secret code?", {}),
            "children": ("recursive", haystack(1_000_000, "DEEP-3"), "What is the secret code?", {"max_depth": 2}),
            "steps": ("viewer-steps", "some text", "Walk through the steps", {}),
            "failed": ("viewer-fail", "x", "This run fails", {}),
            "limit": ("viewer-limit", "x", "This run runs out of iterations", {"max_iterations": 2}),
            "hostile": ("viewer-hostile", "y", f"Query with markup {HOSTILE}", {}),
        }
        made = {}
        for name, (model, text, query, limits) in jobs.items():
            result = await _run(settings, model, text, query, tmp, **limits)
            made[name] = EngineRun(settings.home / "trajectories", result.run_id, result)
        return made

    # In a thread of its own: Playwright's sync API keeps an event loop marked running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result(timeout=600)


# ----- hand-written trajectories ------------------------------------------------------------------

def iteration_record(number: int, *, code: str = "print('hi')", stdout: str = "hi\n", prose: str = "Step.",
                     calls: list[dict[str, Any]] | None = None, final: str | None = None,
                     duration: float = 1.0) -> dict[str, Any]:
    """One iteration line with the fields the engine writes (``trajectory.iteration_record``)."""
    return {"iteration": number, "prompt": [{"role": "user", "content": "feedback"}],
            "response": f"{prose}\n```repl\n{code}\n```",
            "code_blocks": [{"code": code, "result": {
                "stdout": stdout, "stderr": "", "locals": {}, "execution_time": duration / 2, "final_answer": final,
                "rlm_calls": calls or [], "state_lost": False, "timed_out": False}}],
            "final_answer": final, "iteration_time": duration,
            "usage": {"model": "openai/root", "input_tokens": 1000 * number, "output_tokens": 50, "cost_usd": 0.001}}


def metadata(run_id: str, root_id: str, query: str) -> dict[str, Any]:
    return {"root_model": "openai/root", "max_depth": 2, "max_iterations": 30, "backend": "litellm",
            "backend_kwargs": {}, "environment_type": "local", "environment_kwargs": {}, "other_backends": [],
            "run_id": run_id, "root_run_id": root_id, "depth": run_id.count(".") + 1, "query": query,
            "context": {"kind": "text", "characters": 100, "documents": 0, "name": None},
            "limits": Limits().__dict__}


def tree_run(directory: Path, run_id: str = "run-20260101-120000-tree01") -> Path:
    """A root with two children, the second with a grandchild; each holds a word found nowhere else."""
    directory.mkdir(parents=True, exist_ok=True)
    root = TrajectoryWriter(directory / f"{run_id}.jsonl", metadata(run_id, run_id, "Find the needle in the tree"))
    root.iteration(iteration_record(1, prose="Looking around.", code="print(len(context))", stdout="100\n"))
    calls = [{"root_model": "openai/root", "prompt": f"sub-task {n}", "response": "NONE",
              "usage_summary": {"tokens": 10, "child_run_id": f"{run_id}.{n}"}, "execution_time": 0.5} for n in (1, 2)]
    calls.append({"root_model": "openai/sub", "prompt": "plain question", "response": "plain reply",
                  "usage_summary": {"input_tokens": 7, "output_tokens": 3, "cost_usd": 0.0001}, "execution_time": 0.2})
    root.iteration(iteration_record(2, prose="Fanning out.", code="rlm_query_batched(tasks)", stdout="done\n",
                                    calls=calls))
    root.iteration(iteration_record(3, prose="Done.", code="answer['content'] = 'x'", stdout="", final="root-answer"))
    for child_id, word in ((f"{run_id}.1", "zebra-word"), (f"{run_id}.2", "yak-word"), (f"{run_id}.2.3", "xerus-word")):
        writer = TrajectoryWriter(directory / f"{child_id}.jsonl",
                                  metadata(child_id, run_id, f"sub-task for {child_id}"))
        writer.iteration(iteration_record(1, prose="Child step.", code=f"print('{word}')", stdout=f"{word}\n"))
        writer.finish(status="completed", answer=f"answer of {child_id}", limit=None, error=None, iterations=1,
                      elapsed_s=1.0, usage=None, subcalls=None)
    root.finish(status="completed", answer="root-answer", limit=None, error=None, iterations=3, elapsed_s=5.0,
                usage={"openai/root": {"calls": 3, "input_tokens": 6000, "output_tokens": 150, "cost_usd": 0.003}},
                subcalls=3)
    return root.path


# ----- the browser --------------------------------------------------------------------------------

@dataclass
class Viewer:
    """A page plus what its console said."""

    page: Any
    problems: list[str] = field(default_factory=list)

    def open(self, target: Path | str) -> None:
        url = target.resolve().as_uri() if isinstance(target, Path) else target
        self.page.goto(url)
        self.page.wait_for_selector("html[data-ready]", timeout=10_000)

    def assert_clean(self) -> None:
        assert self.problems == [], f"the page logged errors: {self.problems}"

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 1_000
        return path


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            _unavailable(f"chromium at {CHROMIUM} did not start: {exc}")
        yield launched
        launched.close()


@pytest.fixture
def viewer(browser: Any) -> Iterator[Viewer]:
    """A fresh page (own context) whose console errors and page errors are collected."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    seen = Viewer(page)
    page.on("console", lambda message: seen.problems.append(f"console.{message.type}: {message.text}")
            if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: seen.problems.append(f"pageerror: {error}"))
    yield seen
    context.close()
