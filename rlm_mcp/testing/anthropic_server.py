"""A scripted Anthropic Messages API that plays a host agent driving rlm-mcp's tools.

Point a real MCP host at it (Claude Code: ``ANTHROPIC_BASE_URL=http://127.0.0.1:PORT``) and give
the host a prompt with two lines::

    FILE: /path/to/a/large/file
    QUESTION: What is the secret code?

The scripted "model" then does what a host agent should: ``rlm_load_context(path=FILE)``, then
``rlm_complete(handle, QUESTION)``, polls ``rlm_get_result`` while the run is running or queued,
pages through ``rlm_get_trajectory`` one iteration at a time, and ends with a text reply
``RLM ANSWER: <answer>``. It reads each tool result the way the host delivers it (Claude Code
sends ``JSON.stringify(structuredContent)`` as the tool_result text), so the script parses the
JSON it receives; anything it cannot parse ends the conversation with a reply that says so.

Every request is recorded (method, path, selected headers, body) with what the agent saw in
each tool result, for tests to assert on. Routes it does not know are logged and answered 404
with an Anthropic-style error body. Requests that carry no rlm tools (titles, summaries, quota
probes a host may send) get a short text reply.

Serves ``POST /v1/messages`` (streaming SSE and plain JSON) and
``POST /v1/messages/count_tokens``. Standard library only.

Run standalone: ``python -m rlm_mcp.testing.anthropic_server --port 8322``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

TOOL_SUFFIXES = ("rlm_load_context", "rlm_complete", "rlm_get_result", "rlm_get_trajectory")
SEARCH_TOOL = "ToolSearch"  # Claude Code's loader for deferred tools
PROMPT_FIELD = re.compile(r"^\s*(FILE|QUESTION|WAIT_S|POLL_WAIT_S)\s*:\s*(.+?)\s*$", re.MULTILINE)
ANSWER_PREFIX = "RLM ANSWER: "
FAILURE_PREFIX = "HOST AGENT STOPPED: "
RECORDED_HEADERS = ("user-agent", "anthropic-version", "anthropic-beta", "x-api-key", "authorization",
                    "content-type", "x-app")
MAX_TRAJECTORY_PAGES = 50  # a runaway pager ends the conversation instead of looping


@dataclass
class Observation:
    """One tool result as the agent received it."""

    tool: str
    tool_use_id: str
    raw: str
    is_error: bool
    parsed: Any = None
    parse_error: str | None = None


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Reply:
    """What the scripted model says next: text, or text plus one tool call."""

    text: str = ""
    tool_name: str | None = None
    tool_input: dict[str, Any] = field(default_factory=dict)


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def _result_text(block: dict[str, Any]) -> str:
    """A tool_result's content as one string (hosts send a string or a list of text blocks)."""
    content = block.get("content")
    if isinstance(content, str):
        return content
    parts = []
    for item in content or []:
        if isinstance(item, dict) and item.get("type") == "text":
            parts.append(str(item.get("text", "")))
        elif isinstance(item, dict):
            parts.append(f"[{item.get('type')} block]")
    return "".join(parts)


def _prompt_fields(messages: list[dict[str, Any]]) -> dict[str, str]:
    """FILE / QUESTION / WAIT_S / POLL_WAIT_S from the user's text (the first one given wins)."""
    found: dict[str, str] = {}
    for message in messages:
        if message.get("role") != "user":
            continue
        for block in _blocks(message):
            if block.get("type") == "text":
                for key, value in PROMPT_FIELD.findall(str(block.get("text", ""))):
                    found.setdefault(key, value)
    return found


def conversation(messages: list[dict[str, Any]]) -> list[Observation]:
    """Every tool result so far, in order, paired with the name of the tool that produced it."""
    names: dict[str, str] = {}
    seen: list[Observation] = []
    for message in messages:
        for block in _blocks(message):
            if block.get("type") == "tool_use":
                names[str(block.get("id"))] = str(block.get("name"))
            elif block.get("type") == "tool_result":
                use_id = str(block.get("tool_use_id"))
                raw = _result_text(block)
                observation = Observation(tool=names.get(use_id, "?"), tool_use_id=use_id, raw=raw,
                                          is_error=bool(block.get("is_error")))
                try:
                    observation.parsed = json.loads(raw)
                except ValueError as exc:
                    observation.parse_error = f"{exc}"
                seen.append(observation)
    return seen


def _short(tool: str) -> str:
    return tool.rsplit("__", 1)[-1]


def _all_text(body: dict[str, Any]) -> str:
    """The system prompt and every text block, where a host lists deferred tools by name."""
    system = body.get("system")
    parts = [system] if isinstance(system, str) else [str(b.get("text", "")) for b in system or [] if isinstance(b, dict)]
    for message in body.get("messages") or []:
        parts += [str(b.get("text", "")) for b in _blocks(message) if b.get("type") == "text"]
    return "\n".join(parts)


