"""An OpenAI-compatible chat-completions server that plays a scripted RLM policy.

For tests, benchmarks and trying rlm-mcp without a provider: litellm reaches it over real HTTP
(``RLM_MCP_API_BASE=http://127.0.0.1:PORT/v1``, model ``openai/<policy>``). Standard library only.

Policies are chosen by the model name the client asks for:

* ``needle`` (default): probe the context, cut it into chunks, ``llm_query_batched`` every chunk
  asking for the secret code, answer through the ``answer`` dict.
* ``needle-final``: the same, answering with a ``FINAL(...)`` line outside code.
* ``recursive``: hand each chunk to a child RLM with ``rlm_query_batched``; children run ``needle``.
* ``count``: over a document list, count documents mentioning the secret code (aggregation).

Any model name can instead be given an explicit script of replies and faults with
:meth:`ScriptedModelServer.script`. Sub-calls (requests without an RLM system prompt) answer
with the secret code found in the prompt, or ``NONE``.

Run standalone: ``python -m rlm_mcp.testing.model_server --port 8321 --latency-ms 50``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, cast

SECRET_PATTERN = re.compile(r"secret code is ([A-Za-z0-9_-]+)")
CHUNK_CHARS = 400_000
RLM_MARKERS = ("REPL", "repl")


def secret_needle(code: str) -> str:
    """The sentence tests hide in a haystack; the policies look for it."""
    return f" The secret code is {code}. "


@dataclass
class Fault:
    """A scripted failure: an HTTP status with an error body, and/or extra delay."""

    status: int = 500
    message: str = "scripted failure"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # e.g. {"Retry-After": "1"}


Reply = str | Fault | Callable[[list[dict[str, Any]]], str]


class Gate:
    """A scripted reply held until the test opens it: a run that must still be running (or a
    run behind it still queued) when the test looks, without racing the clock.

    ``arrived`` is set once the request is in; a gate never opened gives its text after
    ``timeout_s`` so a failed test does not leave a server thread waiting forever."""

    def __init__(self, text: str, timeout_s: float = 120.0) -> None:
        self.text = text
        self.timeout_s = timeout_s
        self.arrived = threading.Event()
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        self.arrived.set()
        self._open.wait(self.timeout_s)
        return self.text


@dataclass
class Stats:
    calls: int = 0
    root_calls: int = 0
    sub_calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_chars: int = 0
    refused: int = 0  # answered with the overload fault (more than max_in_flight at once)
    by_model: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    requests: list[dict[str, Any]] = field(default_factory=list)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def is_rlm_root_call(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "system" and any(k in _text(m) for k in RLM_MARKERS) for m in messages)


def answer_subcall(messages: list[dict[str, Any]]) -> str:
    prompt = "\n".join(_text(m) for m in messages)
    if "COUNT_DOCS" in prompt:
        return str(len(SECRET_PATTERN.findall(prompt)))
    match = SECRET_PATTERN.search(prompt)
    return match.group(1) if match else "NONE"


def _fence(code: str) -> str:
    return f"```repl\n{code.strip()}\n```"


PROBE = _fence("print(type(context).__name__, len(context))")

# Both policies start by cutting the context into pieces of {chunk} characters (or per document).
CUT = """
chunk = {chunk}
if isinstance(context, str):
    pieces = [context[i:i + chunk] for i in range(0, len(context), chunk)]
else:
    pieces = list(context)"""

SCAN = CUT + """
prompts = ["Find the secret code in the text below. Reply with only the code, or NONE.\\n\\n" + p
           for p in pieces]
replies = llm_query_batched(prompts)
found = [r.strip() for r in replies if r.strip() not in ("NONE", "")]
print(len(pieces), "chunks,", len(found), "hits")
"""

# A child RLM is recognised from its prompt when the host shows it (rlm-mcp puts the start of the
# prompt in the child's query); hosts that show a child only its context's shape (the reference
# implementation) run this same step, which then recognises the child from ``context`` itself.
RECURSE = CUT + """
if isinstance(context, str) and context.startswith("CHILD TASK"):
    replies = llm_query_batched(["Find the secret code in the text below. Reply with only the code, or NONE.\\n\\n" + p
                                 for p in pieces])
    missing = "NONE"
else:
    replies = rlm_query_batched(
        ["CHILD TASK: find the secret code in this text; answer with the code or NONE.\\n\\n" + p
         for p in pieces])
    missing = "not found"
found = [r.strip() for r in replies if r.strip() not in ("NONE", "")]
print(len(pieces), "pieces,", len(found), "hits")
"""

COUNT = """
replies = llm_query_batched(["COUNT_DOCS: how many secret codes are in this document?\\n\\n" + d
                             for d in context])
