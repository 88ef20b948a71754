"""Start an MCP server over stdio, run ``initialize`` and ``tools/list``, close stdin, wait for exit.

    python tests/tools/stdio_initialize.py [--timeout S] -- COMMAND [ARG...]

Prints one JSON object on stdout: ``serverInfo``, ``protocolVersion``, ``tools`` (names) and
``exit_code``. Exits non-zero, saying why on stderr, when the server writes anything but JSON-RPC
to stdout, answers with an error, or does not answer in time. Standard library only: it checks an
installed server from outside any virtualenv (tests/tools/check-wheel.sh, tests/test_packaging.py).
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import threading
import time
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the server command after --")
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8")
    lines: queue.Queue[str | None] = queue.Queue()
    stderr: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    def read_stderr() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            stderr.append(line)

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for thread in readers:
        thread.start()

    def fail(why: str) -> int:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        print(f"stdio_initialize: {why}\n--- server stderr (tail) ---\n{''.join(stderr)[-4000:]}", file=sys.stderr)
        return 1

    def send(message: dict[str, Any]) -> None:
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def reply(request_id: int) -> dict[str, Any]:
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no reply to request {request_id} within {args.timeout:g} s") from None
            if line is None:
                raise RuntimeError(f"the server closed stdout (exit code {proc.poll()}) before replying")
            try:
                message = json.loads(line)
            except ValueError:
                raise RuntimeError(f"stdout carried a line that is not JSON-RPC: {line[:300]!r}") from None
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"request {request_id} failed: {message['error']}")
                return message["result"]

    try:
        send({"id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "stdio_initialize", "version": "1"}}})
        initialized = reply(1)
        send({"method": "notifications/initialized"})
        send({"id": 2, "method": "tools/list", "params": {}})
        tools = reply(2)
    except (RuntimeError, OSError) as exc:
        return fail(str(exc))
    proc.stdin.close()  # type: ignore[union-attr]
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return fail("the server did not exit within 30 s of stdin closing")
    for thread in readers:
        thread.join(timeout=10)
    while (line := lines.get_nowait() if not lines.empty() else None) is not None:
        try:
            json.loads(line)
        except ValueError:
            return fail(f"stdout carried a line that is not JSON-RPC: {line[:300]!r}")
    print(json.dumps({"serverInfo": initialized.get("serverInfo"), "protocolVersion": initialized.get("protocolVersion"),
                      "tools": sorted(t["name"] for t in tools.get("tools", [])), "exit_code": code}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
