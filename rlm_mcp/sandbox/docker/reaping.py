"""Ownership labels and the reaping of what crashed rlm-mcp servers left on the engine."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import docker
import docker.errors

from rlm_mcp.config import Settings
from rlm_mcp.errors import SandboxError
from rlm_mcp.sandbox.docker.engine import connect, docker_errors, local_socket_path
from rlm_mcp.sandbox.leftovers import dead_owner_in_name, owner_dir_name, owner_is_dead

log = logging.getLogger(__name__)

LABEL = "rlm-mcp"
LABEL_VALUE = "sandbox"
OWNER_LABEL = "rlm-mcp.owner"        # host:pid:start-time of the server process
PROVIDER_LABEL = "rlm-mcp.provider"  # one DockerProvider instance (aclose removes its own)
POOL_LABEL = "rlm-mcp.pool"          # "1" on containers started ahead for the warm pool
MOUNTS_DIRNAME = "docker-mounts"


def mounts_dir_name(pid: int | None = None) -> str:
    """Name of a server process's directory of per-container mounts (``host_pid_start``)."""
    return owner_dir_name(pid)


def reap_leftovers(client: docker.DockerClient, mounts_root: Path | None = None) -> int:
    """Remove what crashed rlm-mcp servers left behind; return how many items were removed.

    Policy: a sandbox container (label ``rlm-mcp=sandbox``) is removed when it is no longer
    running (its worker exited: it can never serve again), or when its owner label names a
    process on this host that is dead (or whose pid now belongs to a newer process). Running
    containers of live servers, and of other machines sharing a remote engine, are left alone.
    Volumes and host mount directories of dead owners on this host are removed too.
    """
    removed = 0
    # ignore_removed: containers may vanish (auto-remove) between the listing and their inspection
    for container in client.containers.list(all=True, filters={"label": f"{LABEL}={LABEL_VALUE}"},
                                            ignore_removed=True):
        owner = container.labels.get(OWNER_LABEL, "")
        if container.status in ("running", "restarting", "paused") and not owner_is_dead(owner):
            continue
        if container.status == "created" and not owner_is_dead(owner):
            continue  # a live server may be between create and start
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)
            removed += 1
            log.info("removed leftover sandbox container %s (owner %s, %s)",
                     container.short_id, owner or "unknown", container.status)
    for volume in client.volumes.list(filters={"label": f"{LABEL}={LABEL_VALUE}"}):
        if owner_is_dead((volume.attrs.get("Labels") or {}).get(OWNER_LABEL, "")):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                volume.remove(force=True)
                removed += 1
    if mounts_root is not None and mounts_root.is_dir():
        for entry in mounts_root.iterdir():
            if dead_owner_in_name(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def reap_at_start(settings: Settings) -> int:
    """:func:`reap_leftovers` at server start, when an engine answers on this machine's socket
    (blocking: run in a thread). A machine without Docker is not an error here."""
    path = local_socket_path()
    if path is None or not os.path.exists(path):
        return 0  # no local engine (a remote one is reaped when a provider first connects)
    try:
        client = connect()
    except SandboxError as exc:
        log.debug("no Docker leftovers reaped at start: %s", exc)
        return 0
    try:
        with docker_errors("clean up leftover sandbox containers"):
            return reap_leftovers(client, settings.home / MOUNTS_DIRNAME)
    except SandboxError as exc:
        log.warning("could not reap leftover sandbox containers at start: %s", exc)
        return 0
    finally:
        client.close()
