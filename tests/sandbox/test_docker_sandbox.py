"""The Docker backend's isolation, limits, recovery and lifecycle, proved from inside the
container through ``execute()`` and from the engine's side through docker-py."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from rlm_mcp.errors import RlmError, SandboxError
from rlm_mcp.sandbox.base import ContextFile, SandboxSpec
from rlm_mcp.sandbox.docker import (
    LABEL,
    LABEL_VALUE,
    OWNER_LABEL,
    DockerProvider,
    DockerSandbox,
    build_sandbox_image,
    mounts_dir_name,
    owner_token,
    reap_leftovers,
)
from rlm_mcp.testing.model_server import ScriptedModelServer
from tests.docker_support import IMAGE, ProviderFactory, docker_settings
from tests.server.test_transports import INITIALIZE, REPO, RLM_MCP, RawStdio, server_env

# Fixtures (docker_engine, docker_provider, make_docker_provider, docker_over_tcp) come from
# tests/docker_support.py, registered in conftest.py's pytest_plugins.

pytestmark = pytest.mark.docker

CONTEXT = "The vault code is XK-42.\nSecond line of the context.\n"


class Recorder:
    """A sub-call handler that answers ``op:prompt-length`` and remembers the prompts."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    async def __call__(self, op: str, prompt: str, model: str | None) -> str:
        self.calls.append((op, prompt, model))
        if prompt == "fail":
            raise RlmError("the sub-model is unavailable")
        return f"{op}:{len(prompt)}"


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "context.txt"
    path.parent.mkdir()
    path.write_text(CONTEXT, encoding="utf-8")
    return path


def spec(path: Path | None, handler: Recorder | None = None) -> SandboxSpec:
    return SandboxSpec(context=ContextFile(path), handler=handler or Recorder(), labels={"test": "docker"})


async def run(sandbox: DockerSandbox, code: str, timeout: float = 20.0) -> str:
    """Execute a cell that must succeed; return its stdout."""
    result = await sandbox.execute(textwrap.dedent(code), timeout=timeout)
    assert result.error is None, result.render()
    return result.stdout


