#!/usr/bin/env bash
# Installs Chromium (Debian package) for tests/test_report_browser.py when no Chromium is on PATH.
# Idempotent and quiet: does nothing when one is found; needs root (or sudo) and apt-get to install.
set -euo pipefail
for browser in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$browser" >/dev/null 2>&1 && exit 0
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser: no Chromium and no apt-get; install Chromium to run tests/test_report_browser.py" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "setup_browser: no Chromium, and not root: run 'apt-get install chromium' as root" >&2
    exit 0
  fi
fi
log=$(mktemp)
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "setup_browser: installing chromium failed (log above)" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
