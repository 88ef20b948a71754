"""Shared fixtures: the scripted model server (reached by litellm over real HTTP), settings
pointing at it with a private data dir, and the sandbox providers of every backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm_mcp.config import Limits, Settings
from rlm_mcp.sandbox.local import LocalProvider
from rlm_mcp.testing.model_server import ScriptedModelServer, secret_needle

# Backend fixtures (docker_provider, daytona_provider) for the contract suite.
pytest_plugins = ["tests.docker_support", "tests.daytona_support"]

# litellm's OpenAI route insists on a key; the scripted server ignores it. Never a real key.
os.environ.setdefault("OPENAI_API_KEY", "sk-test-not-a-real-key")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="session")
def model_server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer() as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, model_server: ScriptedModelServer) -> Settings:
    """Settings for one test: its own data dir, the scripted model, fast limits."""
    return Settings(home=tmp_path / "home", model="openai/needle", api_base=model_server.api_base,
                    model_retries=2, model_timeout_s=30,
                    limits=Limits(cell_timeout_s=20, timeout_s=120))


@pytest.fixture
def recording(model_server: ScriptedModelServer) -> Iterator[ScriptedModelServer]:
    """The model server with fresh stats that keep every request body."""
    model_server.reset_stats()
    model_server.record_requests(True)
    yield model_server
    model_server.record_requests(False)


@pytest.fixture(scope="session")
def local_provider() -> LocalProvider:
    return LocalProvider(Settings(sandbox_memory_mb=1024))


def haystack(size: int, code: str = "XK-42", at: float = 0.66) -> str:
    """`size` characters of filler with the secret-code sentence hidden at fraction `at`."""
    filler = "lorem ipsum dolor sit amet, consectetur adipiscing elit. "
    text = (filler * (size // len(filler) + 1))[:size]
    cut = int(size * at)
    return text[:cut] + secret_needle(code) + text[cut:]
