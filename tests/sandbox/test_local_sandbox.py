"""The local backend's walls: bubblewrap isolation (RLM_MCP_LOCAL_ISOLATION), no capabilities and
an unprivileged uid whatever the server's uid, bounded stderr, and what a host that cannot
enforce a limit says about it. The attacks themselves live in tests/sandbox/test_hostile_code.py; here
they also run from a non-root server."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox import ContextFile, SandboxSpec
from rlm_mcp.sandbox.leftovers import owner_dir_name
from rlm_mcp.sandbox.local import LocalProvider
from rlm_mcp.sandbox.processes import GroupLimits, GroupMaker
from tests.sandbox.test_hostile_code import ATTACKS, Outcome, processes_with
from tests.support import require_bwrap, unavailable

UNPRIVILEGED_UID = 4242  # the non-root server of these tests (no passwd entry needed)
ISOLATIONS = ["bwrap", "none"]


async def no_subcalls(op: str, prompt: str, model: str | None) -> str:
    raise AssertionError("no sub-calls expected")


def require_isolation(isolation: str) -> None:
    if isolation == "bwrap":
        require_bwrap()


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"needs root (CI runs the suite as root): {why}")


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on 127.0.0.1 of the host that accepts connections."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A world-readable directory outside pytest's private tmp tree (mode 0700 when root)."""
    path = Path(tempfile.mkdtemp(prefix="rlm-local-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


PROBE = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    print("network: reached the host")
except OSError as exc:
    print("network: blocked", type(exc).__name__)
for path in ({public!r}, {private!r}):
    try:
        open(path).read()
        print("files: read", path.rsplit("/", 1)[1])
    except OSError as exc:
        print("files: blocked", type(exc).__name__)
print("context:", context)
"""


async def probe(isolation: str, context: ContextFile, host_dir: Path, port: int) -> list[str]:
    public, private = host_dir / "public.txt", host_dir / "private.txt"
    public.write_text("anyone may read this")
    public.chmod(0o644)
    private.write_text("only the server's user may read this")
    private.chmod(0o600)
    provider = LocalProvider(Settings(local_isolation=isolation, sandbox_memory_mb=1024))
    async with provider.create(SandboxSpec(context, no_subcalls)) as sandbox:
        result = await sandbox.execute(PROBE.format(port=port, public=str(public), private=str(private)),
                                       timeout=30)
    assert result.error is None, result.error
    return result.stdout.strip().splitlines()


def private_context(directory: Path) -> ContextFile:
    """A context as the store keeps it: mode 0600 in a 0700 directory of the server's user."""
    directory.mkdir(mode=0o700)
    path = directory / "context.txt"
    path.write_text("visible context")
    path.chmod(0o600)
    return ContextFile(path)


async def test_bubblewrap_cuts_the_network_and_hides_host_files(tmp_path, host_dir, listener):
    require_bwrap()
    lines = await probe("bwrap", private_context(tmp_path / "store"), host_dir, listener)
    assert lines[0].startswith("network: blocked")
    assert lines[1:3] == ["files: blocked FileNotFoundError"] * 2
    assert lines[3] == "context: visible context"


async def test_without_isolation_the_worker_reaches_the_network_and_world_readable_files(tmp_path, host_dir,
                                                                                          listener):
    lines = await probe("none", private_context(tmp_path / "store"), host_dir, listener)
    # A root server's sandbox runs as an unprivileged uid: the root-only file stays closed.
    private = "files: blocked PermissionError" if os.geteuid() == 0 else "files: read private.txt"
    assert lines == ["network: reached the host", "files: read public.txt", private, "context: visible context"]


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_a_context_only_the_server_may_read_is_loaded_through_a_descriptor(isolation, tmp_path):
    require_isolation(isolation)
    context = private_context(tmp_path / "store")
    provider = LocalProvider(Settings(local_isolation=isolation, sandbox_memory_mb=1024))
    async with provider.create(SandboxSpec(context, no_subcalls)) as sandbox:
        result = await sandbox.execute(f"print(context)\nopen({str(context.path)!r}).read()", timeout=30)
    assert result.stdout.strip() == "visible context"
    if os.geteuid() == 0:  # the path itself stays closed to the sandbox's uid
        assert result.error is not None and ("PermissionError" in result.error or "FileNotFoundError" in result.error)


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_a_root_server_runs_its_sandboxes_as_the_configured_uid(isolation, tmp_path):
    require_root("only root can change the sandbox's uid")
    require_isolation(isolation)
    provider = LocalProvider(Settings.from_env({"RLM_MCP_LOCAL_ISOLATION": isolation, "RLM_MCP_LOCAL_UID": "4243",
                                                "RLM_MCP_SANDBOX_MEMORY_MB": "1024"}))
    async with provider.create(SandboxSpec(private_context(tmp_path / "store"), no_subcalls)) as sandbox:
        result = await sandbox.execute("import os\nprint(os.getresuid(), os.getresgid(), os.getgroups())", timeout=30)
    assert result.stdout.strip() == "(4243, 4243, 4243) (4243, 4243, 4243) []", result


async def test_requiring_bubblewrap_where_it_is_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    provider = LocalProvider(Settings(local_isolation="bwrap"))
    with pytest.raises(SandboxError, match="bubblewrap is not installed.*apt-get install bubblewrap"):
        async with provider.create(SandboxSpec(private_context(tmp_path / "store"), no_subcalls)):
            pass


def test_an_unknown_isolation_mode_is_refused():
    from rlm_mcp.errors import ConfigError

    with pytest.raises(ConfigError, match="RLM_MCP_LOCAL_ISOLATION must be one of auto, bwrap, none"):
        Settings.from_env({"RLM_MCP_LOCAL_ISOLATION": "chroot"})


async def test_running_without_isolation_says_code_can_call_the_model_server_outside_the_budget(tmp_path):
    provider = LocalProvider(Settings(local_isolation="none", sandbox_memory_mb=1024))
    await provider.warm_up()  # what the server does at start: the warning is logged then
    isolation = await provider.isolation()
    warning = next(note for note in isolation.notes if "without isolation" in note)
    assert "model server on loopback directly, outside budget accounting" in warning
    async with provider.create(SandboxSpec(private_context(tmp_path / "store"), no_subcalls)) as sandbox:
        await sandbox.execute("pass", timeout=30)
    assert warning in sandbox.notes  # and every run on it lists it in its result's notes


def test_rlm_mcp_warns_at_start_when_local_sandboxes_run_without_isolation(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RLM_MCP_HOME": str(tmp_path / "home"),
           "RLM_MCP_LOCAL_ISOLATION": "none", "RLM_MCP_MODEL": "openai/needle"}
    server = subprocess.Popen([sys.executable, "-m", "rlm_mcp"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env)
    lines: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in server.stderr], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        # No client connects: the warning must come from the start alone.
        deadline = time.monotonic() + 60
        while not any("without isolation" in line for line in seen):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())).decode("utf-8", "replace"))
    except queue.Empty:
        pass
    finally:
        server.stdin.close()  # the stdio server stops at end of input
        server.wait(timeout=30)
        reader.join(timeout=30)
        server.stderr.close()
    warning = next((line for line in seen if "without isolation" in line), "")
    assert "local sandboxes run without isolation (RLM_MCP_LOCAL_ISOLATION=none)" in warning, "".join(seen)[-3000:]
    assert "call the model server on loopback directly, outside budget accounting" in warning


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_stderr_the_host_keeps_is_bounded_per_line_and_in_lines(isolation, tmp_path):
    require_isolation(isolation)
    provider = LocalProvider(Settings(local_isolation=isolation, sandbox_memory_mb=1024))
    async with provider.create(SandboxSpec(private_context(tmp_path / "store"), no_subcalls)) as sandbox:
        one_line = await sandbox.execute("import os\nos.write(2, b'E' * 30_000_000)\nos._exit(3)", timeout=60)
        many_lines = await sandbox.execute(
            "import os\nos.write(2, b'noise\\n' * 3_000_000 + b'last words\\n')\nos._exit(4)", timeout=60)
    assert one_line.state_lost and "exit code 3" in one_line.error
    assert len(one_line.error) < 5_000, f"{len(one_line.error):,} characters of stderr reached the model"
    assert "more bytes of this line not kept" in one_line.error
    assert many_lines.state_lost and "exit code 4" in many_lines.error and "last words" in many_lines.error
    assert len(many_lines.error) < 5_000


