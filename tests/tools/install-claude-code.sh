#!/usr/bin/env bash
# Install Node 22 and a pinned Claude Code CLI (npm @anthropic-ai/claude-code) into a cache
# directory inside the repo, for tests/server/test_claude_code.py and for trying rlm-mcp in Claude Code
# by hand. Also installs strace (Debian package) when it is missing and apt-get is usable: the
# test uses it to prove that no connection leaves 127.0.0.1.
#
#   tests/tools/install-claude-code.sh     # prints two lines: the node binary, the claude binary
#   "$claude" mcp add rlm -- rlm-mcp
#
# Idempotent: when everything is present at the pinned versions it prints the paths at once.
# Environment: RLM_MCP_CLAUDE_CODE_DIR (default <repo>/.ci-cache/claude-code),
# CLAUDE_CODE_VERSION (default below), NODE_MAJOR (default 22).
set -euo pipefail

# The npm package ships a native binary per platform (optional dependencies); its install
# script, which needs Node >= 22, copies the right one over bin/claude.exe.
CLAUDE_CODE_VERSION="${CLAUDE_CODE_VERSION:-2.1.332}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dest="${RLM_MCP_CLAUDE_CODE_DIR:-$repo/.ci-cache/claude-code}"

if ! command -v strace >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  echo "install-claude-code: apt-get install strace" >&2
  { apt-get update -qq && apt-get install -y -qq strace; } >&2 \
    || echo "install-claude-code: could not install strace (the network check will fail)" >&2
fi

paths="$(bash "$here/npm-tool.sh" "$dest" node_modules/@anthropic-ai/claude-code/bin/claude.exe \
  "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION")"
claude="$(printf '%s\n' "$paths" | sed -n 2p)"
# Without its native package the install leaves a stub in place that only prints instructions.
version="$("$claude" --version 2>&1 || true)"
case "$version" in
  "$CLAUDE_CODE_VERSION"*) ;;
  *) echo "install-claude-code: $claude --version said: $version (expected $CLAUDE_CODE_VERSION)" >&2; exit 1 ;;
esac
printf '%s\n' "$paths"
