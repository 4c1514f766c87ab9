#!/usr/bin/env bash
# Sets up (as scripts/setup.sh) and runs the whole test suite, real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh  # Chromium for tests/test_report_browser.py
. .venv/bin/activate
python -m pytest -q "$@"
