"""Hostile code against every sandbox backend, the way a prompt-injected input would attack.

One scripted root model writes the attack: its first reply is the attack cell, its second is
``FINAL(survived)``. The run goes through the real engine (litellm over HTTP to the scripted
model server, a real sandbox of each backend), then one check per wall looks at what came back:
the attack's own report, what the root model saw next, the trajectory, and the host.

To add an attack, append an :class:`Attack` to ``ATTACKS``: its code (``{nonce}`` and
``{host_dir}`` are filled in; print ``REPORT <json>`` for the check to read), a check that fails
when the wall did not hold, and ``not_on`` for the backends where that wall genuinely does not
exist, with the reason (the test then skips and says so).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from rlm_mcp.config import Limits, Settings
from rlm_mcp.engine import RlmEngine, RunRequest, RunResult
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.sandbox import ContextFile
from rlm_mcp.testing.model_server import ScriptedModelServer
from tests.daytona_support import emulator_settings
from tests.docker_support import IMAGE
from tests.support import require_bwrap

MEMORY_MB = 1024  # every backend runs the attacks under this memory limit
PIDS = 256

BACKENDS = ["local-bwrap", "local-none", "docker", "daytona"]
EMULATOR = "the Daytona emulator runs commands as plain host processes of the test's user; Daytona " \
           "itself isolates each sandbox in its own VM, which the emulator does not imitate"


# ----- what a check sees ----------------------------------------------------------------------------


@dataclass
class Outcome:
    backend: str
    result: RunResult | None  # None when the attack ran on a sandbox directly (tests/sandbox/test_local_sandbox.py)
    seen: str  # the message the root model got after the attack cell
    trajectory_bytes: int
    nonce: str
    host_dir: Path  # root-owned, mode 0755: visible to an unisolated sandbox, never writable

    @property
    def report(self) -> dict[str, Any]:
        """The JSON the attack printed after ``REPORT``."""
        for line in reversed(self.seen.splitlines()):
            if line.startswith("REPORT "):
                return json.loads(line[len("REPORT "):])
        raise AssertionError(f"the attack printed no REPORT line; the model saw:\n{self.seen[:2000]}")


@dataclass(frozen=True)
class Attack:
    name: str
    code: str
    check: Callable[[Outcome], None]
    not_on: Mapping[str, str] = field(default_factory=dict)  # backend -> why the wall is not there


# ----- the walls --------------------------------------------------------------------------------------


def no_capabilities_and_not_root(outcome: Outcome) -> None:
    report = outcome.report
    assert "0" not in report["Uid"], f"the sandbox runs with uid 0: {report}"
    assert int(report["CapEff"], 16) == 0 and int(report["CapPrm"], 16) == 0, f"capabilities left: {report}"
    assert report["NoNewPrivs"] == "1", f"the sandbox may gain privileges (setuid programs): {report}"


def remount_and_host_write_fail(outcome: Outcome) -> None:
    report = outcome.report
    assert report["mount"] != 0, f"remounting /usr read-write succeeded: {report}"
    assert report["wrote"] is not True, f"the sandbox wrote into /usr: {report}"
    assert not Path(f"/usr/rlm-hostile-{outcome.nonce}").exists(), "the file appeared in the host's /usr"


def host_directory_stays_unwritten(outcome: Outcome) -> None:
    report = outcome.report
    assert report["wrote"] is not True, f"the sandbox wrote outside its working directory: {report}"
    assert list(outcome.host_dir.iterdir()) == [], "a file appeared in the host directory"


def stderr_flood_stays_out_of_the_prompt(outcome: Outcome) -> None:
    # 30 MB went to fd 2; the model and the trajectory get at most a few kilobytes of it.
    assert len(outcome.seen) < 30_000, f"{len(outcome.seen):,} characters reached the root prompt"
    assert outcome.trajectory_bytes < 200_000, f"the trajectory grew to {outcome.trajectory_bytes:,} bytes"
    assert "worker died" in outcome.seen and "exit code 3" in outcome.seen, outcome.seen[:2000]


def forks_stop_at_the_cap(outcome: Outcome) -> None:
    report = outcome.report
    assert report["started"] < 300 and report["error"], f"300 forks all succeeded: {report}"
    if outcome.backend.startswith("local"):  # the local backend also tells the model, and the caller, why
        assert f"process limit ({PIDS})" in outcome.seen, outcome.seen[-2000:]
        if outcome.result is not None:
            assert any(f"process limit ({PIDS})" in note for note in outcome.result.notes), outcome.result.notes


def memory_is_bounded_for_the_whole_sandbox(outcome: Outcome) -> None:
    if "worker died" in outcome.seen:  # the kernel chose the worker: also within the limit
        return
    report = outcome.report
    assert report["alive_with_800mb"] < 3, f"three 800 MB children lived under a {MEMORY_MB} MB limit: {report}"
    if outcome.backend.startswith("local"):
        assert f"memory limit ({MEMORY_MB:,} MB" in outcome.seen, outcome.seen[-2000:]
        if outcome.result is not None:
            assert any("memory limit" in note for note in outcome.result.notes), outcome.result.notes


def scratch_space_is_bounded(outcome: Outcome) -> None:
    if "worker died" in outcome.seen:
        assert outcome.backend == "docker" or f"memory limit ({MEMORY_MB:,} MB" in outcome.seen, outcome.seen
        return
    report = outcome.report
    assert report["written_mb"] < 1500 and report["error"], f"1.5 GB went into /tmp: {report}"


def no_process_outlives_the_sandbox(outcome: Outcome) -> None:
    assert outcome.report["started"], outcome.seen
    survivors = processes_with(f"rlm-hostile-{outcome.nonce}")
    assert not survivors, f"processes outlived the sandbox: {survivors}"


def processes_with(marker: str) -> list[str]:
    """Command lines on this host (containers included) that contain ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if marker.encode() in cmdline:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {shown}")
    return found


