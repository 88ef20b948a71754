#!/usr/bin/env bash
# Install Node 22 and the MCP Bundle CLI (npm @anthropic-ai/mcpb, pinned) into a cache directory
# inside the repo, for packaging/build-bundle.sh and tests/test_packaging.py.
#
#   tests/tools/install-mcpb.sh        # prints two lines: the node binary, the mcpb CLI script
#   "$node" "$mcpb" validate packaging/manifest.json
#
# Idempotent. Environment: RLM_MCP_MCPB_DIR (default <repo>/.ci-cache/mcpb), MCPB_VERSION
# (default below), NODE_MAJOR (default 22).
set -euo pipefail

MCPB_VERSION="${MCPB_VERSION:-2.1.2}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dest="${RLM_MCP_MCPB_DIR:-$repo/.ci-cache/mcpb}"

exec bash "$here/npm-tool.sh" "$dest" node_modules/@anthropic-ai/mcpb/dist/cli/cli.js \
  "@anthropic-ai/mcpb@$MCPB_VERSION"
