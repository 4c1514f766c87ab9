#!/usr/bin/env bash
# Sets up (as scripts/setup.sh) and runs the whole test suite, real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
