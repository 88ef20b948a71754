#!/usr/bin/env bash
# Install the browser the viewer tests drive: Debian's `chromium` package (apt) and Playwright for
# Python (pip, into the active Python environment). Playwright's own browser download is never
# used (it is not reachable from CI); the tests launch /usr/bin/chromium through
# `executable_path`.
#
#   bash tests/tools/install-browser.sh      # prints one line: the chromium binary
#
# Idempotent: when chromium and the playwright module are already there it only prints the path.
# Needs root (or sudo) for apt-get on a machine without chromium. Progress goes to stderr.
# Environment: PYTHON (default: python from PATH, i.e. the activated venv), CHROMIUM (default
# /usr/bin/chromium).
set -euo pipefail

python="${PYTHON:-python}"
chromium="${CHROMIUM:-/usr/bin/chromium}"

if [[ ! -x "$chromium" ]]; then
  command -v apt-get >/dev/null 2>&1 || {
    echo "install-browser: $chromium is missing and apt-get is not available: install Chromium yourself" >&2
    exit 127
  }
  sudo=""
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-browser: need root or sudo for apt-get" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "install-browser: apt-get install chromium" >&2
  # An old package list may not know the current chromium build: refresh it first.
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
fi
[[ -x "$chromium" ]] || { echo "install-browser: apt-get finished but $chromium is missing" >&2; exit 1; }

if ! "$python" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "install-browser: pip install playwright" >&2
  "$python" -m pip install --quiet playwright >&2
fi
"$python" -c "import playwright.sync_api" || {
  echo "install-browser: pip finished but 'import playwright' fails in $python" >&2
  exit 1
}

"$chromium" --version >&2
printf '%s\n' "$chromium"
