#!/usr/bin/env bash
# Build the sdist and wheel with `python -m build` (the wheel from the sdist), install the wheel
# into a fresh virtualenv, and prove the installed command works: `rlm-mcp --version`, then an MCP
# `initialize` + `tools/list` over stdio; then `rlm-mcp sandbox build --offline` from the installed
# package data (the wheel with its [docker] extra), under a tag of its own that is removed again.
# Then `--version` and the stdio check through `uvx --from <wheel> rlm-mcp`.
#
#   tests/tools/check-wheel.sh [OUT_DIR]      # OUT_DIR (default <repo>/dist) receives both files
#
# Prints one JSON object on stdout (wheel, sdist, version, what each installed server answered, and
# the sandbox build: tag, seconds, Dockerfile used, or "skipped" with the reason when no Docker
# engine answers); progress goes to stderr. Needs python3 with venv and PyPI (the wheel's
# dependencies are installed from there). `build` and `uv` come from
# tests/tools/install-packaging-tools.sh. The sandbox build needs a Docker engine and, unless the
# offline base image rlm-mcp-base:bookworm exists already (tests/tools/ci-setup-docker.sh makes
# it), root and debootstrap. RLM_MCP_CHECK_SANDBOX_BUILD=0 leaves the build out.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)"
python="${PYTHON:-python3}"
tools="$(bash "$here/install-packaging-tools.sh")"
work="$(mktemp -d "${TMPDIR:-/tmp}/rlm-mcp-wheel.XXXXXX")"
# The sandbox image tag this check builds; only this tag is ever removed (an untag when other tags
# share the image: rlm-mcp-sandbox:latest, which the Docker tests use, is never touched).
sandbox_tag="rlm-mcp-sandbox:wheel-check-$$"
cleanup() {
  if command -v docker >/dev/null 2>&1 && docker image inspect "$sandbox_tag" >/dev/null 2>&1; then
    docker rmi "$sandbox_tag" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

say() { echo "check-wheel: $*" >&2; }
die() { say "$*"; exit 1; }

version="$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$repo/pyproject.toml")"
say "python -m build (sdist, then the wheel from it) into $out"
rm -f "$out"/rlm_mcp-"$version"-*.whl "$out"/rlm_mcp-"$version".tar.gz
"$tools/python" -m build --outdir "$out" "$repo" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; die "python -m build failed"; }
if grep -n -i "warning" "$work/build.log" | grep -v -i "byte-compiling is disabled" >&2; then
  die "python -m build printed the warnings above"
fi
wheel="$out/rlm_mcp-$version-py3-none-any.whl"
sdist="$out/rlm_mcp-$version.tar.gz"
[[ -f "$wheel" && -f "$sdist" ]] || die "expected $wheel and $sdist; got: $(ls "$out")"

# A fresh virtualenv in a directory of its own, run from elsewhere: nothing of the checkout is on
# sys.path, so the installed files alone must work.
say "pip install the wheel into a fresh virtualenv"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" >&2
cd "$work"
export RLM_MCP_HOME="$work/home" RLM_MCP_MODEL=openai/needle OPENAI_API_KEY=sk-test-not-a-real-key
pip_version="$("$work/venv/bin/rlm-mcp" --version)"
[[ "$pip_version" == "rlm-mcp $version" ]] || die "rlm-mcp --version said '$pip_version', expected 'rlm-mcp $version'"
pip_stdio="$("$python" "$here/stdio_initialize.py" -- "$work/venv/bin/rlm-mcp")" || die "stdio initialize against the pip-installed wheel failed"

