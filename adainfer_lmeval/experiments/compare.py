"""``adainfer-eval compare``: one model, one policy, beside full depth, from command-line flags.

A one-model suite (see :mod:`.suite_file`): ``adainfer-eval compare --model_args
pretrained=smollm2-135m,policy=threshold,gap=0.6,min_layer=20 --tasks sst2,mmlu --limit 200,1``
loads the model once, runs each task at full depth and with the policy on the same requests,
writes the runs and a report (Markdown, CSV, HTML, plots) under ``--output_path`` and prints
the table. Re-running resumes: finished runs are kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError


def main(argv: list[str]) -> int:
    from adainfer_lmeval.adapter.harness import parse_arg_string
    from adainfer_lmeval.experiments.suite_file import Suite, SuiteTask
    from adainfer_lmeval.experiments.suite_runner import run_suite
    from adainfer_lmeval.reporting.comparison import FULL, compare_rows, load_runs
    from adainfer_lmeval.reporting.report import leaderboard_markdown, write_report

    parser = argparse.ArgumentParser(prog="adainfer-eval compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_args", default="pretrained=smollm2-135m,policy=full")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--limit", default=None,
                        help="documents per task (per subtask for groups like mmlu); one number, or one per task")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output_path", default="out/compare")
    a = parser.parse_args(argv)

    tasks = [t for t in a.tasks.split(",") if t]
    limits = [float(x) for x in a.limit.split(",")] if a.limit else [None]
    if len(limits) == 1:
        limits = limits * len(tasks)
    if len(limits) != len(tasks):
        raise AdaInferError(f"--limit has {len(limits)} values for {len(tasks)} tasks; give one, or one per task")
    args = parse_arg_string(a.model_args)
    model = str(args.pop("pretrained", "smollm2-135m"))
    policy = ",".join([str(args.pop("policy", FULL))] + [f"{k}={v}" for k, v in args.items()])
    suite = Suite(models=[model], policies={model: [] if policy == FULL else [policy]},
                  tasks={model: [SuiteTask(t, limit, a.num_fewshot) for t, limit in zip(tasks, limits)]},
                  batch_size=a.batch_size, device=a.device)
    out = Path(a.output_path)
    rows = compare_rows(load_runs(run_suite(suite, out)))
    write_report(rows, out, title=f"{model}: {policy} beside full depth")
    print(leaderboard_markdown(rows))
    print(f"[compare] report: {out / 'report.md'} (also .csv, .html, plots)")
    return 0
