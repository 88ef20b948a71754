"""Process facts shared by the store and the sandbox backends (standard library only)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (owned by anyone)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill would terminate it; callers fall back on other evidence (age)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but belongs to another user
    return True
