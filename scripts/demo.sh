#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the default model (SmolLM2-135M) on SST-2
# and MMLU, early exit beside the full-depth baseline, and print accuracy and savings per task.
# Results land in out/demo/ (compare.md, compare.json). A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
policy=${POLICY:-policy=threshold,gap=0.6,min_layer=20}
adainfer-eval compare --model_args "pretrained=smollm2-135m,$policy" \
  --tasks sst2,mmlu --limit 200,1 --batch_size 8 --output_path out/demo
