"""What a server leaves on the machine, named so that a later server can clean it up.

Containers, volumes, mount and temporary directories carry their owner: host, pid and the pid's
start time (the start time tells a reused pid apart). A server that dies without cleaning up
(``kill -9``, a crash, a power cut) leaves them behind; the next server on this host removes
those whose owner is gone (:func:`reap_temp_dirs` here, the Docker objects in
``rlm_mcp.sandbox.docker``). Standard library only.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from rlm_mcp.sandbox.processes import pid_alive

log = logging.getLogger(__name__)

TEMP_DIR_KINDS = ("rlm-run", "rlm-sandbox")  # per-run work dirs, local sandbox work dirs


def process_start(pid: int) -> str:
    """The pid's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def owner_token(pid: int | None = None) -> str:
    """``host:pid:start`` naming a server process; stored as a label on everything we create."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def owner_is_dead(token: str) -> bool:
    """True when ``token`` names a process on this host that no longer runs."""
    host, _, rest = token.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's (or malformed): not ours to judge
    pid = int(pid_text)
    if not pid_alive(pid):
        return True
    return bool(start) and process_start(pid) not in ("", start)  # the pid was reused


def _host_token() -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())


def owner_dir_name(pid: int | None = None) -> str:
    """The owner in a form fit for a file name: ``host_pid_start``."""
    pid = os.getpid() if pid is None else pid
    return f"{_host_token()}_{pid}_{process_start(pid)}"


def dead_owner_in_name(name: str, prefix: str = "") -> bool:
    """True when ``name`` is ``prefix`` + ``owner_dir_name(pid)`` (optionally followed by ``-``
    and anything) for a process on this host that is gone. Other names are not judged."""
    head = f"{prefix}{_host_token()}_"
    if not name.startswith(head):
        return False
    match = re.match(r"(\d+)_(\d*)(?:-|$)", name[len(head):])
    return match is not None and owner_is_dead(f"{socket.gethostname()}:{match[1]}:{match[2]}")


def owned_temp_prefix(kind: str) -> str:
    """A ``tempfile`` prefix naming this process (``kind`` is one of TEMP_DIR_KINDS), so that a
    later server can remove the directory if this one dies without cleaning up."""
    return f"{kind}-{owner_dir_name()}-"


def reap_temp_dirs(root: Path | None = None) -> int:
    """Remove this user's temporary directories (of TEMP_DIR_KINDS) whose server process is
    gone; return how many. Directories without an owner in their name (made by older versions)
    are left alone: nothing tells whether their server still runs."""
    base = Path(root or tempfile.gettempdir())
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(base))
    except OSError as exc:
        log.debug("cannot list %s for leftovers: %s", base, exc)
        return 0
    removed = 0
    for entry in entries:
        kind = next((k for k in TEMP_DIR_KINDS if entry.name.startswith(k + "-")), None)
        if kind is None or not dead_owner_in_name(entry.name, kind + "-"):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or (
                    uid is not None and entry.stat(follow_symlinks=False).st_uid != uid):
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed += 1
            log.info("removed leftover directory %s (its server process is gone)", entry.path)
    return removed