def container_exists(client: docker.DockerClient, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
        return True
    except docker.errors.NotFound:
        return False


# ----- isolation -----------------------------------------------------------------------------


async def test_cells_run_as_unprivileged_user_without_capabilities_on_read_only_root(
        docker_provider: DockerProvider, context_file: Path) -> None:
    async with docker_provider.create(spec(context_file)) as sandbox:
        out = await run(sandbox, """
            import os
            print(os.getuid(), os.geteuid(), os.getgid())
            print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])
            for target in ('/etc/evil', '/opt/rlm/worker.py', '/context/data', '/usr/bin/evil'):
                try:
                    open(target, 'w').write('x')
                    print('WROTE', target)
                except OSError as exc:
                    print('refused', target, type(exc).__name__)
            print(sorted((l.split()[1], l.split()[3].split(',')[0]) for l in open('/proc/self/mounts')
                         if l.split()[1] in ('/', '/context', '/opt/rlm/worker.py')))
            open('/tmp/scratch', 'w').write('ok')
            print(open('/tmp/scratch').read())
        """)
    lines = out.splitlines()
    uid, euid, gid = map(int, lines[0].split())
    assert uid != 0 and euid != 0 and gid != 0
    assert int(lines[1], 16) == 0, "the worker must hold no capabilities"
    assert not any(line.startswith("WROTE") for line in lines), out
    assert lines[-2] == "[('/', 'ro'), ('/context', 'ro'), ('/opt/rlm/worker.py', 'ro')]"
    assert lines[-1] == "ok", "/tmp must stay writable (tmpfs)"


async def test_no_network_connection_succeeds_from_the_sandbox(
        docker_provider: DockerProvider, context_file: Path) -> None:
    host_ip = socket.gethostbyname(socket.gethostname())
    async with docker_provider.create(spec(context_file)) as sandbox:
        out = await run(sandbox, f"""
            import os, socket
            print(sorted(name for _, name in socket.if_nameindex()))
            for address in [('1.1.1.1', 443), ('8.8.8.8', 53), ('172.17.0.1', 2375),
                            ('{host_ip}', 22), ('10.0.0.1', 80), ('::1', 80), ('127.0.0.1', 2375)]:
                try:
                    socket.create_connection(address, timeout=2).close()
                    print('CONNECTED', address)
                except OSError as exc:
                    print('blocked', address, type(exc).__name__)
            try:
                socket.getaddrinfo('deb.debian.org', 80)
                print('RESOLVED')
            except OSError:
                print('no dns')
            print(os.path.exists('/var/run/docker.sock'), os.path.exists('/run/docker.sock'))
        """, timeout=60)
    lines = out.splitlines()
    assert lines[0] == "['lo']", f"only loopback may exist: {lines[0]}"
    assert not any("CONNECTED" in line or line == "RESOLVED" for line in lines), out
    assert lines[-1] == "False False", "the engine's socket must not be reachable"


async def test_host_files_and_environment_outside_the_context_are_invisible(
        docker_provider: DockerProvider, context_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = context_file.parent / "secret.txt"
    secret.write_text("host secret", encoding="utf-8")
    monkeypatch.setenv("RLM_TEST_HOST_SECRET", "do-not-leak")
    async with docker_provider.create(spec(context_file)) as sandbox:
        out = await run(sandbox, f"""
            import os
            print(sorted(os.listdir('/context')))
            print(os.path.exists({str(secret)!r}), os.path.exists({str(context_file)!r}))
            print(os.path.exists({str(Path.home())!r} + '/.bashrc'), 'RLM_TEST_HOST_SECRET' in os.environ)
            print(sorted(k for k in os.environ if 'KEY' in k or 'TOKEN' in k or 'DOCKER' in k))
            print(context == open('/context/data').read())
        """)
    assert out.splitlines() == ["['data']", "False False", "False False", "[]", "True"]


# ----- limits --------------------------------------------------------------------------------


async def test_allocation_beyond_memory_limit_fails_cleanly_and_state_survives(
        make_docker_provider: ProviderFactory, context_file: Path) -> None:
    provider = await make_docker_provider(sandbox_memory_mb=256)
    async with provider.create(spec(context_file)) as sandbox:
        await run(sandbox, "kept = 'still here'")
        result = await sandbox.execute("blob = b'x' * (400 << 20)", timeout=30)
        assert result.error is not None and "MemoryError" in result.error, result.render()
        assert not result.state_lost
        assert await run(sandbox, "print(kept, len(context))") == f"still here {len(CONTEXT)}\n"


async def test_fork_bomb_hits_the_pids_limit_and_the_sandbox_recovers(
        make_docker_provider: ProviderFactory, context_file: Path) -> None:
    provider = await make_docker_provider(sandbox_pids=32)
    async with provider.create(spec(context_file)) as sandbox:
        sandbox.interrupt_grace_s = 1.0
        # Bounded: count how many processes fit, then let them go.
        out = await run(sandbox, """
            import os
            kept = 'before the bomb'
            r, w = os.pipe()
            children = []
            try:
                while True:
                    pid = os.fork()
                    if pid == 0:
                        os.close(w)
                        os.read(r, 1)
                        os._exit(0)
                    children.append(pid)
            except OSError as exc:
                print(type(exc).__name__, len(children))
            os.close(w)
            for pid in children:
                os.waitpid(pid, 0)
        """, timeout=60)
        error_name, count = out.split()
        assert error_name == "BlockingIOError" and 0 < int(count) < 32, out
        # Unbounded: every child forks forever; the cell times out and the REPL still answers.
        result = await sandbox.execute(textwrap.dedent("""
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """), timeout=3)
        assert result.timed_out, result.render()
        after = await sandbox.execute("print(len(context))", timeout=30)
        assert after.error is None and after.stdout == f"{len(CONTEXT)}\n", after.render()


async def test_timeout_interrupts_the_cell_and_keeps_state(
        docker_provider: DockerProvider, context_file: Path) -> None:
    async with docker_provider.create(spec(context_file)) as sandbox:
        await run(sandbox, "counter = 41")
        container = sandbox.container_id
        result = await sandbox.execute("while True:\n    counter += 0", timeout=1)
        assert result.timed_out and not result.state_lost, result.render()
        assert "interrupted" in (result.error or "")
        assert await run(sandbox, "print(counter + 1)") == "42\n"
        assert sandbox.container_id == container, "an interruptible cell must not cost the container"


async def test_cell_ignoring_interrupt_gets_a_fresh_container_with_state_lost_notice(
        docker_provider: DockerProvider, context_file: Path, docker_engine: docker.DockerClient) -> None:
    async with docker_provider.create(spec(context_file)) as sandbox:
        sandbox.interrupt_grace_s = 0.5
        await run(sandbox, "counter = 1")
        first = sandbox.container_id
        assert first is not None
        result = await sandbox.execute(textwrap.dedent("""
            import signal
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            while True:
                pass
        """), timeout=1)
        assert result.timed_out and result.state_lost, result.render()
        assert "killed and restarted" in (result.error or "")
        assert not container_exists(docker_engine, first), "the stuck container must be removed"
        assert sandbox.container_id not in (None, first)
        after = await sandbox.execute("print(len(context))\ncounter", timeout=20)
        assert after.stdout.startswith(f"{len(CONTEXT)}\n") and "NameError" in (after.error or "")


async def test_worker_crash_is_reported_with_exit_code_and_stderr_then_replaced(
        docker_provider: DockerProvider, context_file: Path, docker_engine: docker.DockerClient) -> None:
    async with docker_provider.create(spec(context_file)) as sandbox:
        first = sandbox.container_id
        result = await sandbox.execute("import os\nos.write(2, b'dying on purpose\\n')\nos._exit(3)",
                                       timeout=20)
        assert result.state_lost and "exit code 3" in (result.error or ""), result.render()
        assert "dying on purpose" in (result.error or "")
        assert first is not None and not container_exists(docker_engine, first)
        assert await run(sandbox, "print(context.split()[4])") == "XK-42.\n"


# ----- channel -------------------------------------------------------------------------------


async def test_llm_query_round_trips_large_prompts_through_the_attach_stream(
        docker_provider: DockerProvider, context_file: Path) -> None:
    handler = Recorder()
    async with docker_provider.create(spec(context_file, handler)) as sandbox:
        out = await run(sandbox, """
            print(llm_query('x' * 3_000_000, model='small'))
            print(llm_query_batched([f'q{i}' for i in range(20)] + ['fail']))
            print('é✓' * 5)
        """)
    lines = out.splitlines()
    assert lines[0] == "llm_query:3000000"
    assert lines[1].endswith("'Error: the sub-model is unavailable']") and "'llm_query:3'" in lines[1]
    assert lines[2] == "é✓" * 5
    assert ("llm_query", "x" * 3_000_000, "small") in handler.calls


async def test_context_file_is_hard_linked_when_world_readable_and_copied_when_private(
        docker_provider: DockerProvider, context_file: Path, docker_engine: docker.DockerClient) -> None:
    for mode, linked in ((0o644, True), (0o600, False)):
        context_file.chmod(mode)
        async with docker_provider.create(spec(context_file)) as sandbox:
            container = docker_engine.containers.get(sandbox.container_id)
            mount = next(m["Source"] for m in container.attrs["Mounts"] if m["Destination"] == "/context")
            assert Path(mount, "data").samefile(context_file) is linked
            assert await run(sandbox, "print(len(context))") == f"{len(CONTEXT)}\n"
        assert context_file.stat().st_mode & 0o777 == mode, "the store's file keeps its mode"


async def test_missing_context_file_is_a_clear_error(docker_provider: DockerProvider, tmp_path: Path) -> None:
    sandbox = docker_provider.create(spec(tmp_path / "gone.txt"))
    with pytest.raises(SandboxError, match="gone.txt does not exist"):
        async with sandbox:
            pass


async def test_sandbox_without_context_starts_with_empty_context(docker_provider: DockerProvider) -> None:
    async with docker_provider.create(spec(None)) as sandbox:
        assert await run(sandbox, "print(repr(context))") == "''\n"


# ----- lifecycle -----------------------------------------------------------------------------


async def test_close_removes_the_container_and_its_mount_directory(
        docker_provider: DockerProvider, context_file: Path, docker_engine: docker.DockerClient) -> None:
    sandbox = docker_provider.create(spec(context_file))
    await sandbox.start()
    container_id = sandbox.container_id
    assert container_id is not None
    container = docker_engine.containers.get(container_id)
    assert container.labels[LABEL] == LABEL_VALUE and container.labels["test"] == "docker"
    mount = next(m["Source"] for m in container.attrs["Mounts"] if m["Destination"] == "/context")
    assert Path(mount, "data").read_text(encoding="utf-8") == CONTEXT
    await sandbox.close()
    await sandbox.close()  # twice is fine
    assert not container_exists(docker_engine, container_id)
    assert not Path(mount).exists()
    assert context_file.read_text(encoding="utf-8") == CONTEXT, "the store's file is untouched"
    with pytest.raises(SandboxError, match="closed"):
        await sandbox.execute("1", timeout=5)


async def test_warm_pool_hands_out_started_containers_and_never_reuses_one(
        make_docker_provider: ProviderFactory, context_file: Path, docker_engine: docker.DockerClient) -> None:
    provider = await make_docker_provider(docker_pool_size=2)
    await provider.warm_up()
    pooled = set(provider.pooled_ids())
    assert len(pooled) == 2
    assert all(docker_engine.containers.get(cid).status == "running" for cid in pooled)
    used: list[str] = []
    for _ in range(3):
        async with provider.create(spec(context_file)) as sandbox:
            assert sandbox.container_id is not None
            used.append(sandbox.container_id)
            assert await run(sandbox, "print(context.splitlines()[0])") == "The vault code is XK-42.\n"
            crash = await sandbox.execute("import os; os._exit(1)", timeout=20)
            assert crash.state_lost
            assert sandbox.container_id is not None
            used.append(sandbox.container_id)
            assert await run(sandbox, "print(len(context))") == f"{len(CONTEXT)}\n"
        await provider.warm_up()
    assert used[0] in pooled, "the first sandbox must get a container that was already started"
    assert len(set(used)) == len(used), f"a container was reused: {used}"
    assert not set(provider.pooled_ids()) & set(used)
    assert not any(container_exists(docker_engine, cid) for cid in used)


async def test_provider_aclose_removes_pool_and_open_sandboxes(
        make_docker_provider: ProviderFactory, context_file: Path, docker_engine: docker.DockerClient) -> None:
    provider = await make_docker_provider(docker_pool_size=2)
    await provider.warm_up()
    sandbox = provider.create(spec(context_file))
    await sandbox.start()
    ids = provider.pooled_ids() + [sandbox.container_id]
    await provider.aclose()
    assert not any(container_exists(docker_engine, cid) for cid in ids if cid)
    assert not provider.mounts_dir.exists()
    with pytest.raises(SandboxError, match="closed"):
        provider.create(spec(context_file))


async def test_context_copied_into_a_volume_for_remote_engines(
        make_docker_provider: ProviderFactory, context_file: Path, docker_engine: docker.DockerClient) -> None:
    provider = await make_docker_provider(context_transfer="volume", docker_pool_size=2)
    async with provider.create(spec(context_file)) as sandbox:
        assert provider.pooled_ids() == [], "no warm pool when the context travels in a volume"
        container = docker_engine.containers.get(sandbox.container_id)
        volume = next(m["Name"] for m in container.attrs["Mounts"] if m["Type"] == "volume")
        out = await run(sandbox, """
            import os
            print(context.splitlines()[0], sorted(os.listdir('/context')))
            print([line.split()[3].split(',')[0] for line in open('/proc/self/mounts')
                   if line.split()[1] == '/context'])
        """)
        assert out.splitlines() == ["The vault code is XK-42. ['data', 'worker.py']", "['ro']"]
        assert (await sandbox.execute("import os; os._exit(2)", timeout=20)).state_lost
        assert await run(sandbox, "print(len(context))") == f"{len(CONTEXT)}\n"
    with pytest.raises(docker.errors.NotFound):
        docker_engine.volumes.get(volume)


async def test_engine_reached_over_tcp_gets_the_context_through_a_volume(
        docker_over_tcp: str, context_file: Path, tmp_path: Path) -> None:
    provider = DockerProvider(docker_settings(tmp_path / "home", docker_pool_size=2))
    try:
        async with provider.create(spec(context_file)) as sandbox:
            assert provider.context_transfer == "volume" and provider.pool_size == 0
            out = await run(sandbox, "print(context.splitlines()[0]); print(llm_query('over tcp'))")
            assert out == "The vault code is XK-42.\nllm_query:8\n"
            result = await sandbox.execute("while True:\n    pass", timeout=1)
            assert result.timed_out and not result.state_lost, result.render()
    finally:
        await provider.aclose()
    assert not provider.mounts_dir.exists()


async def test_reaping_removes_leftovers_of_dead_servers_but_not_of_live_ones(
        docker_engine: docker.DockerClient, tmp_path: Path) -> None:
    exited = subprocess.Popen(["true"])
    exited.wait()
    dead_owner = owner_token(exited.pid)  # a server process that is gone
    marker = f"rlm-mcp.test-reap-{tmp_path.name}"
    image = docker_settings(tmp_path).docker_image

    def make(owner: str, start: bool) -> str:
        container = docker_engine.containers.create(
            image, ["python3", "-c", "import sys; sys.stdin.read()"], stdin_open=True,
            network_mode="none", labels={LABEL: LABEL_VALUE, OWNER_LABEL: owner, marker: "1"})
        if start:
            container.start()
        return container.id

    dead_running = make(dead_owner, start=True)
    dead_created = make(dead_owner, start=False)
    live_running = make(owner_token(), start=True)
    live_created = make(owner_token(), start=False)
    try:
        mounts = tmp_path / "mounts"
        stale_dir = mounts / mounts_dir_name(exited.pid)
        stale_dir.mkdir(parents=True)
        assert reap_leftovers(docker_engine, mounts) >= 3
        assert not container_exists(docker_engine, dead_running)
        assert not container_exists(docker_engine, dead_created)
        assert container_exists(docker_engine, live_running) and container_exists(docker_engine, live_created)
        assert not stale_dir.exists()
    finally:
        for container in docker_engine.containers.list(all=True, filters={"label": marker}):
            container.remove(force=True)


# ----- errors and image build ------------------------------------------------------------------


async def test_missing_image_error_says_how_to_build_it(
        make_docker_provider: ProviderFactory, context_file: Path) -> None:
    provider = await make_docker_provider(docker_image="rlm-mcp-sandbox:no-such-tag")
    with pytest.raises(SandboxError, match="rlm-mcp sandbox build"):
        async with provider.create(spec(context_file)):
            pass


async def test_unreachable_engine_error_says_how_to_start_docker_or_use_local(
        tmp_path: Path, context_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    provider = DockerProvider(docker_settings(tmp_path / "home"))
    try:
        with pytest.raises(SandboxError, match="RLM_MCP_SANDBOX=local") as caught:
            async with provider.create(spec(context_file)):
                pass
        assert "start Docker" in str(caught.value)
    finally:
        await provider.aclose()


def test_unknown_context_transfer_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="'bind' or 'volume'"):
        DockerProvider(docker_settings(tmp_path), context_transfer="nfs")  # type: ignore[arg-type]


def test_build_sandbox_image_is_repeatable_through_the_api(
        docker_engine: docker.DockerClient, tmp_path: Path) -> None:
    lines: list[str] = []
    tag = build_sandbox_image(docker_settings(tmp_path), log=lines.append)
    assert tag == docker_settings(tmp_path).docker_image
    assert any("Successfully tagged" in line or "built" in line for line in lines), lines
    assert docker_engine.images.get(tag).attrs["Config"]["User"] == "65534:65534"


CRASHING_SERVER = """
import asyncio, os, sys
from pathlib import Path
from rlm_mcp.sandbox.base import ContextFile, SandboxSpec
from rlm_mcp.sandbox.docker import DockerProvider
from tests.docker_support import docker_settings

async def handler(op, prompt, model):
    return ""

async def main():
    provider = DockerProvider(docker_settings(Path(sys.argv[1]), docker_pool_size=1))
    await provider.warm_up()
    sandbox = provider.create(SandboxSpec(ContextFile(None), handler))
    await sandbox.start()
    await provider.warm_up()
    print(sandbox.container_id, *provider.pooled_ids(), flush=True)
    os._exit(0)  # a crash: no close(), no aclose()

asyncio.run(main())
"""


async def test_containers_of_a_crashed_server_exit_and_are_reaped_by_the_next_provider(
        docker_engine: docker.DockerClient, tmp_path: Path) -> None:
    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_SERVER, str(tmp_path / "crashed-home"),
        cwd=Path(__file__).resolve().parents[2], stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(crashed.communicate(), 120)
    ids = out.decode().split()
    assert crashed.returncode == 0 and len(ids) == 2, out
    for container_id in ids:  # the attach stream closed with the server: each worker saw EOF
        status = await asyncio.to_thread(docker_engine.containers.get(container_id).wait, timeout=30)
        assert status["StatusCode"] == 0
    mounts = tmp_path / "crashed-home" / "docker-mounts"
    left = [p.name for p in mounts.iterdir()]  # host_pid_start; the pid is dead, so no start
    assert len(left) == 1 and left[0].startswith(mounts_dir_name(crashed.pid)), left
    provider = DockerProvider(docker_settings(tmp_path / "crashed-home"))
    try:
        await provider.warm_up()  # connecting reaps
    finally:
        await provider.aclose()
    assert not any(container_exists(docker_engine, cid) for cid in ids)
    assert list(mounts.iterdir()) == [], "the crashed server's mount directories are removed"


# ----- a server killed with SIGKILL: the next server cleans up at start -----------------------------

STUBBORN_CELL = """
import signal, time
for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(number, signal.SIG_IGN)
llm_query("the cell is running")
while True:
    time.sleep(0.5)
"""
REAPED = "leftover item(s) of servers that are gone"


class StderrWatch:
    """Reads a process's stderr in a thread; ``seen`` is set once a line contains ``text``."""

    def __init__(self, proc: subprocess.Popen[str], text: str) -> None:
        self.lines: list[str] = []
        self.seen = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(proc, text), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str], text: str) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line)
            if text in line:
                self.seen.set()


