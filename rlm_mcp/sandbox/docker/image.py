"""``rlm-mcp sandbox build``: the sandbox image from the packaged ``images/Dockerfile``, on
python:3.12-slim or, without a registry, on a Debian base made with debootstrap."""

from __future__ import annotations

import collections
import subprocess
import sys
from collections.abc import Callable

import docker
import docker.errors
import requests.exceptions

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.base import image_definitions
from rlm_mcp.sandbox.docker.engine import connect, docker_errors

ONLINE_BASE_IMAGE = "python:3.12-slim"
OFFLINE_BASE_IMAGE = "rlm-mcp-base:bookworm"


def print_to_stderr(line: str) -> None:
    """Default build logger: build output goes to stderr, never to stdout."""
    print(line, file=sys.stderr, flush=True)


def _pull_works(client: docker.DockerClient, image: str, log_line: Callable[[str], None]) -> bool:
    repository, _, tag = image.partition(":")
    try:
        client.images.pull(repository, tag=tag or "latest")
        return True
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        log_line(f"cannot pull {image} ({exc}); building offline from a Debian mirror instead")
        return False


def _has_image(client: docker.DockerClient, image: str) -> bool:
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False


def build_sandbox_image(settings: Settings, *, offline: bool | None = None,
                        log: Callable[[str], None] = print_to_stderr) -> str:
    """Build ``settings.docker_image`` from the packaged images/Dockerfile; return the image tag.

    ``offline=None`` decides by itself: it uses python:3.12-slim when that image is present or
    can be pulled, else (or with ``offline=True``) a Debian base made by
    images/build-base-offline.sh (needs root and debootstrap). An offline base made earlier
    is reused. Builds go through docker-py's API; the docker CLI is only used by that script.
    """
    images = image_definitions()
    dockerfile = images / "Dockerfile"
    client = connect()
    try:
        if offline is None:
            if _has_image(client, ONLINE_BASE_IMAGE):
                offline = False
            elif _has_image(client, OFFLINE_BASE_IMAGE):
                log(f"using the offline base image {OFFLINE_BASE_IMAGE} built earlier")
                offline = True
            else:
                offline = not _pull_works(client, ONLINE_BASE_IMAGE, log)
        elif not offline and not _has_image(client, ONLINE_BASE_IMAGE) and not _pull_works(client, ONLINE_BASE_IMAGE, log):
            raise SandboxError(f"cannot pull {ONLINE_BASE_IMAGE}: build with --offline instead")
        base = ONLINE_BASE_IMAGE
        if offline:
            base = OFFLINE_BASE_IMAGE
            _build_offline_base(base, log)
        log(f"building {settings.docker_image} from {dockerfile} (base {base})")
        with docker_errors(f"build {settings.docker_image}"):
            for chunk in client.api.build(path=str(images), dockerfile="Dockerfile",
                                          tag=settings.docker_image, buildargs={"BASE_IMAGE": base},
                                          pull=False, rm=True, forcerm=True, decode=True):
                if "error" in chunk:
                    raise SandboxError(f"building {settings.docker_image} failed: {chunk['error'].strip()}")
                text = chunk.get("stream", "").rstrip()
                if text:
                    log(text)
        log(f"built {settings.docker_image}")
        return settings.docker_image
    finally:
        client.close()


def _build_offline_base(name: str, log_line: Callable[[str], None]) -> None:
    script = image_definitions() / "build-base-offline.sh"
    tail: collections.deque[str] = collections.deque(maxlen=10)
    with subprocess.Popen(["sh", str(script), name], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            log_line(line.rstrip())
    if process.returncode != 0:
        raise SandboxError(f"building the offline base image failed (exit {process.returncode}): "
                           + " | ".join(tail))
