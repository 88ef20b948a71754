"""Reaching the Docker engine: the client the environment names, checked before use, and
docker-py's failures mapped to SandboxErrors that say what to do."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import docker
import docker.errors
import docker.utils
import requests.exceptions

from rlm_mcp.errors import SandboxError

NO_ENGINE_HELP = (
    "start Docker (Docker Desktop, `sudo systemctl start docker`, or run `dockerd` as root) "
    "and check DOCKER_HOST, or use the process sandbox instead with RLM_MCP_SANDBOX=local")


def _missing_image_error(image: str) -> SandboxError:
    return SandboxError(
        f"the Docker sandbox image {image!r} is not on this Docker engine: run `rlm-mcp sandbox "
        "build` (add --offline without registry access), or set RLM_MCP_DOCKER_IMAGE to an "
        "image that has python3")


@contextlib.contextmanager
def docker_errors(action: str, image: str | None = None) -> Iterator[None]:
    """Turn docker-py failures into SandboxErrors that say what to do."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        if image is None:
            raise SandboxError(f"Docker could not {action}: {exc.explanation or exc}") from exc
        raise _missing_image_error(image) from exc
    except docker.errors.APIError as exc:
        raise SandboxError(f"Docker could not {action}: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise SandboxError(f"cannot reach the Docker engine to {action} ({exc}): {NO_ENGINE_HELP}") from exc
    except requests.exceptions.RequestException as exc:
        raise SandboxError(f"the Docker engine did not answer while trying to {action}: {exc}") from exc


def local_socket_path() -> str | None:
    """The unix socket the environment points docker-py at (None for TCP, SSH, named pipes)."""
    base = docker.utils.kwargs_from_env().get("base_url")
    if base is None:
        return None if os.name == "nt" else "/var/run/docker.sock"
    for scheme in ("unix://", "http+unix://"):
        if base.startswith(scheme):
            return base[len(scheme):]
    return None


def connect() -> docker.DockerClient:
    """A client for the engine named by the environment (DOCKER_HOST etc.), checked with a ping."""
    path = local_socket_path()
    if path is not None:
        # Checked with our own socket first: docker-py leaks its socket when connecting fails.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(10)
            try:
                probe.connect(path)
            except OSError as exc:
                raise SandboxError(f"no Docker engine answers at unix://{path} "
                                   f"({exc.strerror or exc}): {NO_ENGINE_HELP}") from exc
    try:
        client = docker.from_env(max_pool_size=32)  # calls run concurrently from worker threads
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise SandboxError(f"no Docker engine answers ({exc}): {NO_ENGINE_HELP}") from exc
    return client


def engine_is_remote(client: docker.DockerClient) -> bool:
    """True when the engine is reached over TCP or SSH, where host paths cannot be bind-mounted."""
    base = client.api.base_url
    return not (base.startswith("http+docker://localhost") or base.startswith("http+docker://localnpipe"))