def test_a_server_killed_mid_cell_leaves_nothing_once_the_next_server_starts(
        docker_engine: docker.DockerClient, model_server: ScriptedModelServer, tmp_path: Path) -> None:
    model = f"crash-{uuid.uuid4().hex[:12]}"
    cell_running = threading.Event()

    def gate(messages: list[dict[str, Any]]) -> str:  # the cell's llm_query: it runs now
        cell_running.set()
        return "go on"

    model_server.script(model, [f"```repl\n{STUBBORN_CELL}\n```", gate])
    tmp = tmp_path / "tmp"  # the servers' TMPDIR, so only their directories are looked at
    tmp.mkdir()
    home = tmp_path / "home"
    env = server_env(model_server, home, RLM_MCP_MODEL=f"openai/{model}", RLM_MCP_SANDBOX="docker",
                     RLM_MCP_DOCKER_IMAGE=IMAGE, RLM_MCP_SANDBOX_MEMORY_MB="512", TMPDIR=str(tmp))
    exited = subprocess.Popen(["true"])
    exited.wait()
    other_leftover = tmp / f"rlm-sandbox-{mounts_dir_name(exited.pid)}-abc123"  # a dead local sandbox's
    other_leftover.mkdir()
    live = tmp / f"rlm-run-{mounts_dir_name()}-def456"  # a live server's (this process)
    legacy = tmp / "rlm-run-k2j3h4g5"  # no owner in the name: nothing to go by
    live.mkdir()
    legacy.mkdir()
    first_owner = ""
    try:
        with RawStdio(env) as first:
            first_owner = owner_token(first.proc.pid)
            first.send(INITIALIZE)
            first.reply(1)
            first.send({"method": "notifications/initialized"})
            first.send({"id": 2, "method": "tools/call", "params": {"name": "rlm_complete", "arguments": {
                "query": "Summarise.", "context": "a short document", "wait_s": 1}}})
            assert cell_running.wait(120), "the cell never ran: " + "".join(first.stderr)[-3000:]
            [container] = docker_engine.containers.list(filters={"label": f"{OWNER_LABEL}={first_owner}"})
            run_dirs = [p for p in tmp.iterdir() if p.name.startswith(f"rlm-run-{mounts_dir_name(first.proc.pid)}")]
            assert len(run_dirs) == 1, list(tmp.iterdir())
            first.proc.kill()  # SIGKILL: no clean-up of any kind
            first.proc.wait(timeout=30)
        container.reload()
        assert container.status == "running", "the stubborn cell's container should outlive a killed server"

        second = subprocess.Popen([*RLM_MCP], env={**env, "RLM_MCP_SANDBOX": "local"}, cwd=REPO, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        watch = StderrWatch(second, REAPED)
        try:
            assert watch.seen.wait(60), "the new server reaped nothing: " + "".join(watch.lines)[-3000:]
        finally:
            assert second.stdin is not None
            second.stdin.close()  # a stdio server stops when its host goes
            second.wait(timeout=30)
            watch.thread.join(timeout=10)
        assert not container_exists(docker_engine, container.id)
        assert not run_dirs[0].exists() and not other_leftover.exists()
        assert live.exists() and legacy.exists()
        assert not (home / "docker-mounts" / mounts_dir_name(first.proc.pid)).exists()
        assert second.returncode == 0, "".join(watch.lines)[-3000:]
    finally:
        if first_owner:
            for leftover in docker_engine.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={first_owner}"}):
                leftover.remove(force=True)
