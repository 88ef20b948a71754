#!/usr/bin/env bash
# Build the rlm-mcp MCP Bundle (.mcpb) for one-click install in Claude Desktop.
#
#   packaging/build-bundle.sh [OUT_DIR]     # default <repo>/dist; prints the .mcpb path
#
# The bundle is server.type "uv": it carries manifest.json, server/main.py, a pyproject.toml and
# the rlm-mcp wheel; on first start the host's uv builds the environment (dependencies from PyPI).
# Steps: build the wheel (or take RLM_MCP_WHEEL), check that every version agrees, stage the
# files, `mcpb validate`, `mcpb pack`. The official CLI (npm @anthropic-ai/mcpb) and Node come
# from tests/tools/install-mcpb.sh; `build` from tests/tools/install-packaging-tools.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)"
python="${PYTHON:-python3}"
say() { echo "build-bundle: $*" >&2; }
die() { say "$*"; exit 1; }

version="$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$repo/pyproject.toml")"
wheel_name="rlm_mcp-$version-py3-none-any.whl"
# Every place that names the version must agree, or the host installs something else.
"$python" - "$here/mcpb" "$version" "$wheel_name" <<'PY' || exit 1
import json, sys, tomllib
from pathlib import Path
source, version, wheel_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
manifest = json.loads((source / "manifest.json").read_text())
project = tomllib.loads((source / "pyproject.toml").read_text())
wanted = {
    "manifest.json version": (manifest["version"], version),
    "bundle pyproject.toml version": (project["project"]["version"], version),
    "bundle pyproject.toml dependency": (project["project"]["dependencies"], [f"rlm-mcp[docker]=={version}"]),
    "bundle pyproject.toml wheel source": (project["tool"]["uv"]["sources"]["rlm-mcp"]["path"], f"wheels/{wheel_name}"),
}
wrong = [f"{what} is {got!r}, expected {want!r}" for what, (got, want) in wanted.items() if got != want]
if wrong:
    sys.exit("build-bundle: packaging/mcpb does not match pyproject.toml's version " + version + ":\n  " + "\n  ".join(wrong))
PY

work="$(mktemp -d "${TMPDIR:-/tmp}/rlm-mcp-bundle.XXXXXX")"
trap 'rm -rf "$work"' EXIT
stage="$work/rlm-mcp"
cp -R "$here/mcpb" "$stage"
mkdir -p "$stage/wheels"
if [[ -n "${RLM_MCP_WHEEL:-}" ]]; then
  [[ "$(basename "$RLM_MCP_WHEEL")" == "$wheel_name" && -f "$RLM_MCP_WHEEL" ]] \
    || die "RLM_MCP_WHEEL=$RLM_MCP_WHEEL is not an existing $wheel_name"
  cp "$RLM_MCP_WHEEL" "$stage/wheels/"
else
  tools="$(bash "$repo/tests/tools/install-packaging-tools.sh")"
  say "python -m build --wheel"
  "$tools/python" -m build --wheel --outdir "$stage/wheels" "$repo" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; die "python -m build failed"; }
  [[ -f "$stage/wheels/$wheel_name" ]] || die "the build made $(ls "$stage/wheels"), not $wheel_name"
fi

mapfile -t mcpb < <(bash "$repo/tests/tools/install-mcpb.sh")
node="${mcpb[0]}" cli="${mcpb[1]}"
say "mcpb validate"
"$node" "$cli" validate "$stage/manifest.json" >&2
bundle="$out/rlm-mcp-$version.mcpb"
rm -f "$bundle"
say "mcpb pack"
"$node" "$cli" pack "$stage" "$bundle" >&2
[[ -f "$bundle" ]] || die "mcpb pack made no $bundle"
echo "$bundle"
