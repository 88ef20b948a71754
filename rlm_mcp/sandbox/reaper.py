"""A detached clean-up for a server that stops fast: ``python -m rlm_mcp.sandbox.reaper``.

A stdio host gives its server ~100 ms between SIGINT and SIGTERM (Claude Code), less than a
Docker engine takes to kill and remove a container. So a stopping server starts this process
in a session of its own, with a pipe on stdin whose other end only the server holds, and exits.
The pipe's end of file says the server is gone; then what it left (containers, volumes, mount
and temporary directories, control groups) belongs to a server that is gone, and the same
clean-up a starting server runs (:func:`rlm_mcp.sandbox.reap_leftovers`) removes it.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from rlm_mcp.config import Settings
from rlm_mcp.errors import RlmError
from rlm_mcp.sandbox import reap_leftovers

log = logging.getLogger("rlm_mcp.sandbox.reaper")


def main() -> int:
    sys.stdin.buffer.read()  # returns at end of file: the server has exited
    try:
        settings = Settings.from_env()
    except RlmError as exc:  # the server started with these settings; say so if they went bad
        log.error("reaper: %s", exc)
        return 2
    removed = asyncio.run(reap_leftovers(settings))
    log.info("reaper: removed %d item(s) the stopped server left", removed)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