# The sandbox image from the installed package data. Without the [docker] extra the command must
# say what to install (exit 2, no traceback); with it, it builds from the Dockerfile inside the
# virtualenv, never from the checkout (the working directory is elsewhere and the log names the file).
sandbox='{"skipped": "RLM_MCP_CHECK_SANDBOX_BUILD=0"}'
if [[ "${RLM_MCP_CHECK_SANDBOX_BUILD:-1}" != 0 ]]; then
  if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    sandbox='{"skipped": "no Docker engine answers (docker info): run tests/tools/ci-setup-docker.sh"}'
  else
    set +e
    RLM_MCP_DOCKER_IMAGE="$sandbox_tag" "$work/venv/bin/rlm-mcp" sandbox build --offline >"$work/nodocker.out" 2>"$work/nodocker.err"
    code=$?
    set -e
    if [[ $code -ne 2 ]] || ! grep -q "rlm-mcp\[docker\]" "$work/nodocker.err" || grep -q "Traceback" "$work/nodocker.err"; then
      cat "$work/nodocker.err" >&2
      die "without the [docker] extra, 'rlm-mcp sandbox build' exited $code instead of 2 with what to install"
    fi
    say "pip install the wheel's [docker] extra; rlm-mcp sandbox build --offline as $sandbox_tag"
    "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel[docker]" >&2
    started="$EPOCHREALTIME"
    RLM_MCP_DOCKER_IMAGE="$sandbox_tag" "$work/venv/bin/rlm-mcp" sandbox build --offline >"$work/sandbox.out" 2>"$work/sandbox.log" \
      || { tail -n 40 "$work/sandbox.log" >&2; die "rlm-mcp sandbox build --offline from the installed wheel failed"; }
    seconds="$("$python" -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$started" "$EPOCHREALTIME")"
    [[ "$(tail -n 1 "$work/sandbox.out")" == "$sandbox_tag" ]] || die "sandbox build printed '$(cat "$work/sandbox.out")', expected $sandbox_tag"
    dockerfile="$(sed -n "s/^building $sandbox_tag from \(.*\) (base .*)$/\1/p" "$work/sandbox.log" | head -n 1)"
    [[ "$dockerfile" == "$work/venv/"*"/site-packages/rlm_mcp/sandbox/images/Dockerfile" ]] \
      || die "the build did not use the installed package's Dockerfile (it used '$dockerfile')"
    base_reused=false
    grep -q "already exists" "$work/sandbox.log" && base_reused=true
    # The image runs: python3 as the unprivileged user the Dockerfile sets, with no network.
    ran="$(docker run --rm --network none "$sandbox_tag" python3 -c 'import os, json; print(json.dumps([os.getuid(), os.getgid()]))')"
    [[ "$ran" == "[65534, 65534]" ]] || die "the built image ran python3 as '$ran', expected uid/gid [65534, 65534]"
    docker rmi "$sandbox_tag" >/dev/null
    ! docker image inspect "$sandbox_tag" >/dev/null 2>&1 || die "could not remove $sandbox_tag"
    sandbox="$("$python" -c 'import json, sys; print(json.dumps({"tag": sys.argv[1], "seconds": round(float(sys.argv[2]), 1), "dockerfile": sys.argv[3], "base_reused": sys.argv[4] == "true", "ran_as": json.loads(sys.argv[5]), "removed": True}))' \
      "$sandbox_tag" "$seconds" "$dockerfile" "$base_reused" "$ran")"
  fi
fi

# uvx builds its own environment from the wheel (dependencies from PyPI; downloads cached in
# .ci-cache/uv-cache), with
# this machine's Python (no interpreter download).
say "uvx --from the wheel"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$repo/.ci-cache/uv-cache}" UV_PYTHON_DOWNLOADS=never UV_PYTHON="$python" UV_NO_CONFIG=1
uvx_version="$("$tools/uvx" --from "$wheel" rlm-mcp --version)"
[[ "$uvx_version" == "rlm-mcp $version" ]] || die "uvx rlm-mcp --version said '$uvx_version', expected 'rlm-mcp $version'"
uvx_stdio="$("$python" "$here/stdio_initialize.py" -- "$tools/uvx" --from "$wheel" rlm-mcp)" || die "stdio initialize through uvx failed"

"$python" - "$wheel" "$sdist" "$version" "$pip_version" "$pip_stdio" "$uvx_version" "$uvx_stdio" "$sandbox" <<'PY'
import json, sys
wheel, sdist, version, pip_version, pip_stdio, uvx_version, uvx_stdio, sandbox = sys.argv[1:]
print(json.dumps({"wheel": wheel, "sdist": sdist, "version": version,
                  "pip": {"version": pip_version, "stdio": json.loads(pip_stdio)},
                  "uvx": {"version": uvx_version, "stdio": json.loads(uvx_stdio)},
                  "sandbox_build": json.loads(sandbox)}))
PY
say "ok"