total = sum(int(r) for r in replies if r.strip().isdigit())
answer["content"] = str(total)
answer["ready"] = True
"""


def rlm_policy(policy: str, messages: list[dict[str, Any]]) -> str:
    """The next root-model reply for a named policy, from the conversation so far."""
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    is_child = "CHILD TASK" in "".join(_text(m) for m in messages if m.get("role") == "user")
    if policy == "recursive" and not is_child:
        steps = [PROBE, _fence(RECURSE.format(chunk=CHUNK_CHARS) +
                               "\nanswer['content'] = found[0] if found else missing\nanswer['ready'] = True")]
    elif policy == "count":
        steps = [PROBE, _fence(COUNT)]
    elif policy == "needle-final":
        steps = [PROBE, _fence(SCAN.format(chunk=CHUNK_CHARS) + "\nresult = found[0] if found else 'not found'"),
                 "The scan is done.\nFINAL_VAR(result)"]
    else:
        missing = "NONE" if is_child else "not found"
        steps = [PROBE, _fence(SCAN.format(chunk=CHUNK_CHARS) +
                               f"\nanswer['content'] = found[0] if found else {missing!r}"
                               "\nanswer['ready'] = True")]
    if turn < len(steps):
        return steps[turn]
    return "FINAL(not found)"


class ScriptedModelServer:
    """Start with ``with ScriptedModelServer() as server:``; ``server.api_base`` is the URL."""

    def __init__(self, latency_s: float = 0.0, host: str = "127.0.0.1", port: int = 0,
                 max_in_flight: int | None = None, overload: Fault | None = None) -> None:
        self.latency_s = latency_s
        self.stats = Stats()
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._record = False
        self.max_in_flight: int | None = None
        self.overload = DEFAULT_OVERLOAD
        self.set_capacity(max_in_flight, overload)
        self._httpd = _Httpd((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        host, port = cast(tuple[str, int], self._httpd.server_address[:2])
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "ScriptedModelServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(self, model: str, replies: list[Reply]) -> None:
        """Queue replies for a model name (consumed in order; then the named policy applies)."""
        with self._lock:
            self._scripts[model].extend(replies)

    def set_capacity(self, max_in_flight: int | None, overload: Fault | None = None) -> None:
        """Refuse requests beyond ``max_in_flight`` at once with ``overload`` (default: 429 with
        ``Retry-After``), as a provider's concurrency limit does; None serves everything."""
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        with self._lock:
            self.max_in_flight = max_in_flight
            self.overload = overload or DEFAULT_OVERLOAD

    def record_requests(self, on: bool = True) -> None:
        """Keep every request body in ``stats.requests`` (off by default: bodies can be large)."""
        self._record = on

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = Stats()

    def _next_reply(self, model: str, messages: list[dict[str, Any]]) -> Reply:
        with self._lock:
            queue = self._scripts.get(model)
            if queue:
                return queue.popleft()
        if is_rlm_root_call(messages):
            return rlm_policy(model.split("/")[-1], messages)
        return answer_subcall(messages)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle's algorithm the body waits for the
            # client's delayed ACK, adding ~40 ms to every call on a kept-alive connection.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                return

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "needle", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    self._send(400, {"error": {"message": "invalid JSON"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                server._serve_completion(self, body)

        return Handler

    def _serve_completion(self, handler: Any, body: dict[str, Any]) -> None:
        model = str(body.get("model", ""))
        messages = list(body.get("messages") or [])
        prompt_chars = sum(len(_text(m)) for m in messages)
        root = is_rlm_root_call(messages)
        with self._lock:
            stats = self.stats
            stats.calls += 1
            stats.root_calls += root
            stats.sub_calls += not root
            stats.in_flight += 1
            refuse = self.max_in_flight is not None and stats.in_flight > self.max_in_flight
            overload = self.overload
            stats.refused += refuse
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            stats.prompt_chars += prompt_chars
            stats.by_model[model] += 1
            if self._record:
                stats.requests.append(body)
        try:
            if refuse:
                if overload.delay_s:
                    time.sleep(overload.delay_s)
                handler._send(overload.status, _error_body(overload), overload.headers)
                return
            reply = self._next_reply(model, messages)
            delay = self.latency_s + (reply.delay_s if isinstance(reply, Fault) else 0.0)
            if delay:
                time.sleep(delay)
            if isinstance(reply, Fault):
                handler._send(reply.status, _error_body(reply), reply.headers)
                return
            text = reply(messages) if callable(reply) else reply
            handler._send(200, {
                "id": f"chatcmpl-{stats.calls}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": max(1, prompt_chars // 4),
                          "completion_tokens": max(1, len(text) // 4),
                          "total_tokens": max(1, prompt_chars // 4) + max(1, len(text) // 4)},
            })
        finally:
            with self._lock:
                stats.in_flight -= 1


def _error_body(fault: Fault) -> dict[str, Any]:
    return {"error": {"message": fault.message, "type": "scripted", "code": str(fault.status)}}


DEFAULT_OVERLOAD = Fault(429, "rate limited: too many requests in flight", headers={"Retry-After": "0.5"})


class _Httpd(ThreadingHTTPServer):
    # The default listen backlog (5) overflows when 32 clients connect at once: the kernel then
    # resets connections and clients see spurious connection errors.
    request_queue_size = 128
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="answer 429 with Retry-After to requests beyond this many at once")
    args = parser.parse_args()
    with ScriptedModelServer(args.latency_ms / 1000, args.host, args.port,
                             max_in_flight=args.max_in_flight) as server:
        print(f"scripted model server on {server.api_base}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
