"""Installs as a user gets them: the wheel and sdist from ``python -m build``, the wheel in a fresh
virtualenv and through ``uvx``, the MCP Bundle (.mcpb) built and checked with the official CLI and
started the way a host resolves it, and the MCP registry's server.json.

tests/tools/check-wheel.sh and packaging/build-bundle.sh do the building (they are what CI and a
release run); these tests run them and check what they made. Dependencies come from PyPI and the
bundle CLI from npm. Without npm the bundle tests skip with the reason; under CI=true they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from rlm_mcp import __version__
from tests.conftest import haystack
from tests.server.test_transports import REPO, TOOLS
from tests.support import unavailable

pytestmark = pytest.mark.packaging

TOOLS_DIR = REPO / "tests" / "tools"
BUNDLE_SOURCE = REPO / "packaging" / "mcpb"
SCRIPT_TIMEOUT_S = 900
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]
WHEEL = f"rlm_mcp-{VERSION}-py3-none-any.whl"
NETWORK_VARIABLES = {"SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY",
                     "https_proxy", "http_proxy", "no_proxy", "all_proxy"}
USER_CONFIG_KEYS = {"model", "sub_model", "api_key", "api_base", "allowed_directory", "sandbox"}



def run_script(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *command], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=SCRIPT_TIMEOUT_S, env={**os.environ, **(env or {})})


def documented_variables() -> set[str]:
    """The variables in the README's environment table (the user-facing contract)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))


# ----- wheel and sdist -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tests/tools/check-wheel.sh's report: built, installed with pip and uvx, served over stdio."""
    out = tmp_path_factory.mktemp("dist")
    done = run_script(str(TOOLS_DIR / "check-wheel.sh"), str(out))
    assert done.returncode == 0, f"check-wheel.sh failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_wheel_installs_fresh_with_pip_and_uvx_and_serves_mcp_over_stdio(checked):
    assert checked["version"] == VERSION == __version__
    for installer in ("pip", "uvx"):
        report = checked[installer]
        assert report["version"] == f"rlm-mcp {VERSION}", installer
        stdio = report["stdio"]
        assert stdio["serverInfo"] == {"name": "rlm-mcp", "version": VERSION}, installer
        assert set(stdio["tools"]) == TOOLS, installer
        assert stdio["exit_code"] == 0, f"{installer}: the server did not exit cleanly when stdin closed"


