"""The REPL worker that runs inside every sandbox.

Standard library only: this file is executed as a script (``python3 -I worker.py``) by the
local backend, inside Docker containers and inside Daytona sandboxes, so it must not import
anything from ``rlm_mcp``.

Protocol: JSON objects, one per line, over the process's *original* stdin and stdout. At start
the worker duplicates those two descriptors for itself and points fd 0 at /dev/null and fd 1 at
a private capture file, so nothing user code does with ``print``, ``sys.stdout``,
``contextlib.redirect_stdout``, ``os.write(1, ...)`` or subprocesses can reach the channel.

host -> worker: ``init``, ``exec``, ``reply``, ``interrupt``, ``shutdown``
worker -> host: ``ready``, ``call`` (llm_query / rlm_query), ``result``, ``fatal``

Options (all optional; the local backend uses them, Docker and Daytona need none):
``--context-fd N`` reads the context from inherited descriptor N instead of ``init``'s
``context_path`` (the sandbox's user may not be allowed to open the store's file);
``--site-dir PATH`` adds a site directory (the server's packages, reached through a descriptor);
``--max-processes N`` caps the processes of the sandbox's user (counted per user namespace).

Over 500 lines on purpose: it is shipped as one file (bind-mounted into containers, uploaded to
Daytona) and runs without the package, so it cannot be split into modules.
"""

from __future__ import annotations

import ast
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

RESERVED_FUNCTIONS = (
    "llm_query",
    "llm_query_batched",
    "rlm_query",
    "rlm_query_batched",
    "SHOW_VARS",
    "FINAL",
    "FINAL_VAR",
)
RESERVED_NAMES = frozenset(RESERVED_FUNCTIONS + ("context", "context_paths", "answer"))
LOCALS_SHOWN = 40
REPR_CHARS = 160


class SubcallError(RuntimeError):
    """Raised in user code when the host could not serve ``llm_query`` / ``rlm_query``."""


class MessageTooLarge(ValueError):
    """A message is over the host's limit; the host would kill a worker that sent it."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size / 2**20:.1f} MB, over the {limit / 2**20:g} MB limit for one "
                         "message to the host (RLM_MCP_MAX_MESSAGE_MB)")
        self.size = size
        self.limit = limit


class BoundedText(io.TextIOBase):
    """A text sink that keeps the first ``limit`` characters and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        room = self.limit - self.kept
        if room > 0:
            piece = text[:room]
            self.parts.append(piece)
            self.kept += len(piece)
            self.dropped += len(text) - len(piece)
        else:
            self.dropped += len(text)
        return len(text)

    def getvalue(self) -> str:
        return "".join(self.parts)


class Channel:
    """The private JSON-lines channel to the host, safe to use from several threads."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._in = os.fdopen(read_fd, "rb", buffering=1 << 16)
        self._out = os.fdopen(write_fd, "wb", buffering=0)
        self._write_lock = threading.Lock()
        self.limit = 1 << 20  # bytes per message; the host's real limit arrives with "init"

    def send(self, message: dict[str, Any]) -> None:
        """Write one message, or raise MessageTooLarge (nothing written) if it is over the limit."""
        data = json.dumps(message, ensure_ascii=False, default=str).encode("utf-8", "replace")
        if len(data) > self.limit:
            raise MessageTooLarge(len(data), self.limit)
        with self._write_lock:
            self._out.write(data + b"\n")

    def receive(self) -> dict[str, Any] | None:
        line = self._in.readline()
        if not line:
            return None
        return json.loads(line)


class PendingCalls:
    """Sub-calls waiting for the host's reply, keyed by call id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiting: dict[int, dict[str, Any]] = {}
        self._events: dict[int, threading.Event] = {}

    def open(self) -> tuple[int, threading.Event]:
        with self._lock:
            self._next_id += 1
            call_id = self._next_id
            event = threading.Event()
            self._events[call_id] = event
            return call_id, event

    def deliver(self, call_id: int, reply: dict[str, Any]) -> None:
        with self._lock:
            event = self._events.pop(call_id, None)
            if event is None:
                return  # a reply to a call abandoned by an interrupt: drop it
            self._waiting[call_id] = reply
        event.set()

    def take(self, call_id: int) -> dict[str, Any]:
        with self._lock:
            return self._waiting.pop(call_id)

    def abandon(self, call_ids: list[int]) -> None:
        with self._lock:
            for call_id in call_ids:
                self._events.pop(call_id, None)
                self._waiting.pop(call_id, None)

    def fail_all(self, reason: str) -> None:
        with self._lock:
            events = list(self._events.items())
            self._events.clear()
            for call_id, _ in events:
                self._waiting[call_id] = {"ok": False, "error": reason}
        for _, event in events:
            event.set()


