"""Fixtures for tests that need a Docker engine and the sandbox image.

Import them where needed (``from tests.docker_support import docker_provider  # noqa: F401``)
or list this module in ``pytest_plugins``. Without an engine (or without the image) the tests
are skipped with the reason on a developer machine, but fail when ``CI=true``: CI must prove the
Docker backend, so tests/tools/ci-setup-docker.sh has to run first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import pytest_asyncio

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.docker import LABEL, LABEL_VALUE, OWNER_LABEL, DockerProvider, connect, local_socket_path, owner_token
from tests.support import unavailable

IMAGE = os.environ.get("RLM_MCP_DOCKER_IMAGE") or Settings().docker_image


def _unavailable(reason: str) -> None:
    unavailable(f"{reason} (tests/tools/ci-setup-docker.sh sets up the engine and the image)")


def docker_settings(home: Path, **overrides: Any) -> Settings:
    """Small, fast limits for tests; ``overrides`` replace any Settings field."""
    values: dict[str, Any] = dict(home=home, docker_image=IMAGE, sandbox_memory_mb=512,
                                  sandbox_cpus=1.0, sandbox_pids=64, docker_pool_size=0)
    values.update(overrides)
    return Settings(**values)


def our_leftovers(client: docker.DockerClient) -> list[str]:
    """Containers and volumes labelled as made by this test process."""
    owner = f"{OWNER_LABEL}={owner_token()}"
    names = [f"container {c.short_id} ({c.status})"
             for c in client.containers.list(all=True, filters={"label": [f"{LABEL}={LABEL_VALUE}", owner]},
                                                     ignore_removed=True)]
    names += [f"volume {v.name}" for v in client.volumes.list(filters={"label": owner})]
    return names


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A client for a live engine that has the sandbox image. At the end of the session it
    checks that no container or volume this process labelled is left behind."""
    try:
        client = connect()
    except SandboxError as exc:
        _unavailable(f"no Docker engine: {exc}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        client.close()
        _unavailable(f"the sandbox image {IMAGE} is missing: run `rlm-mcp sandbox build`")
    yield client
    leftovers = our_leftovers(client)
    client.close()
    assert not leftovers, f"Docker objects left behind after the test session: {leftovers}"


@pytest.fixture(scope="session")
def docker_provider(docker_engine: docker.DockerClient,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerProvider]:
    """One Docker provider for the whole session (no warm pool, so no event-loop affinity)."""
    provider = DockerProvider(docker_settings(tmp_path_factory.mktemp("docker-home")))
    yield provider
    asyncio.run(provider.aclose())


ProviderFactory = Callable[..., Awaitable[DockerProvider]]


@pytest_asyncio.fixture
async def make_docker_provider(docker_engine: docker.DockerClient,
                               tmp_path: Path) -> AsyncIterator[ProviderFactory]:
    """Make providers with custom settings (``make(sandbox_pids=32, docker_pool_size=2)``);
    they are closed when the test ends."""
    made: list[DockerProvider] = []

    async def make(*, context_transfer: Any = None, **overrides: Any) -> DockerProvider:
        provider = DockerProvider(docker_settings(tmp_path / f"home{len(made)}", **overrides),
                                  context_transfer=context_transfer)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


class _Pump(socketserver.BaseRequestHandler):
    """Forwards one TCP connection to the engine's unix socket, half-closes included."""

    engine_socket = "/var/run/docker.sock"

    def handle(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
            upstream.connect(self.engine_socket)
            back = threading.Thread(target=_copy, args=(upstream, self.request), daemon=True)
            back.start()
            _copy(self.request, upstream)
            back.join()


def _copy(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


@pytest.fixture
def docker_over_tcp(docker_engine: docker.DockerClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point DOCKER_HOST at a loopback TCP forwarder to the local engine, the way a remote
    engine is reached: host paths cannot be bind-mounted (as far as rlm-mcp can tell)."""
    engine_socket = local_socket_path()
    if engine_socket is None:
        pytest.skip("the engine is not on a unix socket here")
    handler = type("Pump", (_Pump,), {"engine_socket": engine_socket})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"tcp://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("DOCKER_HOST", address)
    yield address
    server.shutdown()
    server.server_close()
    thread.join()
