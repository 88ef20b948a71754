"""Files and directories only the server's user can read (standard library only).

Contexts hold whatever users loaded (logs, source, documents), trajectories hold excerpts of
them, and the HTTP token file holds a credential: each is created 0600 inside 0700
directories. Modes are set explicitly after creation, so the result is the same whatever the
process umask (a umask can only remove permission bits, and ``chmod`` is exact).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, Any

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """Make ``path`` a directory with mode 0700 and return it.

    Missing ancestors are created with the default mode (they may be shared, like
    ``~/.local/share``). A directory that already exists is set to 0700 when ``tighten`` is
    true and it belongs to this user: pass ``tighten=False`` for a directory the user may have
    chosen (``RLM_MCP_HOME=/tmp`` must not make /tmp private).
    """
    try:
        os.mkdir(path, DIR_MODE)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return private_dir(path, tighten=tighten)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory") from None
        owner = os.geteuid() if hasattr(os, "geteuid") else None  # None on Windows
        if not tighten or (owner is not None and path.stat().st_uid != owner):
            return path
    os.chmod(path, DIR_MODE)
    return path


def open_private(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> IO[Any]:
    """Open ``path`` for writing (truncated, created if missing) with mode 0600."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_private writes only ('w' or 'wb'), not {mode!r}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, FILE_MODE)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, FILE_MODE)  # an existing file keeps its old mode through O_CREAT
        return os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding)
    except BaseException:
        os.close(fd)
        raise


def write_private_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600, never readable by others meanwhile."""
    # Unique per call: two threads replacing the same file must not share a temporary.
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open_private(temporary) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