def package_tree() -> tuple[set[str], set[str], set[str]]:
    """Read from the source tree, not from a list kept here (so a module that moves or a package
    that splits cannot drop out of a distribution unnoticed): every module under rlm_mcp/, every
    file pyproject.toml's package-data globs match, and every other file under rlm_mcp/."""
    files = {p.relative_to(REPO).as_posix() for p in (REPO / "rlm_mcp").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    modules = {name for name in files if name.endswith(".py")}
    declared: set[str] = set()
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        base = REPO.joinpath(*package.split("."))
        for pattern in patterns:
            declared |= {p.relative_to(REPO).as_posix() for p in base.glob(pattern) if p.is_file()}
    return modules, declared, files - modules


def test_every_file_in_the_package_tree_is_a_module_or_declared_package_data():
    """A new asset (a viewer file, an image definition) must be declared, or no wheel carries it."""
    modules, declared, others = package_tree()
    assert "rlm_mcp/cli.py" in modules and "rlm_mcp/sandbox/images/Dockerfile" in declared
    assert others <= declared, f"not declared in [tool.setuptools.package-data]: {sorted(others - declared)}"
    # Each directory with modules is a regular package (an __init__.py), as the imports assume.
    folders = {name.rsplit("/", 1)[0] for name in modules}
    assert not {f for f in folders if f"{f}/__init__.py" not in modules}, "a module folder has no __init__.py"


def test_the_wheel_holds_every_module_the_package_data_the_console_script_and_the_metadata(checked):
    with zipfile.ZipFile(checked["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(f"rlm_mcp-{VERSION}.dist-info/entry_points.txt").decode()
        metadata = wheel.read(f"rlm_mcp-{VERSION}.dist-info/METADATA").decode()
    modules, declared, _ = package_tree()
    assert modules | declared <= names, f"missing from the wheel: {sorted((modules | declared) - names)}"
    packaged = {n for n in names if n.startswith("rlm_mcp/")}
    assert packaged <= modules | declared, f"in the wheel but not in the source tree: {sorted(packaged - modules - declared)}"
    assert "rlm_mcp/py.typed" in names and "rlm_mcp/sandbox/images/build-base-offline.sh" in names
    assert not {n for n in names if "__pycache__" in n or n.startswith(("tests/", "sandboxes/"))}
    assert re.search(r"^rlm-mcp = rlm_mcp\.cli:main$", entry_points, flags=re.MULTILINE), entry_points
    headers = dict(line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line)
    assert (headers["Name"], headers["Version"]) == ("rlm-mcp", VERSION)
    assert headers["License-Expression"] == "MIT" and headers["Requires-Python"] == ">=3.11"


def test_the_sdist_carries_the_package_the_test_suite_and_the_bundle_sources(checked):
    with tarfile.open(checked["sdist"]) as sdist:
        names = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile() and "/" in m.name}
    wanted = {"pyproject.toml", "README.md", "MANIFEST.in", "claude_desktop_config.example.json",
              "tests/conftest.py", "tests/tools/check-wheel.sh", "tests/tools/stdio_initialize.py",
              "tests/tools/ci-setup-docker.sh", "packaging/mcpb/manifest.json",
              "packaging/build-bundle.sh", "packaging/server.json"}
    modules, declared, _ = package_tree()
    wanted |= modules | declared
    assert wanted <= names, f"missing from the sdist: {sorted(wanted - names)}"
    packaged = {n for n in names if n.startswith("rlm_mcp/")}
    assert packaged <= modules | declared, f"in the sdist but not in the source tree: {sorted(packaged - modules - declared)}"
    assert not {n for n in names if "__pycache__" in n or n.startswith((".ci-cache", ".venv", ".git/"))}


def test_the_installed_wheel_builds_the_sandbox_image_offline_from_its_own_package_data(checked):
    """`rlm-mcp sandbox build --offline` from the wheel (with its [docker] extra) in a fresh
    virtualenv, under a tag of its own that check-wheel.sh removes afterwards; without the extra
    the same command exits 2 saying what to install (check-wheel.sh fails otherwise)."""
    report = checked["sandbox_build"]
    if "skipped" in report:
        unavailable(report["skipped"])
    assert report["tag"].startswith("rlm-mcp-sandbox:wheel-check-") and report["removed"] is True
    assert "/site-packages/rlm_mcp/sandbox/images/Dockerfile" in report["dockerfile"]
    assert not report["dockerfile"].startswith(str(REPO))
    assert report["ran_as"] == [65534, 65534]
    gone = subprocess.run(["docker", "image", "inspect", report["tag"]], capture_output=True, text=True, timeout=60)
    assert gone.returncode != 0 and "No such image" in gone.stderr + gone.stdout, "the check's own tag was left behind"


# ----- the MCP Bundle -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mcpb_cli() -> list[str]:
    done = run_script(str(TOOLS_DIR / "install-mcpb.sh"))
    if done.returncode == 127:
        unavailable("npm not found: the MCP Bundle CLI comes from npm (tests/tools/install-mcpb.sh)")
    assert done.returncode == 0, f"install-mcpb.sh failed:\n{done.stderr[-3000:]}"
    node, cli = done.stdout.strip().splitlines()[-2:]
    return [node, cli]


@pytest.fixture(scope="module")
def bundle(checked, mcpb_cli, tmp_path_factory) -> Path:
    """packaging/build-bundle.sh with the wheel check-wheel.sh proved."""
    out = tmp_path_factory.mktemp("bundle")
    done = run_script(str(REPO / "packaging" / "build-bundle.sh"), str(out), env={"RLM_MCP_WHEEL": checked["wheel"]})
    assert done.returncode == 0, f"build-bundle.sh failed ({done.returncode}):\n{done.stderr[-4000:]}"
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == out / f"rlm-mcp-{VERSION}.mcpb" and path.is_file()
    assert "Manifest schema validation passes" in done.stderr  # mcpb validate ran and passed
    return path


def test_the_bundle_holds_its_manifest_entry_point_project_and_the_wheel(bundle, checked):
    with zipfile.ZipFile(bundle) as archive:
        assert set(archive.namelist()) == {"manifest.json", "pyproject.toml", "server/main.py", f"wheels/{WHEEL}"}
        manifest = json.loads(archive.read("manifest.json"))
        project = tomllib.loads(archive.read("pyproject.toml").decode())
        shipped_wheel = archive.read(f"wheels/{WHEEL}")
    assert shipped_wheel == Path(checked["wheel"]).read_bytes()
    assert (manifest["manifest_version"], manifest["version"]) == ("0.4", VERSION)
    assert manifest["server"]["type"] == "uv" and manifest["server"]["entry_point"] == "server/main.py"
    assert project["project"]["dependencies"] == [f"rlm-mcp[docker]=={VERSION}"]
    assert {tool["name"] for tool in manifest["tools"]} == TOOLS - {"rlm_get_run_view"}  # app-only (MCP Apps)


def test_the_bundle_asks_for_model_key_directory_and_sandbox_and_maps_each_to_a_documented_variable():
    manifest = json.loads((BUNDLE_SOURCE / "manifest.json").read_text(encoding="utf-8"))
    config = manifest["user_config"]
    assert set(config) == USER_CONFIG_KEYS
    assert config["api_key"]["sensitive"] is True
    assert not any(spec.get("sensitive") for key, spec in config.items() if key != "api_key")
    assert config["allowed_directory"]["type"] == "directory" and config["allowed_directory"]["required"] is True
    # A list of directories cannot be put in an environment variable by the host (arrays only
    # expand as separate arguments), so the bundle asks for one.
    assert not config["allowed_directory"].get("multiple")
    # An optional field without a default reaches the server as the literal "${user_config.x}".
    assert all("default" in spec for spec in config.values() if not spec.get("required"))
    env = manifest["server"]["mcp_config"]["env"]
    assert set(env) <= documented_variables(), set(env) - documented_variables()
    used = {m for value in env.values() for m in re.findall(r"\$\{user_config\.([a-z_]+)\}", value)}
    assert used == USER_CONFIG_KEYS


def test_the_official_cli_refuses_a_broken_manifest(mcpb_cli, tmp_path):
    manifest = json.loads((BUNDLE_SOURCE / "manifest.json").read_text(encoding="utf-8"))
    manifest["server"]["type"] = "conda"
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(manifest), encoding="utf-8")
    done = subprocess.run([*mcpb_cli, "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "server" in done.stdout + done.stderr


RESOLVE = """
import { getMcpConfigForManifest } from '@anthropic-ai/mcpb';
import { readFileSync } from 'node:fs';
const [manifestPath, extensionPath, home, userConfig] = process.argv.slice(1);
const manifest = JSON.parse(readFileSync(manifestPath, 'utf8'));
const config = await getMcpConfigForManifest({
  manifest, extensionPath, systemDirs: { HOME: home }, userConfig: JSON.parse(userConfig), pathSeparator: '/',
});
console.log(JSON.stringify(config ?? null));
"""


def host_resolves(mcpb_cli: list[str], manifest: Path, extension: Path, home: Path,
                  user_config: dict[str, Any]) -> dict[str, Any] | None:
    """The server command a host derives from the manifest, with mcpb's own resolver."""
    node, cli = mcpb_cli
    package_root = Path(cli).parents[4]  # .../node_modules/@anthropic-ai/mcpb/dist/cli/cli.js
    done = subprocess.run([node, "--input-type=module", "-e", RESOLVE, str(manifest), str(extension), str(home),
                           json.dumps(user_config)], cwd=package_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_host_starts_nothing_until_the_readable_directory_is_chosen(mcpb_cli, tmp_path):
    settings = {"model": "openai/needle", "sub_model": "", "api_key": "", "api_base": "", "sandbox": "local"}
    assert host_resolves(mcpb_cli, BUNDLE_SOURCE / "manifest.json", tmp_path, tmp_path, settings) is None


async def test_the_bundle_started_as_a_host_resolves_it_answers_only_over_the_chosen_directory(
        bundle, mcpb_cli, model_server, tmp_path):
    extension = tmp_path / "extension"
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(extension)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "haystack.txt").write_text(haystack(500_000, "MCPB-31"), encoding="utf-8")
    (tmp_path / "outside.txt").write_text("not for the server", encoding="utf-8")
    home = tmp_path / "home"
    home.mkdir()
    user_config = {"model": "openai/needle", "sub_model": "", "api_key": "sk-test-not-a-real-key",
                   "api_base": model_server.api_base, "allowed_directory": str(allowed), "sandbox": "local"}
    config = host_resolves(mcpb_cli, extension / "manifest.json", extension, home, user_config)
    assert config is not None and config["command"] == "uv"
    assert config["env"]["RLM_MCP_ALLOWED_ROOTS"] == str(allowed) and config["env"]["RLM_MCP_SUB_MODEL"] == ""
    tools_bin = run_script(str(TOOLS_DIR / "install-packaging-tools.sh")).stdout.strip()
    # What a desktop host gives a server: a bare environment plus the manifest's. uv uses this
    # machine's Python and a shared package cache instead of downloading an interpreter.
    # (The machine's TLS trust and proxy settings pass through: uv needs them to reach PyPI here.)
    env = {"PATH": f"{tools_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home),
           **{k: v for k, v in os.environ.items() if k in NETWORK_VARIABLES},
           "UV_PYTHON_DOWNLOADS": "never", "UV_PYTHON": sys.executable, "UV_NO_CONFIG": "1",
           "UV_CACHE_DIR": str(REPO / ".ci-cache" / "uv-cache"), **config["env"]}
    params = StdioServerParameters(command=shutil.which("uv", path=env["PATH"]) or "uv", args=config["args"],
                                   env=env, cwd=str(home))
    with (tmp_path / "server.stderr").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=600) as client:
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
            loaded = await client.call_tool("rlm_load_context", {"path": str(allowed / "haystack.txt")})
            assert not loaded.is_error, loaded.content[0].text
            refused = await client.call_tool("rlm_load_context", {"path": str(tmp_path / "outside.txt")})
            assert refused.is_error
            done = await client.call_tool("rlm_complete", {"handle": loaded.structured_content["handle"],
                                                           "query": "What is the secret code?", "wait_s": 120})
            assert not done.is_error, done.content[0].text
    assert (done.structured_content["status"], done.structured_content["answer"]) == ("completed", "MCPB-31")
    assert (extension / ".venv").is_dir()  # uv built the environment inside the extension, as hosts do


# ----- the MCP registry entry -----------------------------------------------------------------


def test_server_json_describes_the_pypi_package_within_the_registry_schema_limits():
    """The limits of the registry's server.schema.json (2025-09-29 / 2025-12-11), which no package
    registry ships: name with one slash, description up to 100 characters, exact versions."""
    server = json.loads((REPO / "packaging" / "server.json").read_text(encoding="utf-8"))
    assert re.fullmatch(r"[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+", server["name"]) and 3 <= len(server["name"]) <= 200
    assert 1 <= len(server["description"]) <= 100 and server["version"] == VERSION
    (package,) = server["packages"]
    assert set(package) <= {"registryType", "registryBaseUrl", "identifier", "version", "fileSha256", "runtimeHint",
                            "transport", "runtimeArguments", "packageArguments", "environmentVariables"}
    assert (package["registryType"], package["identifier"], package["version"]) == ("pypi", PYPROJECT["project"]["name"], VERSION)
    assert package["transport"] == {"type": "stdio"}
    inputs = {"name", "description", "isRequired", "format", "value", "isSecret", "default", "placeholder", "choices"}
    for variable in package["environmentVariables"]:
        assert set(variable) <= inputs, variable
        assert variable.get("format", "string") in ("string", "number", "boolean", "filepath")
    names = {v["name"] for v in package["environmentVariables"]}
    assert names <= documented_variables(), names - documented_variables()
    assert {v["name"] for v in package["environmentVariables"] if v.get("isRequired")} == {"RLM_MCP_MODEL"}
    assert {v["name"] for v in package["environmentVariables"] if v.get("isSecret")} == {"RLM_MCP_API_KEY"}


def test_the_readme_names_the_registry_entry_that_server_json_publishes():
    """The registry accepts a PyPI package only when its README says ``mcp-name: <server name>``."""
    server = json.loads((REPO / "packaging" / "server.json").read_text(encoding="utf-8"))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.findall(r"<!-- mcp-name: (\S+) -->", readme) == [server["name"]]