async def test_two_providers_in_one_server_run_sandboxes_side_by_side(tmp_path):
    # Each engine has its own registry and provider; their sandboxes' groups must not collide.
    context = private_context(tmp_path / "store")
    providers = [LocalProvider(Settings(local_isolation="none", sandbox_memory_mb=512)) for _ in range(2)]
    async with providers[0].create(SandboxSpec(context, no_subcalls)) as first, \
            providers[1].create(SandboxSpec(context, no_subcalls)) as second:
        results = [await sandbox.execute("print(context)", timeout=30) for sandbox in (first, second)]
    assert [r.stdout.strip() for r in results] == ["visible context"] * 2


async def test_control_groups_left_by_a_dead_server_are_removed_at_start(tmp_path):
    require_root("control groups are created by a root server")
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid names a server that is gone
    maker, reason = GroupMaker.discover(prefix=f"rlm-mcp-{owner_dir_name(gone.pid)}-")
    if maker is None:
        unavailable(f"no control groups on this host (CI's host lets root create them): {reason}")
    stale = maker.create(GroupLimits(memory_bytes=256 << 20, pids=16, cpus=1.0))
    sleeper = subprocess.Popen(["sleep", "600"], preexec_fn=stale.join)
    try:
        await LocalProvider(Settings(local_isolation="none")).warm_up()
        assert sleeper.wait(timeout=10) == -9
        assert not any(directory.exists() for directory in stale.dirs)
    finally:
        sleeper.kill()
        stale.remove()