# The worker's private channel, found as hostile code would: the writable pipe (or socket)
# above the standard descriptors in /proc/self/fd.
CHANNEL_FD = """
        import fcntl, os, stat
        fd = next(int(n) for n in sorted(os.listdir("/proc/self/fd"), key=int) if int(n) > 2
                  and stat.S_ISFIFO(os.fstat(int(n)).st_mode) | stat.S_ISSOCK(os.fstat(int(n)).st_mode)
                  and fcntl.fcntl(int(n), fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY)
"""


def channel_abuse_kills_the_worker(cause: str) -> Callable[[Outcome], None]:
    """The host killed the worker, said why, and kept what reached the prompt small (server
    memory under the same attack: tests/sandbox/test_sandbox_contract.py measures it)."""
    def check(outcome: Outcome) -> None:
        assert "The host killed the REPL worker" in outcome.seen and cause in outcome.seen, outcome.seen[:2000]
        assert len(outcome.seen) < 30_000, f"{len(outcome.seen):,} characters reached the root prompt"
    return check


ATTACKS = [
    Attack("capabilities", """
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        print("REPORT", json.dumps({key: status[key].strip() for key in ("Uid", "CapEff", "CapPrm", "NoNewPrivs")}))
        """, no_capabilities_and_not_root, not_on={"daytona": EMULATOR}),
    Attack("remount-usr", """
        import ctypes
        MS_REMOUNT, MS_BIND = 32, 4096
        mounted = ctypes.CDLL(None, use_errno=True).mount(b"none", b"/usr", None, MS_REMOUNT | MS_BIND, None)
        try:
            with open("/usr/rlm-hostile-{nonce}", "w") as handle:
                handle.write("escaped")
            wrote = True
        except OSError as exc:
            wrote = repr(exc)
        print("REPORT", json.dumps({"mount": mounted, "errno": ctypes.get_errno(), "wrote": wrote}))
        """, remount_and_host_write_fail, not_on={"daytona": EMULATOR}),
    Attack("write-outside-workdir", """
        try:
            with open("{host_dir}/planted", "w") as handle:
                handle.write("escaped")
            wrote = True
        except OSError as exc:
            wrote = repr(exc)
        print("REPORT", json.dumps({"wrote": wrote}))
        """, host_directory_stays_unwritten, not_on={"daytona": EMULATOR}),
    Attack("stderr-flood", """
        import os
        chunk = b"E" * (1 << 20)
        for _ in range(30):
            os.write(2, chunk)
        os._exit(3)
        """, stderr_flood_stays_out_of_the_prompt),
    Attack("fork-300", """
        import os, time
        children, error = [], None
        for _ in range(300):
            try:
                pid = os.fork()
            except OSError as exc:
                error = repr(exc)
                break
            if pid == 0:
                time.sleep(120)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        print("REPORT", json.dumps({"started": len(children), "error": error}))
        """, forks_stop_at_the_cap, not_on={"daytona": EMULATOR}),
    Attack("three-800mb-children", """
        import os
        children = []
        for _ in range(3):
            answer_r, answer_w = os.pipe()
            ask_r, ask_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    block = b"\\x01" * (800 << 20)
                    os.write(answer_w, b"1")
                except MemoryError:
                    os.write(answer_w, b"0")
                os.read(ask_r, 1)  # stay alive (holding the block) until asked
                os.write(answer_w, b"2")
                os._exit(0)
            os.close(answer_w)
            os.close(ask_r)
            children.append((pid, answer_r, ask_w, os.read(answer_r, 1)))
        alive = 0
        for pid, answer_r, ask_w, allocated in children:
            try:
                os.write(ask_w, b"?")
                alive += allocated == b"1" and os.read(answer_r, 1) == b"2"
            except OSError:  # the kernel killed it: its pipe is gone
                pass
            os.waitpid(pid, 0)
        print("REPORT", json.dumps({"alive_with_800mb": alive, "allocated": [c[3].decode() for c in children]}))
        """, memory_is_bounded_for_the_whole_sandbox, not_on={"daytona": EMULATOR}),
    Attack("fill-tmp-1500mb", """
        import os
        written, error = 0, None
        chunk = b"\\x01" * (1 << 20)
        try:
            with open("/tmp/rlm-hostile-fill", "wb") as handle:
                for _ in range(1500):
                    handle.write(chunk)
                    written += 1
                handle.flush()
        except OSError as exc:
            error = repr(exc)
        finally:
            if os.path.exists("/tmp/rlm-hostile-fill"):
                os.unlink("/tmp/rlm-hostile-fill")
        print("REPORT", json.dumps({"written_mb": written, "error": error}))
        """, scratch_space_is_bounded,
        not_on={"local-none": "without bubblewrap /tmp is the host's own: disk use is bounded per file only "
                              "(documented, and listed in the run's notes)",
                "daytona": EMULATOR}),
    Attack("setsid-double-fork", """
        import os
        ready_r, ready_w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(ready_w, b"1")
                os.execv("/bin/sleep", ["rlm-hostile-{nonce}", "600"])
            os._exit(0)
        os.close(ready_w)
        print("REPORT", json.dumps({"started": os.read(ready_r, 1) == b"1"}))
        """, no_process_outlives_the_sandbox, not_on={"daytona": EMULATOR}),
    Attack("channel-600mb-line", CHANNEL_FD + """
        block = b"x" * (1 << 20)
        for _ in range(600):
            os.write(fd, block)
        """, channel_abuse_kills_the_worker("a protocol message over the 64 MB limit")),
    Attack("channel-junk-lines", CHANNEL_FD + """
        for _ in range(1000):
            os.write(fd, b"junk " * 2000 + b"\\n")
        """, channel_abuse_kills_the_worker("a line that is not a protocol message")),
]


