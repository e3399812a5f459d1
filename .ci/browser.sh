#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/test_mlflow_ui.py drives it headless through Playwright's
# Python client; Playwright's own browser downloads are never used). Idempotent and quiet: does nothing
# when /usr/bin/chromium already runs. Needs root (or passwordless sudo) to install.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "browser.sh: $CHROMIUM is missing and installing it needs root (no passwordless sudo)" >&2
        exit 1
    fi
fi

APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"  # env: sudo drops the caller's environment
log="$(mktemp -t browser-apt.XXXXXX.log)"
trap 'rm -f "$log"' EXIT
if ! { $APT update -qq && $APT install -y -qq chromium; } >"$log" 2>&1; then
    echo "browser.sh: apt-get install chromium failed; last lines of its log:" >&2
    tail -n 20 "$log" >&2
    exit 1
fi
"$CHROMIUM" --version >/dev/null 2>&1 || { echo "browser.sh: $CHROMIUM installed but does not run" >&2; exit 1; }
