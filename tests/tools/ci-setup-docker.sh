#!/bin/sh
# Make a CI machine ready for the Docker tests: engine installed and answering, sandbox image built.
#
#   tests/tools/ci-setup-docker.sh            (run as root)
#
# Idempotent and quick when everything is already there. Installs Debian's docker.io and
# debootstrap with apt-get only when missing, starts dockerd in the background (log in
# /tmp/dockerd.log) only when no engine answers, waits for it (bounded), then builds
# RLM_MCP_DOCKER_IMAGE through `python -m rlm_mcp sandbox build` (the `rlm-mcp` CLI), which falls back to
# an offline debootstrap base when Docker Hub cannot be reached. PYTHON overrides the
# interpreter (default: python3); DOCKERD_WAIT_S the wait for the engine (default: 60).
set -eu

PYTHON="${PYTHON:-python3}"
WAIT_S="${DOCKERD_WAIT_S:-60}"
cd "$(dirname "$0")/../.."

need_packages=""
command -v dockerd >/dev/null 2>&1 || need_packages="$need_packages docker.io"
command -v debootstrap >/dev/null 2>&1 || need_packages="$need_packages debootstrap"
if [ -n "$need_packages" ]; then
    echo "installing:$need_packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need_packages >&2
fi

engine_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if ! engine_answers; then
    echo "starting dockerd (log: /tmp/dockerd.log)" >&2
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    waited=0
    until engine_answers; do
        if [ "$waited" -ge "$((WAIT_S * 10))" ]; then
            echo "dockerd did not answer within ${WAIT_S}s; last log lines:" >&2
            tail -n 20 /tmp/dockerd.log >&2 || true
            exit 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
fi
echo "Docker engine $(docker version --format '{{.Server.Version}}') is answering" >&2

"$PYTHON" -m rlm_mcp sandbox build
