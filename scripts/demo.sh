#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the default model (SmolLM2-135M) on ARC-Easy
# (clearly above chance for it) at full depth, with the paper's gap threshold, the shipped SVM and
# the hindsight oracle, and print the leaderboard: accuracy, points lost and layers saved.
# Results land in out/demo/ (report.md, report.html, plots, runs/); re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip's --no-compile for the installs below (PIP_NO_COMPILE=1 would read as "compile: yes"): pip
# byte-compiles every installed source file one after another, ~280 MB of them; Python compiles
# the ~110 MB that this job imports when it first imports them, and the rest is never compiled.
export PIP_COMPILE=0
bash scripts/setup.sh
. .venv/bin/activate
adainfer-eval suite scripts/demo.yaml --output_path out/demo