# ----- the attacks again, from a server that is not root ----------------------------------------------

NON_ROOT_ATTACKS = ["capabilities", "remount-usr", "write-outside-workdir", "setsid-double-fork"]

NON_ROOT_SERVER = """
import asyncio, json, os, sys
from pathlib import Path
from rlm_mcp.config import Settings
from rlm_mcp.sandbox import ContextFile, SandboxSpec
from rlm_mcp.sandbox.local import LocalProvider

async def no_subcalls(op, prompt, model):
    raise AssertionError("no sub-calls expected")

async def main(isolation, cells):
    store = Path(os.environ["HOME"]) / "store"
    store.mkdir(mode=0o700)
    (store / "context.txt").write_text("visible context")
    (store / "context.txt").chmod(0o600)
    provider = LocalProvider(Settings(local_isolation=isolation, sandbox_memory_mb=512))
    seen = {}
    async with provider.create(SandboxSpec(ContextFile(store / "context.txt"), no_subcalls)) as sandbox:
        for name, code in cells.items():
            seen[name] = (await sandbox.execute(code, timeout=60)).render()
        notes = sandbox.notes
    print(json.dumps({"uid": os.getuid(), "seen": seen, "notes": notes}))

asyncio.run(main(sys.argv[1], json.loads(sys.stdin.read())))
"""


def unprivileged_python(uid: int) -> str:
    """An interpreter (3.11+) that ``uid`` can run: ours may sit under /root (pyenv, mode 0700)."""
    def run_as_user() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            done = subprocess.run([candidate, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                                  preexec_fn=run_as_user, capture_output=True, cwd="/", timeout=30)
        except OSError:
            continue
        if done.returncode == 0:
            return candidate
    message = f"no Python 3.11+ that uid {uid} may run (tried {sys.executable}, /usr/bin/python3)"
    unavailable(message)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_non_root_server_runs_sandboxes_without_capabilities_that_cannot_escape(isolation, host_dir):
    require_root(f"the test starts the non-root server as uid {UNPRIVILEGED_UID}")
    require_isolation(isolation)
    python = unprivileged_python(UNPRIVILEGED_UID)
    # The package, copied where that user can read it (the checkout may be under /root).
    code_dir = host_dir / "code"
    shutil.copytree(Path(__file__).parents[2] / "rlm_mcp", code_dir / "rlm_mcp",
                    ignore=shutil.ignore_patterns("__pycache__", "viewer"))
    home = host_dir / "home"
    home.mkdir()
    os.chown(home, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    target = host_dir / "target"  # root-owned, 0755: visible to an unisolated sandbox, not writable
    target.mkdir()
    target.chmod(0o755)
    nonce = uuid.uuid4().hex[:12]
    attacks = {a.name: a for a in ATTACKS if a.name in NON_ROOT_ATTACKS}
    cells = {name: "import json\n" + textwrap.dedent(a.code).strip().replace("{nonce}", nonce)
             .replace("{host_dir}", str(target)) for name, a in attacks.items()}

    def become_server() -> None:
        os.setgroups([])
        os.setresgid(UNPRIVILEGED_UID, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        os.setresuid(UNPRIVILEGED_UID, UNPRIVILEGED_UID, UNPRIVILEGED_UID)

    done = subprocess.run([python, "-c", NON_ROOT_SERVER, isolation], input=json.dumps(cells), text=True,
                          capture_output=True, preexec_fn=become_server, cwd=str(home), timeout=300,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
                               "PYTHONPATH": str(code_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["uid"] == UNPRIVILEGED_UID
    backend = f"local-{isolation} (server uid {UNPRIVILEGED_UID})"
    for name, attack in attacks.items():
        attack.check(Outcome(backend, None, report["seen"][name], 0, nonce, target))
    assert not processes_with(nonce)
    # No control group for a non-root server here: the limits that then hold are named.
    assert any("cannot be limited as a whole" in note for note in report["notes"]), report["notes"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_DUMPABLE) is Linux-only")
def test_the_server_becomes_non_dumpable_so_same_user_workers_cannot_read_its_keys():
    # The kernel then refuses /proc/<server>/environ and ptrace to other processes of the same
    # (non-root) user; root keeps CAP_SYS_PTRACE, which is why root servers want bwrap or Docker.
    import ctypes

    LocalProvider(Settings(local_isolation="none"))
    pr_get_dumpable = 3
    assert ctypes.CDLL(None).prctl(pr_get_dumpable, 0, 0, 0, 0) == 0
