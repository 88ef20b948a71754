"""Command line: ``rlm-mcp`` (stdio server), ``rlm-mcp serve``, ``rlm-mcp run``, ``rlm-mcp sandbox build``,
``rlm-mcp sandbox daytona-snapshot``.

Kept light: nothing here imports litellm, mcp or docker until a command needs them, so
``rlm-mcp --help`` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlm_mcp import __version__
from rlm_mcp.config import SANDBOX_NAMES, Limits, Settings, read_prompt_file
from rlm_mcp.errors import ConfigError, RlmError

log = logging.getLogger("rlm_mcp")

SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8765


def _limit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits (defaults from RLM_MCP_* variables)")
    d = Limits()  # the defaults shown are the ones config.py applies when a variable is unset
    group.add_argument("--max-iterations", type=int, help=f"root-model turns (default {d.max_iterations})")
    group.add_argument("--max-depth", type=int, help=f"1 = no child RLMs; 2 = rlm_query starts children (default {d.max_depth})")
    group.add_argument("--cell-timeout", type=float, dest="cell_timeout_s",
                       help=f"seconds per code block (default {d.cell_timeout_s:g}, or --timeout if lower)")
    group.add_argument("--timeout", type=float, dest="timeout_s", help=f"seconds for the whole run (default {d.timeout_s:g})")
    group.add_argument("--max-subcalls", type=int, help="llm_query calls over the whole run tree")
    group.add_argument("--max-errors", type=int, help="code blocks failing in a row that end the run (default: no limit)")
    group.add_argument("--max-tokens", type=int, help="input+output tokens over the whole run tree")
    group.add_argument("--max-cost", type=float, dest="max_cost_usd", help="USD over the whole run tree")
    group.add_argument("--max-output-chars", type=int, help=f"REPL output shown to the model per block (default {d.max_output_chars})")
    group.add_argument("--concurrency", type=int, dest="max_concurrency", help=f"sub-calls in flight (default {d.max_concurrency})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlm-mcp",
        description="Recursive Language Models over huge inputs, as an MCP server and a CLI. "
                    "With no command, serves MCP over stdio (what Claude Desktop launches).")
    parser.add_argument("--version", action="version", version=f"rlm-mcp {__version__}")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="serve MCP (stdio by default)")
    serve.add_argument("--transport", choices=("stdio", "sse", "http"), default="stdio")
    serve.add_argument("--host", default=SERVE_HOST, help=f"bind address for sse/http (default {SERVE_HOST})")
    serve.add_argument("--port", type=int, default=SERVE_PORT)
    serve.add_argument("--no-auth", action="store_true", default=None,
                       help="sse/http on a loopback address without a bearer token (RLM_MCP_NO_AUTH); by "
                            "default clients must send RLM_MCP_AUTH_TOKEN, or the token generated at start")

    run = commands.add_parser("run", help="answer one question over a file, directory or stdin")
    run.add_argument("question", nargs="?", default="",
                     help="the question (leave it out with --continue-from to resume a run a limit stopped)")
    run.add_argument("--context", help="a file, a directory of documents, or - for stdin (default with "
                                       "--continue-from: that run's context)")
    run.add_argument("--continue-from", metavar="RUN_ID",
                     help="build on a finished run: a follow-up question told its earlier turns, or with no "
                          "question its loop resumed with raised limits (a new process has no REPL to reuse)")
    run.add_argument("--system-prompt-file", metavar="PATH",
                     help="a custom system prompt template (RLM_MCP_SYSTEM_PROMPT_FILE; placeholders in the README)")
    run.add_argument("--model", help="litellm model string for the root model (RLM_MCP_MODEL)")
    run.add_argument("--sub-model", help="model for llm_query sub-calls (RLM_MCP_SUB_MODEL)")
    run.add_argument("--sandbox", choices=SANDBOX_NAMES, help="where the REPL runs (RLM_MCP_SANDBOX)")
    run.add_argument("--include", action="append", help="glob of files to include from a directory")
    run.add_argument("--exclude", action="append", help="glob of files to skip in a directory")
    run.add_argument("--json", action="store_true", help="print the whole result as JSON on stdout")
    run.add_argument("--verbose", "-v", action="store_true",
                     help="print each iteration to stderr as it happens (reply, code, output, sub-calls)")
    run.add_argument("--view", action="store_true", help="open the run's viewer in the browser when it ends")
    _limit_options(run)

    view = commands.add_parser("view", help="write a run's viewer page (HTML) and open it in the browser")
    view.add_argument("run", metavar="RUN_ID|TRAJECTORY_PATH",
                      help="a run id (`rlm-mcp runs` lists them) or a trajectory .jsonl file")
    view.add_argument("--out", help="where to write the page (default: <data dir>/views/<run id>.html)")
    view.add_argument("--no-open", action="store_true", help="only write the page and print its path")

    runs = commands.add_parser("runs", help="list recent runs, newest first")
    runs.add_argument("--json", action="store_true", help="print them as JSON")
    runs.add_argument("--limit", type=int, default=20, help="how many (default 20)")

    sandbox = commands.add_parser("sandbox", help="manage sandbox images")
    sandbox_commands = sandbox.add_subparsers(dest="sandbox_command", required=True)
    build = sandbox_commands.add_parser(
        "build", help="build and tag the Docker sandbox image RLM_MCP_DOCKER_IMAGE (offline when the registry is unreachable)")
    mode = build.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_const", const=True, dest="offline",
                      help="build the base image from Debian packages with debootstrap (needs root)")
    mode.add_argument("--online", action="store_const", const=False, dest="offline",
                      help="require python:3.12-slim from the registry")
    snapshot = sandbox_commands.add_parser("daytona-snapshot", help="create the Daytona snapshot sandboxes start from "
                                                                    "(needs DAYTONA_API_KEY)")
    snapshot.add_argument("--name", help="snapshot name (default RLM_MCP_DAYTONA_SNAPSHOT, else rlm-mcp-sandbox)")
    snapshot.add_argument("--cpu", type=int, help="CPUs (default RLM_MCP_SANDBOX_CPUS, rounded up)")
    snapshot.add_argument("--memory", type=int, help="GiB (default RLM_MCP_SANDBOX_MEMORY_MB, rounded up)")
    snapshot.add_argument("--disk", type=int, help="GiB of disk")
    snapshot.add_argument("--dockerfile", type=Path, help="image definition (default: the packaged daytona/Dockerfile)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.command in (None, "serve"):
            from rlm_mcp.server import serve

            transport = getattr(args, "transport", "stdio")
            if getattr(args, "no_auth", None):
                settings = replace(settings, no_auth=True)
            serve(settings, transport, getattr(args, "host", SERVE_HOST), getattr(args, "port", SERVE_PORT))
        elif args.command == "run":
            sys.exit(asyncio.run(_run(settings, args)))
        elif args.command == "view":
            print(_view(settings, args.run, args.out, open_browser=not args.no_open))
        elif args.command == "runs":
            _runs(settings, args.limit, args.json)
        elif args.command == "sandbox" and args.sandbox_command == "build":
            try:
                from rlm_mcp.sandbox.docker import build_sandbox_image
            except ImportError as exc:  # the wheel without its [docker] extra
                raise ConfigError(f"the Docker backend needs docker-py ({exc}): pip install 'rlm-mcp[docker]'") from exc
            print(build_sandbox_image(settings, offline=args.offline))
        elif args.command == "sandbox":
            from rlm_mcp.sandbox.daytona import create_snapshot

            print(asyncio.run(create_snapshot(settings, name=args.name, cpu=args.cpu, memory_gb=args.memory,
                                              disk_gb=args.disk, dockerfile=args.dockerfile)))
    except RlmError as exc:
        print(f"rlm-mcp: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("rlm-mcp: interrupted", file=sys.stderr)
        sys.exit(130)


class _Progress:
    """One live line on stderr (a line per update when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.last = ""

    def __call__(self, event: Any) -> None:
        message = event.message
        if message == self.last:
            return
        self.last = message
        if self.live:
            sys.stderr.write("\r\033[K" + message)
        else:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.live and self.last:
            sys.stderr.write("\n")


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    from rlm_mcp.engine import ContextShape, RlmEngine, RunRequest, shape_of
    from rlm_mcp.sandbox import ContextFile
    from rlm_mcp.services import Services

    limits = settings.limits.with_overrides(**{name: getattr(args, name) for name in (
        "max_iterations", "max_depth", "cell_timeout_s", "timeout_s", "max_subcalls", "max_tokens",
        "max_cost_usd", "max_output_chars", "max_concurrency", "max_errors")})
    settings = replace(settings, limits=limits)
    if args.system_prompt_file:
        settings = replace(settings, system_prompt=read_prompt_file(args.system_prompt_file, "--system-prompt-file"))
    if not args.context and not args.continue_from:
        raise ConfigError("--context is required (a file, a directory or - for stdin), unless --continue-from "
                          "names a run whose context to use")
    engine = RlmEngine(settings)
    engine.models.start_warm_up()  # litellm imports in a thread while the context loads
    # Check the model, sub-model and sandbox before copying a possibly huge input into the store (the
    # model strings only for shape while litellm still loads; fully at the start of the run).
    given = args.context is not None
    engine.prepare(RunRequest(query=args.question, context=ContextFile(None) if given else None,
                              shape=ContextShape("text", 0) if given else None, model=args.model,
                              sub_model=args.sub_model, sandbox=args.sandbox, limits=limits,
                              continue_from=args.continue_from))
    services = Services.create(settings, engine)
    store = services.store
    subject: dict[str, Any] = {}
    if args.context == "-":
        info = store.load_stream(sys.stdin.buffer, name="stdin", source="stdin")
    elif given:
        info = store.load_path(args.context, include=args.include, exclude=args.exclude)
    if given:
        subject = {"context": store.context_file(info.handle), "shape": shape_of(info)}
    request = RunRequest(query=args.question, model=args.model, sub_model=args.sub_model, sandbox=args.sandbox,
                         limits=limits, continue_from=args.continue_from, **subject)
    progress = _Progress()
    on_event = _Verbose(progress) if args.verbose else progress
    try:
        result = await engine.run(request, on_event=on_event)
    finally:
        progress.close()
        await services.aclose()
    if args.json:
        print(result.model_dump_json(indent=2))
    elif result.answer is not None:
        print(result.answer)
    cost = f", ${result.cost_usd:.4f}" if result.cost_usd is not None else ""
    print(f"rlm-mcp: {result.status}"
          + (f" ({result.limit})" if result.limit else "")
          + f" after {_count(result.iterations, 'iteration')}, {_count(result.subcalls, 'sub-call')}, "
            f"{result.input_tokens + result.output_tokens:,} tokens{cost}, {result.elapsed_s:.1f} s",
          file=sys.stderr)
    if result.error:
        print(f"rlm-mcp: {result.error}", file=sys.stderr)
    print(f"rlm-mcp: trajectory: {result.trajectory_path}", file=sys.stderr)
    if args.view and result.trajectory_path:
        try:
            print(f"rlm-mcp: view: {_view(settings, result.trajectory_path, None, open_browser=True)}",
                  file=sys.stderr)
        except RlmError as exc:  # the answer is out already: the view is a bonus
            print(f"rlm-mcp: could not write the view: {exc}", file=sys.stderr)
    return 0 if result.status == "completed" else 1


def _view(settings: Settings, target: str, out: str | None, *, open_browser: bool) -> str:
    """Write a run's page; returns its path. ``target``: a run id or a trajectory file."""
    from pathlib import Path

    from rlm_mcp.private import private_dir
    from rlm_mcp.viewer import build_view, export_run

    source = Path(target).expanduser()
    if target.endswith(".jsonl") or source.is_file():
        view = build_view(source)
    else:
        view = build_view(settings.home / "trajectories", target)
    if out is None:  # excerpts of the context are in it: next to the trajectories, for this user only
        out = str(private_dir(settings.home / "views") / f"{view['run_id']}.html")
    return str(export_run(view, out, open_browser=open_browser))


def _runs(settings: Settings, limit: int, as_json: bool) -> None:
    import json

    from rlm_mcp.viewer import run_summaries

    summaries = run_summaries(settings.home / "trajectories", max(1, limit))
    if as_json:
        print(json.dumps(summaries, indent=2, ensure_ascii=False))
        return
    if not summaries:
        print(f"no runs in {settings.home / 'trajectories'}", file=sys.stderr)
        return
    for run in summaries:
        elapsed = f"{run['elapsed_s']:.1f} s" if run["elapsed_s"] is not None else "-"
        cost = f"${run['cost_usd']:.4f}" if run["cost_usd"] is not None else "-"
        started = (run["started_at"] or "-")[:19].replace("T", " ")
        query = run["query"] if len(run["query"]) <= 60 else run["query"][:59] + "…"
        print(f"{run['run_id']}  {run['status']:<13} {started:<19} {elapsed:>9} {cost:>9}  {query}")


class _Verbose:
    """``run --verbose``: each iteration of every RLM of the run on stderr as it is written to
    the trajectory; the progress line for everything else. Colour only on a terminal."""

    EXCERPT = 2_000

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress
        colour = sys.stderr.isatty()
        self.dim, self.bold, self.cyan, self.green, self.red, self.reset = (
            ("\033[2m", "\033[1m", "\033[36m", "\033[32m", "\033[31m", "\033[0m") if colour else ("",) * 6)

    def __call__(self, event: Any) -> None:
        if event.kind != "iteration_done" or event.detail is None:
            self.progress(event)
            return
        if self.progress.live and self.progress.last:
            sys.stderr.write("\r\033[K")
            self.progress.last = ""  # redrawn by the next event
        sys.stderr.write(self.render(event.detail))
        sys.stderr.flush()

    def cut(self, text: Any) -> str:
        text = "" if text is None else str(text)
        return text if len(text) <= self.EXCERPT else text[:self.EXCERPT] + f"... [+{len(text) - self.EXCERPT:,} chars]"

    def render(self, record: Any) -> str:
        from rlm_mcp.engine.replies import prose

        usage = record.get("usage") or {}
        rlm = record.get("rlm_id") or ""
        who = "root" if "." not in rlm else f"child {rlm}"
        lines = [f"{self.bold}{self.cyan}── iteration {record.get('iteration')} ({who}){self.reset} {self.dim}"
                 f"{record.get('iteration_time') or 0:.1f} s, {usage.get('input_tokens') or 0:,} in / "
                 f"{usage.get('output_tokens') or 0:,} out tokens{self.reset}"]
        words = prose(record.get("response") or "").strip()
        if words:
            lines.append(self.cut(words))
        for block in record.get("code_blocks") or []:
            result = block.get("result") or {}
            lines.append(f"{self.dim}>>> code{self.reset}")
            lines.append(self.cut(block.get("code")).rstrip())
            output = (result.get("stdout") or "").rstrip()
            if output:
                lines.append(f"{self.dim}--- output{self.reset}")
                lines.append(self.cut(output))
            if result.get("stderr"):
                lines.append(f"{self.red}--- stderr{self.reset}")
                lines.append(self.cut(result["stderr"]).rstrip())
            calls = result.get("rlm_calls") or []
            if calls:
                children = sum(1 for c in calls if (c.get("usage_summary") or {}).get("child_run_id"))
                lines.append(f"{self.dim}--- {_count(len(calls), 'sub-call')}"
                             + (f" ({_count(children, 'child RLM')})" if children else "") + self.reset)
        if record.get("final_answer") is not None:
            lines.append(f"{self.green}{self.bold}FINAL ANSWER:{self.reset} {self.cut(record['final_answer'])}")
        return "\n".join(lines) + "\n"


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" + ("" if number == 1 else "s")