def _rlm_names(names: list[str]) -> dict[str, str]:
    """Map each of our tool names (rlm_complete, ...) to the name the host gave it."""
    return {suffix: name for name in names for suffix in TOOL_SUFFIXES if name.endswith("__" + suffix)}


class HostAgent:
    """The agent's policy: a pure function of the conversation, like a model's next turn.

    When the host defers tools behind a search tool (Claude Code's ``ToolSearch``), the agent
    first loads ours by name, the way a model is told to, then proceeds as usual."""

    def __init__(self, wait_s: float = 0.0, poll_wait_s: float = 30.0) -> None:
        self.wait_s = wait_s
        self.poll_wait_s = poll_wait_s

    def next_reply(self, body: dict[str, Any]) -> Reply:
        offered = [str(t.get("name")) for t in body.get("tools") or [] if isinstance(t, dict)]
        messages = list(body.get("messages") or [])
        observations = conversation(messages)
        searched = [o for o in observations if o.tool == SEARCH_TOOL]
        tools = _rlm_names(offered)  # Claude Code adds the tools a search loaded to the next request
        if len(tools) < len(TOOL_SUFFIXES):
            if not offered:
                return Reply("OK")  # not the agent loop: a title, summary or probe request
            deferred = sorted(set(re.findall(r"\b(mcp__[A-Za-z0-9_-]+?__(?:%s))\b" % "|".join(TOOL_SUFFIXES),
                                             _all_text(body))))
            if SEARCH_TOOL in offered and deferred and not searched:
                return Reply("Loading the rlm tools.", SEARCH_TOOL, {"query": "select:" + ",".join(deferred)})
            missing = [s for s in TOOL_SUFFIXES if s not in tools]
            return Reply(f"{FAILURE_PREFIX}tools not offered: {', '.join(missing)} (offered: {', '.join(offered)})")
        fields = _prompt_fields(messages)
        if "FILE" not in fields or "QUESTION" not in fields:
            return Reply(f"{FAILURE_PREFIX}the prompt needs a 'FILE: <path>' and a 'QUESTION: <text>' line")
        wait_s = float(fields.get("WAIT_S", self.wait_s))
        poll_wait_s = float(fields.get("POLL_WAIT_S", self.poll_wait_s))
        seen = [o for o in observations if _short(o.tool) in TOOL_SUFFIXES]
        if not seen:
            return Reply("Loading the file on the rlm server.", tools["rlm_load_context"], {"path": fields["FILE"]})
        last = seen[-1]
        if last.is_error or last.parse_error is not None or not isinstance(last.parsed, dict):
            why = "an error" if last.is_error else f"no JSON object ({last.parse_error or type(last.parsed).__name__})"
            return Reply(f"{FAILURE_PREFIX}{_short(last.tool)} returned {why}: {last.raw[:2000]}")
        result: dict[str, Any] = last.parsed
        step = _short(last.tool)
        if step == "rlm_load_context":
            return Reply("Asking the RLM.", tools["rlm_complete"],
                         {"handle": result.get("handle"), "query": fields["QUESTION"], "wait_s": wait_s})
        if step in ("rlm_complete", "rlm_get_result"):
            status = result.get("status")
            if status in ("running", "queued"):
                return Reply("Still running; waiting for the result.", tools["rlm_get_result"],
                             {"run_id": result.get("run_id"), "wait_s": poll_wait_s})
            if status != "completed":
                return Reply(f"{FAILURE_PREFIX}the run ended with status {status}: {result.get('error')}")
            return Reply("Reading how the answer was reached.", tools["rlm_get_trajectory"],
                         {"run_id": result.get("run_id"), "offset": 0, "limit": 1})
        pages = sum(1 for o in seen if _short(o.tool) == "rlm_get_trajectory")
        if result.get("next_offset") is not None and pages < MAX_TRAJECTORY_PAGES:
            return Reply("Next trajectory page.", tools["rlm_get_trajectory"],
                         {"run_id": result.get("run_id"), "offset": result["next_offset"], "limit": 1})
        finals = [o.parsed for o in seen
                  if _short(o.tool) in ("rlm_complete", "rlm_get_result") and isinstance(o.parsed, dict)]
        return Reply(f"{ANSWER_PREFIX}{finals[-1].get('answer') if finals else None}")


