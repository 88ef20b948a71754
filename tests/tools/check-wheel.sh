#!/usr/bin/env bash
# Build the sdist and wheel with `python -m build` (the wheel from the sdist), install the wheel
# into a fresh virtualenv, and prove the installed command works: `rlm-mcp --version`, then an MCP
# `initialize` + `tools/list` over stdio. Then the same through `uvx --from <wheel> rlm-mcp`.
#
#   tests/tools/check-wheel.sh [OUT_DIR]      # OUT_DIR (default <repo>/dist) receives both files
#
# Prints one JSON object on stdout (wheel, sdist, version, and what each installed server
# answered); progress goes to stderr. Needs python3 with venv and PyPI (the wheel's dependencies
# are installed from there). `build` and `uv` come from tests/tools/install-packaging-tools.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)"
python="${PYTHON:-python3}"
tools="$(bash "$here/install-packaging-tools.sh")"
work="$(mktemp -d "${TMPDIR:-/tmp}/rlm-mcp-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

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

# uvx builds its own environment from the wheel (dependencies from PyPI; downloads cached in
# .ci-cache/uv-cache), with
# this machine's Python (no interpreter download).
say "uvx --from the wheel"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$repo/.ci-cache/uv-cache}" UV_PYTHON_DOWNLOADS=never UV_PYTHON="$python" UV_NO_CONFIG=1
uvx_version="$("$tools/uvx" --from "$wheel" rlm-mcp --version)"
[[ "$uvx_version" == "rlm-mcp $version" ]] || die "uvx rlm-mcp --version said '$uvx_version', expected 'rlm-mcp $version'"
uvx_stdio="$("$python" "$here/stdio_initialize.py" -- "$tools/uvx" --from "$wheel" rlm-mcp)" || die "stdio initialize through uvx failed"

"$python" - "$wheel" "$sdist" "$version" "$pip_version" "$pip_stdio" "$uvx_version" "$uvx_stdio" <<'PY'
import json, sys
wheel, sdist, version, pip_version, pip_stdio, uvx_version, uvx_stdio = sys.argv[1:]
print(json.dumps({"wheel": wheel, "sdist": sdist, "version": version,
                  "pip": {"version": pip_version, "stdio": json.loads(pip_stdio)},
                  "uvx": {"version": uvx_version, "stdio": json.loads(uvx_stdio)}}))
PY
say "ok"
