"""Fixtures for the Daytona backend: the loopback emulator and a provider configured for it.

Import into a test module (or conftest) with ``from tests.daytona_support import
daytona_emulator, daytona_provider``; the real ``daytona`` SDK talks to the emulator over HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from rlm_mcp.config import Settings
from rlm_mcp.sandbox.daytona import DaytonaProvider
from rlm_mcp.testing.daytona_emulator import DaytonaEmulator

EMULATOR_API_KEY = "test"


def emulator_settings(emulator: DaytonaEmulator, **overrides: object) -> Settings:
    """Settings pointing rlm-mcp's Daytona backend at ``emulator``."""
    values: dict[str, object] = dict(daytona_api_url=emulator.api_url, daytona_api_key=EMULATOR_API_KEY,
                                     daytona_snapshot="rlm-mcp-sandbox", daytona_auto_stop_minutes=15)
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def daytona_emulator() -> Iterator[DaytonaEmulator]:
    """One emulator for the test session, on 127.0.0.1 with a free port."""
    with DaytonaEmulator(api_key=EMULATOR_API_KEY, memory_gb=1) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def daytona_provider(daytona_emulator: DaytonaEmulator) -> Iterator[DaytonaProvider]:
    """A DaytonaProvider whose sandboxes live in the emulator; deletes leftovers at the end."""
    provider = DaytonaProvider(emulator_settings(daytona_emulator))
    yield provider
    asyncio.run(provider.aclose())