class ScriptedAnthropicServer:
    """``with ScriptedAnthropicServer() as server:``; ``server.base_url`` is ANTHROPIC_BASE_URL."""

    def __init__(self, agent: HostAgent | None = None, host: str = "127.0.0.1", port: int = 0,
                 model: str = "claude-sonnet-4-5") -> None:
        self.agent = agent or HostAgent()
        self.model = model
        self.requests: list[Recorded] = []
        self.unknown_routes: list[str] = []
        self._lock = threading.Lock()
        self._ids = 0
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = cast(tuple[str, int], self._httpd.server_address[:2])
        return f"http://{host}:{port}"

    def __enter__(self) -> "ScriptedAnthropicServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def agent_requests(self) -> list[dict[str, Any]]:
        """Bodies of the message requests that offered the rlm tools (the agent loop)."""
        with self._lock:
            return [r.body for r in self.requests
                    if r.path.split("?")[0].rstrip("/").endswith("/v1/messages") and isinstance(r.body, dict)
                    and any(str(t.get("name", "")).endswith("__rlm_complete") for t in r.body.get("tools") or []
                            if isinstance(t, dict))]

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}_{self._ids:06d}"

    def _record(self, handler: BaseHTTPRequestHandler, body: Any) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items() if k.lower() in RECORDED_HEADERS}
        with self._lock:
            self.requests.append(Recorded(handler.command, handler.path, headers, body))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _unknown(self) -> None:
                route = f"{self.command} {self.path}"
                with server._lock:
                    server.unknown_routes.append(route)
                print(f"anthropic_server: unknown route {route}", file=sys.stderr, flush=True)
                self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                            "message": f"no route {route} on the scripted server"}})

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return raw.decode("utf-8", "replace")

            def do_GET(self) -> None:
                server._record(self, None)
                if self.path.split("?")[0].rstrip("/").endswith("/v1/models"):
                    self._json(200, {"data": [{"type": "model", "id": server.model, "display_name": server.model,
                                               "created_at": "2025-01-01T00:00:00Z"}],
                                     "has_more": False, "first_id": server.model, "last_id": server.model})
                else:
                    self._unknown()

            def do_HEAD(self) -> None:
                server._record(self, None)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = self._body()
                server._record(self, body)
                route = self.path.split("?")[0].rstrip("/")
                if not isinstance(body, dict):
                    if route.endswith(("/v1/messages", "/v1/messages/count_tokens")):
                        self._json(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                                    "message": "the body must be a JSON object"}})
                    else:
                        self._unknown()
                elif route.endswith("/v1/messages/count_tokens"):
                    self._json(200, {"input_tokens": _estimate_tokens(body)})
                elif route.endswith("/v1/messages"):
                    server._serve_message(self, body)
                else:
                    self._unknown()

        return Handler

    def _serve_message(self, handler: Any, body: dict[str, Any]) -> None:
        reply = self.agent.next_reply(body)
        model = str(body.get("model") or self.model)
        content: list[dict[str, Any]] = []
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        if reply.tool_name:
            content.append({"type": "tool_use", "id": self._next_id("toolu"), "name": reply.tool_name,
                            "input": reply.tool_input})
        usage = {"input_tokens": _estimate_tokens(body), "output_tokens": max(1, len(json.dumps(content)) // 4),
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        message = {"id": self._next_id("msg"), "type": "message", "role": "assistant", "model": model,
                   "content": content, "stop_reason": "tool_use" if reply.tool_name else "end_turn",
                   "stop_sequence": None, "usage": usage}
        if body.get("stream"):
            _stream(handler, message)
        else:
            handler._json(200, message)


def _estimate_tokens(body: dict[str, Any]) -> int:
    return max(1, len(json.dumps(body.get("messages") or [])) // 4)


def _stream(handler: Any, message: dict[str, Any]) -> None:
    """The message as Server-Sent Events, the way the Messages API streams it."""
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start",
                           "message": {**message, "content": [], "stop_reason": None,
                                       "usage": {**message["usage"], "output_tokens": 1}}}),
        ("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}}))
            text = block["text"]
            for start in range(0, len(text), 40):  # several deltas, as a real stream has
                events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                       "delta": {"type": "text_delta", "text": text[start:start + 40]}}))
        else:
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "tool_use", "id": block["id"],
                                                                     "name": block["name"], "input": {}}}))
            arguments = json.dumps(block["input"])
            for start in range(0, len(arguments), 24):
                events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                       "delta": {"type": "input_json_delta",
                                                                 "partial_json": arguments[start:start + 24]}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                     "usage": {"output_tokens": message["usage"]["output_tokens"]}}))
    events.append(("message_stop", {"type": "message_stop"}))
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True
    for name, data in events:
        handler.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
    handler.wfile.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8322)
    parser.add_argument("--wait-s", type=float, default=0.0, help="wait_s the agent passes to rlm_complete")
    args = parser.parse_args()
    with ScriptedAnthropicServer(HostAgent(wait_s=args.wait_s), args.host, args.port) as server:
        print(f"scripted Anthropic API on {server.base_url} (ANTHROPIC_BASE_URL)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
