"""Local backend isolation with bubblewrap (RLM_MCP_LOCAL_ISOLATION)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox import ContextFile, SandboxSpec
from rlm_mcp.sandbox.local import LocalProvider


async def no_subcalls(op: str, prompt: str, model: str | None) -> str:
    raise AssertionError("no sub-calls expected")


@pytest.fixture
def bwrap_available() -> None:
    if shutil.which("bwrap") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("bubblewrap is not installed in CI (.ci/run installs it)")
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on 127.0.0.1 of the host that accepts connections."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def context_and_secret(tmp_path: Path) -> tuple[ContextFile, Path]:
    (tmp_path / "context.txt").write_text("visible context")
    secret = tmp_path / "secret.txt"
    secret.write_text("host file")
    return ContextFile(tmp_path / "context.txt"), secret


PROBE = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    print("network: reached the host")
except OSError as exc:
    print("network: blocked", type(exc).__name__)
try:
    open({secret!r}).read()
    print("files: read a host file")
except OSError as exc:
    print("files: blocked", type(exc).__name__)
print("context:", context)
"""


async def probe(isolation: str, context: ContextFile, secret: Path, port: int) -> list[str]:
    provider = LocalProvider(Settings(local_isolation=isolation, sandbox_memory_mb=1024))
    async with provider.create(SandboxSpec(context, no_subcalls)) as sandbox:
        result = await sandbox.execute(PROBE.format(port=port, secret=str(secret)), timeout=30)
    assert result.error is None, result.error
    return result.stdout.strip().splitlines()


async def test_bubblewrap_cuts_the_network_and_hides_host_files(bwrap_available, context_and_secret, listener):
    context, secret = context_and_secret
    lines = await probe("bwrap", context, secret, listener)
    assert lines[0].startswith("network: blocked")
    assert lines[1] == "files: blocked FileNotFoundError"
    assert lines[2] == "context: visible context"


async def test_without_isolation_the_worker_reaches_the_host(context_and_secret, listener):
    context, secret = context_and_secret
    lines = await probe("none", context, secret, listener)
    assert lines == ["network: reached the host", "files: read a host file", "context: visible context"]


async def test_requiring_bubblewrap_where_it_is_missing_is_a_clear_error(context_and_secret, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    provider = LocalProvider(Settings(local_isolation="bwrap"))
    with pytest.raises(SandboxError, match="bubblewrap is not installed.*apt-get install bubblewrap"):
        async with provider.create(SandboxSpec(context_and_secret[0], no_subcalls)):
            pass


def test_an_unknown_isolation_mode_is_refused():
    from rlm_mcp.errors import ConfigError

    with pytest.raises(ConfigError, match="RLM_MCP_LOCAL_ISOLATION must be one of auto, bwrap, none"):
        Settings.from_env({"RLM_MCP_LOCAL_ISOLATION": "chroot"})



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_DUMPABLE) is Linux-only")
def test_the_server_becomes_non_dumpable_so_same_user_workers_cannot_read_its_keys():
    # The kernel then refuses /proc/<server>/environ and ptrace to other processes of the same
    # (non-root) user; root keeps CAP_SYS_PTRACE, which is why root servers want bwrap or Docker.
    import ctypes

    LocalProvider(Settings(local_isolation="none"))
    pr_get_dumpable = 3
    assert ctypes.CDLL(None).prctl(pr_get_dumpable, 0, 0, 0, 0) == 0
