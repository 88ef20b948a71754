"""Path security for loads from the host: allowed roots, path resolution, and opening only
regular files, checked again on what was actually opened."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from rlm_mcp.config import Settings
from rlm_mcp.errors import ContextError, describe_os_error
from rlm_mcp.store.scan import inside_roots


class HostFiles:
    """The file-system calls of the store whose failures and races matter: opening an input and
    renaming a finished load into place. The store takes an instance (default: these, the os
    module's); tests pass a subclass to provoke a denied open or a lost rename race."""

    def open(self, path: Path, flags: int) -> int:
        return os.open(path, flags)

    def rename(self, source: Path, target: Path) -> None:
        os.rename(source, target)


def allowed_roots(settings: Settings) -> list[Path]:
    """``RLM_MCP_ALLOWED_ROOTS`` resolved (empty: every path the server's user can read)."""
    return [Path(root).expanduser().resolve() for root in settings.allowed_roots]


def resolve_local(given: str, shown: str, roots: list[Path]) -> Path:
    """The real path of a file or directory the caller named, refused outside ``roots``."""
    if not given.strip():
        raise ContextError("path is empty: pass the absolute path of a file or directory")
    if "\x00" in given:
        raise ContextError(f"the path {shown} contains a NUL character (\\x00), which no file name can hold: "
                           "pass the path without it")
    path = Path(given.strip()).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise ContextError(
            f"no such file or directory: {shown} (relative paths are resolved against the server's "
            f"working directory, {Path.cwd()}): check the path, or pass an absolute one") from None
    except OSError as exc:
        raise ContextError(describe_os_error(exc, f"resolving {shown}")) from None
    except RuntimeError:  # a symlink loop
        raise ContextError(f"cannot resolve {shown}: it is a loop of symbolic links; pass the real path "
                           "of the file") from None
    if roots and not inside_roots(resolved, roots):
        raise ContextError(
            f"{shown} resolves to {resolved}, outside the allowed roots "
            f"({', '.join(str(root) for root in roots)}): load a file inside one of them, or ask "
            "the operator to add its folder to RLM_MCP_ALLOWED_ROOTS")
    return resolved


def open_regular(resolved: Path, shown: str, roots: list[Path] | None, files: HostFiles) -> BinaryIO:
    """Open a regular file for reading without blocking on FIFOs or devices (refused)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = files.open(resolved, flags)
    except PermissionError:
        raise ContextError(f"cannot read {shown}: permission denied; make it readable by the user "
                           "running the rlm-mcp server, or copy it somewhere readable") from None
    except OSError as exc:
        raise ContextError(f"cannot open {shown}: {exc.strerror}; check the path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ContextError(f"{shown} is not a regular file or directory (a device, FIFO or socket): "
                           "save its data to a regular file and load that")
    opened = Path(f"/proc/self/fd/{fd}")
    if roots and opened.exists():
        # Checked on what was actually opened: a path swapped for a symlink after the
        # roots check must not lead outside the roots.
        if not inside_roots(Path(os.readlink(opened)), roots):
            os.close(fd)
            raise ContextError(f"{shown} now points outside the allowed roots "
                               f"({', '.join(map(str, roots))}): it was not loaded")
    return os.fdopen(fd, "rb")
