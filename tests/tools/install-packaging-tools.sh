#!/usr/bin/env bash
# A private virtualenv with pinned `build` and `uv` from PyPI, for tests/tools/check-wheel.sh and
# packaging/build-bundle.sh; prints its bin directory. Idempotent.
# Environment: RLM_MCP_PACKAGING_TOOLS_DIR (default <repo>/.ci-cache/packaging-tools), PYTHON
# (default python3: the interpreter the venv is made from).
set -euo pipefail

BUILD_VERSION=1.6.1
UV_VERSION=0.13.9

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dest="${RLM_MCP_PACKAGING_TOOLS_DIR:-$repo/.ci-cache/packaging-tools}"
python="${PYTHON:-python3}"
stamp="build==$BUILD_VERSION uv==$UV_VERSION $("$python" -c 'import sys; print(sys.version.split()[0])')"

installed() {
  [[ -x "$dest/bin/python" && -x "$dest/bin/uv" && -f "$dest/.installed" && "$(cat "$dest/.installed")" == "$stamp" ]]
}

if ! installed; then
  mkdir -p "$(dirname "$dest")"
  exec 9>"$dest.lock"
  command -v flock >/dev/null 2>&1 && { flock -w 600 9 || { echo "install-packaging-tools: timed out on $dest.lock" >&2; exit 1; }; }
  if ! installed; then
    echo "install-packaging-tools: $stamp into $dest" >&2
    rm -rf "$dest"
    "$python" -m venv "$dest" >&2 || { echo "install-packaging-tools: '$python -m venv' failed (on Debian: apt-get install python3-venv)" >&2; exit 1; }
    "$dest/bin/python" -m pip install --quiet --disable-pip-version-check "build==$BUILD_VERSION" "uv==$UV_VERSION" >&2
    printf '%s' "$stamp" > "$dest/.installed"
  fi
fi
installed || { echo "install-packaging-tools: $dest is incomplete" >&2; exit 1; }
echo "$dest/bin"