# ----- running one attack ------------------------------------------------------------------------------


@pytest.fixture
def backend(request: pytest.FixtureRequest, settings: Settings) -> tuple[str, Settings]:
    """(backend name, settings that run the engine's sandboxes there)."""
    name = request.param
    base = replace(settings, sandbox_memory_mb=MEMORY_MB, sandbox_pids=PIDS, sandbox_cpus=1.0,
                   limits=Limits(cell_timeout_s=90, timeout_s=240))
    if name == "local-bwrap":
        require_bwrap()
        return name, replace(base, sandbox="local", local_isolation="bwrap")
    if name == "local-none":
        return name, replace(base, sandbox="local", local_isolation="none")
    if name == "docker":
        request.getfixturevalue("docker_engine")  # skips, or fails under CI, without an engine
        return name, replace(base, sandbox="docker", docker_image=IMAGE, docker_pool_size=0)
    emulator = request.getfixturevalue("daytona_emulator")
    daytona = emulator_settings(emulator)
    return name, replace(base, sandbox="daytona", daytona_api_url=daytona.daytona_api_url,
                         daytona_api_key=daytona.daytona_api_key, daytona_snapshot=daytona.daytona_snapshot)


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory owned by root (the test runs as root in CI), mode 0755, in /tmp."""
    path = Path(tempfile.mkdtemp(prefix="rlm-hostile-host-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def run_attack(attack: Attack, backend: str, settings: Settings, server: ScriptedModelServer,
                     tmp_path: Path, host_dir: Path) -> Outcome:
    nonce = uuid.uuid4().hex[:12]
    code = "import json\n" + textwrap.dedent(attack.code).strip().replace("{nonce}", nonce).replace(
        "{host_dir}", str(host_dir))
    model = f"hostile-{attack.name}-{backend}-{nonce}"
    server.script(model, [f"```repl\n{code}\n```", "FINAL(survived)"])
    context = tmp_path / "context.txt"
    context.write_text("an innocent-looking document", encoding="utf-8")
    engine = RlmEngine(replace(settings, model=f"openai/{model}"))
    try:
        result = await engine.run(RunRequest(query="Summarise the document.", context=ContextFile(context),
                                             shape=ContextShape("text", 28)))
    finally:
        await engine.sandboxes.aclose()
    prompts = [body["messages"] for body in server.stats.requests if body["model"] == f"openai/{model}"
               or body["model"] == model]
    assert len(prompts) >= 2, f"the run stopped before the model saw the attack's outcome: {result}"
    seen = prompts[1][-1]["content"]
    trajectory = Path(result.trajectory_path or "")
    return Outcome(backend, result, seen, trajectory.stat().st_size if trajectory.exists() else 0, nonce, host_dir)


# Only the backends where a wall exists are attacked: `not_on` says, per attack, where it does not
# (and why); those pairs are not generated rather than shown as skipped coverage.
WALLS = [pytest.param(attack, name, id=f"{attack.name}-{name}",
                      marks=[pytest.mark.docker] if name == "docker" else [])
         for attack in ATTACKS for name in BACKENDS if name not in attack.not_on]


@pytest.mark.parametrize(("attack", "backend"), WALLS, indirect=["backend"])
async def test_the_wall_holds(attack: Attack, backend: tuple[str, Settings], recording: ScriptedModelServer,
                              tmp_path: Path, host_dir: Path) -> None:
    name, settings = backend
    outcome = await run_attack(attack, name, settings, recording, tmp_path, host_dir)
    # Whatever the attack did, the server lived on and the run ended the way the model asked.
    assert (outcome.result.status, outcome.result.answer) == ("completed", "survived"), outcome.result
    attack.check(outcome)
