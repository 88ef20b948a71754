"""The reference RLM implementation (PyPI ``rlms``): its own virtualenv and its Docker image.

* ``bench/.venv-reference``: a virtualenv with ``rlms`` installed from PyPI by pip (created on
  first use, reused afterwards; ``--reinstall-reference`` rebuilds it).
* ``rlm-bench-reference:latest``: the image its Docker environment runs. The reference runs
  ``docker run IMAGE tail -f /dev/null`` and then ``docker exec CONTAINER python ...`` per cell,
  needing ``python``, ``requests`` and (optionally) ``dill`` in the image; by default it wants
  ``python:3.11-slim`` and ``pip install``-s the packages inside at every start. Docker Hub is
  unreachable here, so the image is built from a local base (rlm-mcp's offline Debian base when
  present) with Debian's python3-requests, python3-dill and python-is-python3. It has no pip:
  the reference's in-container ``pip install`` fails at once instead of waiting on a network.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

log = logging.getLogger("bench")

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-reference"
PACKAGE = "rlms==0.1.3"
IMAGE = "rlm-bench-reference:latest"
BASE_CANDIDATES = ("rlm-mcp-base:bookworm", "rlm-mcp-sandbox:latest", "python:3.11-slim")
DOCKERFILE = """\
ARG BASE
FROM ${BASE}
USER root
RUN apt-get update -q \\
    && apt-get install -y -q --no-install-recommends python3-requests python3-dill python-is-python3 \\
    && rm -rf /var/lib/apt/lists/*
"""


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(reinstall: bool = False) -> tuple[Path, str]:
    """(python of the reference venv, installed rlms version); installs on first use."""
    python = venv_python()
    if reinstall or not python.exists() or _version(python) is None:
        log.info("creating %s and installing %s from PyPI ...", VENV, PACKAGE)
        venv.EnvBuilder(clear=True, with_pip=True).create(VENV)
        out = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PACKAGE],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"pip install {PACKAGE} failed: {out.stderr.strip()[-1500:]}")
    version = _version(python)
    if version is None:
        raise RuntimeError("rlms is not importable in the reference venv")
    return python, version


def _version(python: Path) -> str | None:
    out = subprocess.run([str(python), "-c", "import rlm, importlib.metadata as m; print(m.version('rlms'))"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or None if out.returncode == 0 else None


def _image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True, check=False).returncode == 0


def ensure_image(rebuild: bool = False) -> str:
    """The reference's Docker image name; builds it when missing. Raises RuntimeError with the
    reason when it cannot be had."""
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode:
        raise RuntimeError("no Docker engine answers (`docker info` failed)")
    if _image_exists(IMAGE) and not rebuild:
        return IMAGE
    base = next((b for b in BASE_CANDIDATES if _image_exists(b)), None)
    if base is None:
        raise RuntimeError(f"no base image with python available locally (tried {', '.join(BASE_CANDIDATES)}) "
                           "and Docker Hub is unreachable")
    log.info("building %s from %s ...", IMAGE, base)
    with tempfile.TemporaryDirectory(prefix="rlm-bench-image-") as build_dir:
        (Path(build_dir) / "Dockerfile").write_text(DOCKERFILE)
        out = subprocess.run(["docker", "build", "-q", "--build-arg", f"BASE={base}", "-t", IMAGE, build_dir],
                             capture_output=True, text=True, check=False, timeout=900)
    if out.returncode:
        raise RuntimeError(f"building {IMAGE} from {base} failed: {out.stderr.strip()[-800:]}")
    return IMAGE


def driver_command(spec_path: Path) -> list[str]:
    return [str(venv_python()), str(BENCH / "reference_driver.py"), str(spec_path)]


def driver_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLM_MCP_", "PYTHON"))}
    env["OPENAI_API_KEY"] = "sk-bench"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(ensure_venv(), ensure_image())