class Repl:
    """A persistent Python namespace with the RLM helper functions bound into it."""

    def __init__(self, channel: Channel, calls: PendingCalls) -> None:
        self.channel = channel
        self.calls = calls
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.final: str | None = None
        self.context: Any = ""
        self.context_paths: list[str] = []
        self.max_output_chars = 20_000
        self._bind_reserved()

    # ----- context -------------------------------------------------------------------------

    def load_context(self, path: str | int | None, kind: str) -> None:
        """Load from a path, or from an open descriptor (read once, then closed)."""
        if path is None:
            self.context = "" if kind == "text" else []
        elif kind == "documents":
            texts: list[str] = []
            paths: list[str] = []
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        document = json.loads(line)
                        paths.append(document["path"])
                        texts.append(document["text"])
            self.context = texts
            self.context_paths = paths
        else:
            with open(path, encoding="utf-8", newline="") as handle:
                self.context = handle.read()
        self.namespace["context"] = self.context
        self.namespace["context_paths"] = self.context_paths

    # ----- helpers visible to user code ------------------------------------------------------

    def _bind_reserved(self) -> None:
        # Bound methods are created anew on each attribute access: keep one of each so that
        # restore_reserved() can tell by identity whether user code rebound a name.
        self.helpers: dict[str, Any] = {
            "llm_query": self.llm_query,
            "llm_query_batched": self.llm_query_batched,
            "rlm_query": self.rlm_query,
            "rlm_query_batched": self.rlm_query_batched,
            "SHOW_VARS": self.show_vars,
            "FINAL": self.final_answer,
            "FINAL_VAR": self.final_var,
        }
        self.namespace.update(self.helpers)
        self.namespace.setdefault("answer", {"content": "", "ready": False})

    def _call_many(self, op: str, prompts: list[Any], model: str | None) -> list[dict[str, Any]]:
        opened = []
        for prompt in prompts:
            call_id, event = self.calls.open()
            opened.append((call_id, event))
            text = str(prompt)
            try:
                if len(text) > self.channel.limit:  # too long whatever its encoding: skip encoding it
                    raise MessageTooLarge(len(text), self.channel.limit)
                self.channel.send({"type": "call", "id": call_id, "op": op, "prompt": text, "model": model})
            except MessageTooLarge as exc:
                self.calls.deliver(call_id, {"ok": False, "error": (
                    f"the prompt is too large to send: {exc}; split it into smaller prompts")})
        try:
            replies = []
            for call_id, event in opened:
                event.wait()
                replies.append(self.calls.take(call_id))
            return replies
        except BaseException:
            self.calls.abandon([call_id for call_id, _ in opened])
            raise

    def llm_query(self, prompt: str, model: str | None = None) -> str:
        """Ask a sub-model one question; returns its reply text."""
        reply = self._call_many("llm_query", [prompt], model)[0]
        if not reply.get("ok"):
            raise SubcallError(reply.get("error", "sub-call failed"))
        return reply["text"]

    def llm_query_batched(self, prompts: list[str], model: str | None = None) -> list[str]:
        """Ask many questions concurrently; replies keep the order, failures come back as
        strings starting with 'Error:'."""
        if isinstance(prompts, str):
            raise TypeError("llm_query_batched takes a list of prompts; use llm_query for one")
        replies = self._call_many("llm_query", list(prompts), model)
        return [r["text"] if r.get("ok") else f"Error: {r.get('error')}" for r in replies]

    def rlm_query(self, prompt: str, model: str | None = None) -> str:
        """Hand a sub-task to a child RLM whose `context` is `prompt`."""
        reply = self._call_many("rlm_query", [prompt], model)[0]
        if not reply.get("ok"):
            raise SubcallError(reply.get("error", "sub-call failed"))
        return reply["text"]

    def rlm_query_batched(self, prompts: list[str], model: str | None = None) -> list[str]:
        """Run several child RLMs concurrently; failures come back as 'Error: ...' strings."""
        if isinstance(prompts, str):
            raise TypeError("rlm_query_batched takes a list of prompts; use rlm_query for one")
        replies = self._call_many("rlm_query", list(prompts), model)
        return [r["text"] if r.get("ok") else f"Error: {r.get('error')}" for r in replies]

    def final_answer(self, value: Any) -> None:
        """Submit the final answer and end the run."""
        self.final = str(value)

    def final_var(self, name: Any) -> None:
        """Submit the value of the REPL variable `name` as the final answer."""
        key = str(name).strip().strip("'\"")
        if key not in self.namespace:
            raise NameError(f"FINAL_VAR: no variable named {key!r} in the REPL")
        self.final = str(self.namespace[key])

    def show_vars(self) -> None:
        """Print the user variables in the REPL with their types and sizes."""
        summary = self.locals_summary()
        if not summary:
            print("(no user variables)")
        for name, description in summary.items():
            print(f"{name}: {description}")

    # ----- execution -------------------------------------------------------------------------

    def user_variables(self) -> dict[str, Any]:
        return {
            name: value
            for name, value in self.namespace.items()
            if not name.startswith("_") and name not in RESERVED_NAMES
            and type(value).__name__ not in ("module", "function", "type", "builtin_function_or_method")
        }

    def locals_summary(self) -> dict[str, str]:
        shown: dict[str, str] = {}
        for name, value in list(self.user_variables().items())[:LOCALS_SHOWN]:
            try:
                text = repr(value)
            except Exception as exc:  # a user object whose repr fails
                text = f"<repr failed: {exc}>"
            if len(text) > REPR_CHARS:
                text = text[:REPR_CHARS] + f"... ({len(text)} chars)"
            try:
                size = f", len {len(value)}"
            except Exception:  # not sized, or a broken __len__
                size = ""
            shown[name] = f"{type(value).__name__}{size} = {text}"
        return shown

    def restore_reserved(self) -> list[str]:
        """Put back helper names that user code rebound; return the names restored."""
        restored = []
        expected = dict(self.helpers, context=self.context, context_paths=self.context_paths)
        for name, value in expected.items():
            if self.namespace.get(name) is not value:
                self.namespace[name] = value
                restored.append(name)
        if not isinstance(self.namespace.get("answer"), dict):
            self.namespace["answer"] = {"content": "", "ready": False}
            restored.append("answer")
        return restored

    def run_cell(self, code: str) -> tuple[str | None, float]:
        """Execute `code`; an expression on the last line is echoed like an interactive REPL."""
        started = time.perf_counter()
        error = None
        try:
            tree = ast.parse(code, "<repl>", "exec")
            echo = None
            last = tree.body[-1] if tree.body else None
            if isinstance(last, ast.Expr):
                tree.body.pop()
                echo = ast.Expression(last.value)
            exec(compile(tree, "<repl>", "exec"), self.namespace)
            if echo is not None:
                value = eval(compile(echo, "<repl>", "eval"), self.namespace)
                if value is not None:
                    print(repr(value))
        except KeyboardInterrupt:
            error = "KeyboardInterrupt: the cell was interrupted (time limit); REPL state is kept"
        except BaseException:  # SystemExit included: user code must not end the worker
            error = _format_user_traceback()
        return error, time.perf_counter() - started

    def answer_state(self) -> tuple[str | None, str | None]:
        """(final answer or None, draft answer or None) after a cell."""
        answer = self.namespace.get("answer")
        draft = None
        if isinstance(answer, dict):
            content = answer.get("content")
            if answer.get("ready"):
                return str(content if content is not None else ""), None
            if content not in (None, ""):
                draft = str(content)
        return self.final, draft


