"""What a test that needs a real component does when it is missing: skip with the reason on a
developer machine, fail under ``CI=true``, where `.ci/run` has installed everything and every
wall must be proven."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip (developer machine) or fail (CI) because ``reason`` says what is missing."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run; .ci/run installs what it needs)", pytrace=False)
    pytest.skip(reason)


def require_bwrap() -> None:
    if shutil.which("bwrap") is None:
        unavailable("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
