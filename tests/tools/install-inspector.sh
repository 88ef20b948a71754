#!/usr/bin/env bash
# Install Node 22 (from the npm package node-<os>-<arch>@22) and the MCP Inspector into a cache
# directory inside the repo, for tests/server/test_inspector.py and for trying rlm-mcp by hand.
#
#   tests/tools/install-inspector.sh          # prints two lines: the node binary, the inspector entry
#   "$node" "$inspector" --cli -e RLM_MCP_MODEL=... rlm-mcp --method tools/list
#
# Idempotent (npm-tool.sh does the work): when both are present at the pinned versions it prints
# their paths at once. Environment: RLM_MCP_INSPECTOR_DIR (default <repo>/.ci-cache/inspector),
# INSPECTOR_VERSION (default below), NODE_MAJOR (default 22).
set -euo pipefail

INSPECTOR_VERSION="${INSPECTOR_VERSION:-2.12.0}"   # needs node >= 22.19

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dest="${RLM_MCP_INSPECTOR_DIR:-$repo/.ci-cache/inspector}"

exec bash "$here/npm-tool.sh" "$dest" \
  node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js \
  "@modelcontextprotocol/inspector@$INSPECTOR_VERSION"
