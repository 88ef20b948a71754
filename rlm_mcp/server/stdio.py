"""Serving over stdio, and stopping within a host's patience.

Claude Code stops a stdio server with SIGINT, then SIGTERM ~100 ms later; other hosts close
stdin. Either way the server must be gone in ~100 ms with its runs cancelled, their sandboxes
closed and their trajectories saying so. The SDK reads stdin in a worker thread that a signal
cannot interrupt, and ``asyncio.run`` joins its threads on the way out: a server that waits for
it hangs until the host closes the pipe or kills it. So this module stops the work itself, with
a deadline, and leaves with ``os._exit`` once everything worth keeping is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from mcp.server import MCPServer

from rlm_mcp.services import Services

log = logging.getLogger(__name__)

# Runs get this long to close their sandboxes and record their end; what is still unwinding
# then (a Docker container being removed, a slow process group) goes to the detached reaper.
# Measured: a local run in a cell stops in ~15-30 ms; the rest of the 100 ms is Python's.
STOP_GRACE_S = 0.05
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve_stdio(server: MCPServer, services: Services) -> int:
    """Serve until stdin closes or a stop signal arrives, then stop the work; the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(number: int) -> None:
        received.append(number)
        stop.set()

    for number in STOP_SIGNALS:
        loop.add_signal_handler(number, on_signal, number)
    serving = asyncio.create_task(server.run_stdio_async(), name="stdio")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    started = time.monotonic()
    why = signal.Signals(received[0]).name if received else "stdin closed"
    code = 0
    if serving.done() and not serving.cancelled() and serving.exception() is not None:
        exc = serving.exception()
        log.error("the stdio transport failed: %r", exc)
        code = 1
    await stop_work(services)
    log.info("stopped (%s) in %.0f ms", why, (time.monotonic() - started) * 1000)
    return code


async def stop_work(services: Services, grace_s: float = STOP_GRACE_S) -> None:
    """Cancel the runs (their sandboxes close as they unwind), mark their trajectories, and
    hand whatever cannot be removed in time to a detached reaper."""
    unfinished = await services.runs.stop(grace_s)
    with contextlib.suppress(Exception):  # idle sandboxes kept for follow-ups (a timeout included)
        await asyncio.wait_for(services.engine.keeper.aclose(), grace_s)
    backends = services.engine.sandboxes.in_use()
    if unfinished or any(name != "local" for name in backends):
        # Containers (docker), remote sandboxes (daytona) or a run that overran the grace: the
        # reaper removes them once this process is gone; the next server start would too.
        start_reaper()
    if backends == ["local"] and not unfinished:
        with contextlib.suppress(Exception):  # a timeout included
            await asyncio.wait_for(services.engine.sandboxes.aclose(), grace_s)  # control groups


def start_reaper() -> None:
    """``python -m rlm_mcp.sandbox.reaper`` in its own session; it waits for our exit."""
    try:
        reaper = subprocess.Popen(
            [sys.executable, "-m", "rlm_mcp.sandbox.reaper"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # not the host's pipes: it outlives us
            start_new_session=True, close_fds=True)
    except OSError as exc:
        log.warning("could not start the reaper (the next server start cleans up instead): %s", exc)
        return
    # Its stdin's write end stays open in this process only; our exit closes it.
    _KEPT.append(reaper)


_KEPT: list[subprocess.Popen[bytes]] = []


def exit_now(code: int) -> None:
    """Leave without joining the SDK's stdin thread (blocked in read() after a signal)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
