#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the default model (SmolLM2-135M) on ARC-Easy
# (clearly above chance for it) at full depth, with the paper's gap threshold, the shipped SVM and
# the hindsight oracle, and print the leaderboard: accuracy, points lost and layers saved.
# Results land in out/demo/ (report.md, report.html, plots, runs/). 6 min 39 s on 2 quiet CPU
# cores with empty caches, setup included (scripts/demo.yaml); re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
adainfer-eval suite scripts/demo.yaml --output_path out/demo