def _format_user_traceback() -> str:
    kind, value, tb = sys.exc_info()
    frames = [f for f in traceback.extract_tb(tb) if f.filename == "<repl>"]
    lines = ["Traceback (most recent call last):\n"]
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(kind, value)
    return "".join(lines).rstrip()


class Worker:
    def __init__(self, context_fd: int | None = None) -> None:
        self.context_fd = context_fd
        # Keep the protocol on private descriptors; fd 0 and fd 1 become harmless.
        proto_in, proto_out = os.dup(0), os.dup(1)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.close(null_fd)
        self.capture = tempfile.TemporaryFile()
        os.dup2(self.capture.fileno(), 1)
        sys.stdin = open(os.devnull)
        self.channel = Channel(proto_in, proto_out)
        self.calls = PendingCalls()
        self.repl = Repl(self.channel, self.calls)
        self.jobs: list[dict[str, Any]] = []
        self.jobs_ready = threading.Condition()
        self.closed = False
        main_thread = threading.main_thread().ident
        assert main_thread is not None  # set once a thread has started, and the main one has
        self.main_thread = main_thread

    def reader(self) -> None:
        """Route host messages: replies go to waiting calls, the rest to the main thread."""
        while True:
            try:
                message = self.channel.receive()
            except ValueError:
                message = {"type": "shutdown", "reason": "malformed message from host"}
            if message is None or message.get("type") == "shutdown":
                self.calls.fail_all("the host closed the channel")
                with self.jobs_ready:
                    self.closed = True
                    self.jobs_ready.notify_all()
                return
            kind = message.get("type")
            if kind == "reply":
                self.calls.deliver(int(message["id"]), message)
            elif kind == "interrupt":
                signal.pthread_kill(self.main_thread, signal.SIGINT)
            else:
                with self.jobs_ready:
                    self.jobs.append(message)
                    self.jobs_ready.notify()

    def next_job(self) -> dict[str, Any] | None:
        with self.jobs_ready:
            while not self.jobs and not self.closed:
                self.jobs_ready.wait()
            return self.jobs.pop(0) if self.jobs else None

    def serve(self) -> None:
        threading.Thread(target=self.reader, name="rlm-channel", daemon=True).start()
        while True:
            try:
                job = self.next_job()
                if job is None:
                    return
                self.handle(job)
            except KeyboardInterrupt:
                continue  # an interrupt that arrived between cells

    def handle(self, job: dict[str, Any]) -> None:
        kind = job.get("type")
        if kind == "init":
            self.repl.max_output_chars = int(job.get("max_output_chars", 20_000))
            self.channel.limit = int(job.get("max_message_bytes", self.channel.limit))
            try:
                source = self.context_fd if self.context_fd is not None else job.get("context_path")
                self.context_fd = None  # a descriptor is read once; a second init has no context
                self.repl.load_context(source, job.get("context_kind", "text"))
            except OSError as exc:
                self.channel.send({"type": "fatal", "error": f"cannot load context file "
                                   f"{job.get('context_path')}: {exc.strerror or exc}"})
                return
            except Exception as exc:  # malformed documents file
                self.channel.send({"type": "fatal", "error": f"cannot load context file "
                                   f"{job.get('context_path')}: {exc!r}"})
                return
            context = self.repl.context
            self.channel.send(
                {
                    "type": "ready",
                    "pid": os.getpid(),
                    "python": sys.version.split()[0],
                    "context_chars": len(context) if isinstance(context, str) else sum(map(len, context)),
                }
            )
        elif kind == "exec":
            self.execute(job)
        else:
            self.channel.send({"type": "fatal", "error": f"unknown message type {kind!r}"})

    def execute(self, job: dict[str, Any]) -> None:
        limit = int(job.get("max_output_chars", self.repl.max_output_chars))
        out, err = BoundedText(limit), BoundedText(limit)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        self.repl.final = None
        try:
            error, elapsed = self.repl.run_cell(job.get("code", ""))
        finally:
            sys.stdout, sys.stderr = saved
        self._drain_fd_output(out)
        restored = self.repl.restore_reserved()
        final, draft = self.repl.answer_state()
        notices = []
        if restored:
            notices.append(f"note: reserved names restored after being overwritten: {', '.join(restored)}")
        result = {
            "type": "result",
            "cell": job.get("cell"),
            "stdout": out.getvalue(),
            "stdout_dropped": out.dropped,
            "stderr": err.getvalue(),
            "stderr_dropped": err.dropped,
            "error": error,
            "final": final,
            "draft": draft,
            "notices": notices,
            "locals": self.repl.locals_summary(),
            "elapsed": elapsed,
        }
        try:
            self.channel.send(result)
        except MessageTooLarge as exc:
            # Only the answer is unbounded (output and locals are cut to size): report instead
            # of sending it, so the REPL and its variables survive.
            too_large = (f"The cell's answer could not be sent to the host: the result is {exc}. "
                         "Submit a shorter answer, or raise RLM_MCP_MAX_MESSAGE_MB.")
            result.update(final=None, draft=None, error=f"{error}\n{too_large}" if error else too_large)
            try:
                self.channel.send(result)
            except MessageTooLarge:  # a limit below max_output_chars: the report alone
                self.channel.send({"type": "result", "cell": job.get("cell"), "error": too_large,
                                   "elapsed": elapsed})

    def _drain_fd_output(self, sink: BoundedText) -> None:
        """Append what was written straight to fd 1 (os.write, subprocesses) during the cell."""
        size = self.capture.seek(0, io.SEEK_END)
        if size:
            self.capture.seek(0)
            data = self.capture.read(sink.limit * 4 + 4)
            sink.write(data.decode("utf-8", "replace"))
            sink.dropped += max(0, size - len(data))
            self.capture.seek(0)
            self.capture.truncate()


def main(argv: list[str]) -> None:
    # Parsed by hand: argparse would add its imports to every sandbox start.
    options: dict[str, list[str]] = {"--context-fd": [], "--site-dir": [], "--max-processes": []}
    pairs = iter(argv)
    for name in pairs:
        value = next(pairs, None)
        if name not in options or value is None:
            sys.exit(f"worker.py: unknown option or missing value: {name}")
        options[name].append(value)
    if options["--max-processes"]:
        import resource

        limit = int(options["--max-processes"][-1])
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    if options["--site-dir"]:
        import site

        for directory in options["--site-dir"]:
            site.addsitedir(directory)
    context_fd = int(options["--context-fd"][-1]) if options["--context-fd"] else None
    Worker(context_fd).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
