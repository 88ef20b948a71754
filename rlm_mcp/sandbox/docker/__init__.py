"""The Docker backend: one hardened, long-lived container per sandbox.

Each sandbox runs ``python3 -I -u /opt/rlm/worker.py`` in a container of ``settings.docker_image``
and talks to it over the container's attached stdin/stdout (the same JSON-lines protocol as the
local backend). The worker script is bind-mounted read-only from this package, so host and
container versions never drift; the image only needs ``python3``.

Hardening, always on: no network (``network_mode="none"``), read-only root filesystem with a
tmpfs at ``/tmp`` (also ``HOME``), user 65534:65534, all capabilities dropped,
``no-new-privileges``, memory (no swap), CPU and process-count limits from the settings, an init
process, no environment from the host, no log driver (the protocol carries prompts and context
excerpts: nothing is written to Docker's logs).

Context hand-over: every container is created with its own empty host directory bind-mounted
read-only at ``/context``. When a sandbox takes a container, the run's context file is
hard-linked into that directory as ``data`` (O(1) on the same filesystem; copied otherwise, or
when the file is not world-readable, because the container user is not the host user). The
container sees it at ``/context/data`` at once, which is what lets a warm pool start containers
before the run's context is known. Pooled containers are never reused: a container serves one
worker and is removed with it.

Remote engines: when ``DOCKER_HOST`` points at a TCP or SSH engine, bind mounts would name paths
on the engine's machine, so the worker script and the context file are copied once per sandbox
into a labelled Docker volume (through a short-lived helper container) and mounted read-only
from there; the warm pool is not used in that mode.

Clean-up: containers are removed when their sandbox closes, when a stuck worker is killed, and
on :meth:`DockerProvider.aclose`. Every container, volume and mount directory is labelled with
the owning server process (host name, pid and the pid's start time); when a provider first
talks to the engine it reaps what a dead server on this host left behind, plus any stopped
sandbox container (see :func:`reap_leftovers`).

The modules, one concern each, each importing only those before it: ``engine`` (connecting,
docker-py errors mapped to SandboxErrors), ``reaping`` (labels, ownership, leftovers),
``containers`` (creating, taking from the warm pool and disposing of containers; volumes),
``transport`` (the attach stream and its frames), ``sandbox`` (one REPL, context hand-over),
``provider`` (what the sandbox registry sees), ``image`` (``rlm-mcp sandbox build``). This
package is the only importer of docker-py.
"""


from rlm_mcp.sandbox.docker.containers import ContextTransfer
from rlm_mcp.sandbox.docker.engine import connect, engine_is_remote, local_socket_path
from rlm_mcp.sandbox.docker.image import OFFLINE_BASE_IMAGE, ONLINE_BASE_IMAGE, build_sandbox_image
from rlm_mcp.sandbox.docker.provider import DockerProvider
from rlm_mcp.sandbox.docker.reaping import (
    LABEL, LABEL_VALUE, OWNER_LABEL, POOL_LABEL, PROVIDER_LABEL, mounts_dir_name, reap_at_start, reap_leftovers)
from rlm_mcp.sandbox.docker.sandbox import DockerSandbox
from rlm_mcp.sandbox.docker.transport import DockerTransport
from rlm_mcp.sandbox.leftovers import owner_token

__all__ = [
    "LABEL", "LABEL_VALUE", "OFFLINE_BASE_IMAGE", "ONLINE_BASE_IMAGE", "OWNER_LABEL", "POOL_LABEL", "PROVIDER_LABEL",
    "ContextTransfer", "DockerProvider", "DockerSandbox", "DockerTransport", "build_sandbox_image", "connect",
    "engine_is_remote", "local_socket_path", "mounts_dir_name", "owner_token", "reap_at_start", "reap_leftovers",
]
