"""Serving: one process, one set of services, stdio or an HTTP transport; what a dead server
left behind is reaped and its runs settled while the new one starts."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from rlm_mcp.config import Settings
from rlm_mcp.errors import RlmError
from rlm_mcp.sandbox import reap_leftovers
from rlm_mcp.server.http import (
    OnShutdown,
    announce,
    forget_generated_token,
    http_app,
    http_auth,
)
from rlm_mcp.server.pages import view_base_url
from rlm_mcp.server.stdio import exit_now, serve_stdio
from rlm_mcp.server.tools import build_server
from rlm_mcp.services import Services

log = logging.getLogger(__name__)

# Start-up reaping waits for the server to be quiet: this long with no run in flight ...
REAP_QUIET_S = 0.5
# ... but no longer than this after start (a busy server reaps during its runs).
REAP_DEFER_MAX_S = 10.0


def serve(settings: Settings, transport: str = "stdio", host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the server until it is stopped; runs and sandboxes are cleaned up on the way out."""
    # The token rule first: a refused bind must not leave anything behind.
    auth = None if transport == "stdio" else http_auth(settings, host, port)
    services = Services.create(settings)
    # litellm's multi-second import runs in a thread from now on, while the server starts and
    # the host initializes: no request ever waits for it on the event loop.
    services.engine.models.start_warm_up()
    server = build_server(services, view_base=None if auth is None else view_base_url(host, port))
    closed = asyncio.Event()

    async def close() -> None:
        if not closed.is_set():
            closed.set()
            await services.aclose()
            if auth is not None:
                forget_generated_token(auth)

    app = None if auth is None else OnShutdown(http_app(server, transport, host, auth, services, port), close)

    async def main() -> None:
        # Runs a killed server left "running" become failed in their files too (in a thread:
        # one line read per trajectory; the tools settle any run they touch in the meantime).
        settling = asyncio.create_task(_settle_stopped_runs(services))
        warm_up = None
        # Docker with a warm pool fills it; local decides its isolation now, so that a missing
        # wall (no bubblewrap, no control groups) is logged when the server starts.
        if settings.docker_pool_size > 0 or settings.sandbox == "local":
            warm_up = asyncio.create_task(_warm_up(services))
        # What servers that died left behind (containers, temporary directories), off the loop,
        # once the server is quiet: its ~50 ms of CPU (mostly importing the Docker client) would
        # otherwise compete, on a small machine, with a first call sent right after initialize.
        reaper = asyncio.create_task(_reap_when_quiet(settings, services, warm_up))
        try:
            if app is None:
                code = await serve_stdio(server, services)
                # Runs are stopped and recorded: leave now, without the slow parts of the finally
                # below (Docker's clean-up went to the reaper; see rlm_mcp/server/stdio.py).
                exit_now(code)
            else:
                import uvicorn

                assert auth is not None
                # Printed, not logged: the operator needs it whatever RLM_MCP_LOG_LEVEL says.
                sys.stderr.write(announce(transport, host, port, auth))
                sys.stderr.flush()
                # log_config=None: uvicorn logs through our stderr handler (its default puts the
                # access log on stdout, which belongs to the protocol on stdio).
                config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level.lower(),
                                        lifespan="on", log_config=None)
                await uvicorn.Server(config).serve()
        finally:
            reaper.cancel()
            settling.cancel()
            if warm_up is not None:
                warm_up.cancel()
            await close()

    try:
        asyncio.run(main())
    finally:
        if auth is not None:  # e.g. the port was taken: uvicorn exits before any lifespan
            forget_generated_token(auth)


async def _settle_stopped_runs(services: Services) -> None:
    try:
        await asyncio.to_thread(services.runs.settle_all)
    except OSError as exc:  # an unreadable data dir shows up again, clearly, when a tool uses it
        log.warning("could not check the trajectories of earlier runs: %s", exc)


async def _reap_when_quiet(settings: Settings, services: Services, warm_up: asyncio.Task[None] | None) -> None:
    """:func:`reap_leftovers` once the sandbox warm-up is done and no run has been in flight for
    REAP_QUIET_S (at the latest REAP_DEFER_MAX_S after start): leftovers wait a moment, a first
    call does not wait for their removal."""
    deadline = time.monotonic() + REAP_DEFER_MAX_S
    if warm_up is not None:
        await asyncio.wait([warm_up], timeout=REAP_DEFER_MAX_S)
    while (left := deadline - time.monotonic()) > 0:
        quiet_since = time.monotonic()
        running = [run.task for run in services.runs.runs.values() if run.task is not None and not run.task.done()]
        if running:
            await asyncio.wait(running, timeout=left)
            continue
        await asyncio.sleep(min(REAP_QUIET_S, left))
        # Quiet only if no run started meanwhile (even one that has finished already).
        if all(run.started_at < quiet_since for run in services.runs.runs.values()):
            break
    await reap_leftovers(settings)


async def _warm_up(services: Services) -> None:
    try:
        await services.engine.sandboxes.warm_up()
    except RlmError as exc:  # the first run will report it to the host model
        log.warning("sandbox warm-up failed: %s", exc)
