#!/usr/bin/env bash
# The GPU check of issue 16 (adainfer_lmeval/experiments/gpu_check.py, parts in experiments/gpu/): parity in fp32/bf16 on tiny models,
# then wall-clock of early exit on random-weight Llama-3.2-1B- and Llama-2-7B-shaped models.
#
#   bash scripts/gpu_check.sh prepare   # HERE (PyPI reachable): the wheels the GPU machine lacks into .whl/ (ignored)
#   bash scripts/gpu_check.sh run       # ON THE GPU MACHINE: install them into /tmp/site, run the check into $OUT
#   bash scripts/gpu_check.sh smoke     # here: the same module on tiny shapes on the CPU (seconds)
#
# The device call a later session makes, after `prepare` (one call; the budget leaves room for a rerun):
#
#   run(command="bash scripts/gpu_check.sh run", carry=[".whl"], timeout_s=540)
#
# It writes report.md, report.json and gpu_check.log into $OUT; copy them to reports/gpu/.
# The machine has torch 2.11 (CUDA), transformers 5.17, accelerate, numpy, pandas, pyarrow,
# tokenizers and safetensors, and no lm-eval or datasets; nothing can be fetched there, so those
# travel as wheels (about 23 MB) and go into /tmp/site with --no-deps, ahead on PYTHONPATH: the
# machine's own packages are not touched. transformers 5.17 lacks the `cache=` keyword that
# architectures.py passes to layers and mask builders (5.17 still calls it `past_key_values`), so
# the run uses the CI's transformers 5.24.0 from its wheel (pure Python; 5.17's hub, tokenizers,
# safetensors and regex satisfy it); GPU_CHECK_MACHINE_TRANSFORMERS=1 runs on the machine's instead.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_DIR=.whl
# lm-eval and what importing its hf backend needs that the GPU machine lacks (datasets, and
# datasets' dill and multiprocess), and the CI's transformers; one version of each.
WHEELS=(lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0)
BUDGET_S=${GPU_CHECK_BUDGET_S:-390}   # the module stops starting sections after this
LIMIT_S=${GPU_CHECK_LIMIT_S:-480}     # and is killed after this (8 minutes)

case "${1:-}" in
  prepare)
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    mkdir -p "$WHEEL_DIR"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEEL_DIR" "${WHEELS[@]}"
    ls -l "$WHEEL_DIR"
    wheels=$(du -sb "$WHEEL_DIR" | cut -f1)
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo "wheels: $((wheels / 1024)) KiB; working tree that travels besides them: $((tree / 1024)) KiB;" \
         "together $(((wheels + tree) / 1048576)) MiB of the 64 MiB limit"
    if [ $((wheels + tree)) -gt $((48 * 1048576)) ]; then
      echo "too close to the 64 MiB limit: leave out what is not needed" >&2; exit 1
    fi
    ;;
  run)
    OUT=${OUT:-out/gpu_check}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|pyarrow|fsspec|huggingface.hub|pandas|numpy|tokenizers) ' || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
    site=/tmp/site
    if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
      wheels=("$WHEEL_DIR"/*.whl)
      if [ -n "${GPU_CHECK_MACHINE_TRANSFORMERS:-}" ]; then
        wheels=($(ls "$WHEEL_DIR"/*.whl | grep -v '/transformers-'))
      fi
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    else
      echo "no wheels in $WHEEL_DIR (run 'prepare' here and carry .whl): running without lm-eval"
    fi
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c "import transformers; print('transformers', transformers.__version__, 'from', transformers.__file__)"
    if ! err=$(python3 -c "import lm_eval.models.huggingface" 2>&1); then
      # Without lm-eval the package still imports; gpu_check then skips the hf comparisons only.
      echo "lm-eval does not import here ($(echo "$err" | tail -1)): running without it"
      mkdir -p /tmp/site_no_lm_eval
      for f in "$site"/*; do
        case "$(basename "$f")" in lm_eval*|datasets*) ;; *) ln -sf "$f" /tmp/site_no_lm_eval/ ;; esac
      done
      export PYTHONPATH="/tmp/site_no_lm_eval:$PWD"
    fi
    set -o pipefail
    timeout "$LIMIT_S" python3 -m adainfer_lmeval.experiments.gpu_check --device cuda --budget_s "$BUDGET_S" --output_dir "$OUT" "${@:2}" \
      2>&1 | tee "$OUT/gpu_check.log"
    ;;
  smoke)
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m adainfer_lmeval.experiments.gpu_check --smoke --device cpu \
      --output_dir "${OUT:-out/gpu_check_smoke}" "${@:2}"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare|run|smoke [extra gpu_check args]" >&2
    exit 2
    ;;
esac
