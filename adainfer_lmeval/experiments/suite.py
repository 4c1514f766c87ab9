"""``adainfer-eval suite``: run a suite file (models × tasks × policies, the full-depth baseline
always beside them), then write its report.

The suite file is described in :mod:`.suite_file`; each run is stored in its own file
(:mod:`.run_files`), so a killed or interrupted suite resumes where it stopped, and a run whose
file holds the same settings is not run again. ``--dry_run`` lists what would run without
loading anything; ``--migrate`` upgrades run files written before the settings carried device,
dtype, model args and the policy hash.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adainfer_lmeval.experiments.run_files import migrate_legacy_runs, plan_suite
from adainfer_lmeval.experiments.suite_file import Suite
from adainfer_lmeval.experiments.suite_runner import run_suite
from adainfer_lmeval.offline.pypi import package_versions
from adainfer_lmeval.reporting.comparison import compare_rows, load_runs
from adainfer_lmeval.reporting.report import leaderboard_markdown, write_report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="adainfer-eval suite", description="Run a suite file, then report.")
    parser.add_argument("suite", help="suite file (YAML or JSON): models, policies, tasks, batch_size")
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--dry_run", action="store_true", help="list which runs are done and which would run; load nothing")
    parser.add_argument("--migrate", action="store_true",
                        help="first upgrade run files written before settings carried device, dtype, model_args and "
                             "the policy file's sha256 (only where they match this suite as it is now)")
    a = parser.parse_args(argv)
    out = Path(a.output_path)
    suite = Suite.load(a.suite)
    if a.migrate:
        migrated, left = migrate_legacy_runs(suite, out)
        print(f"[suite] migrated {migrated} run file(s); {left} left to run again")
    if a.dry_run:
        plan = plan_suite(suite, out)
        for run in plan:
            print(f"{'kept' if run.done else 'RUN ':4}  {run.model} {run.task.name} {run.policy}  "
                  f"({run.status}) {run.path}")
        pending = sum(not r.done for r in plan)
        legacy = sum(r.status == "legacy" for r in plan)
        print(f"[suite] {pending} of {len(plan)} runs would run" + (
            f" ({legacy} written under the old settings; --migrate keeps them if this suite has not changed)"
            if legacy else ""))
        return 0
    try:
        files = run_suite(suite, out)
    except KeyboardInterrupt:
        kept = sum(r.done for r in plan_suite(suite, out))
        print(f"[suite] interrupted: {kept} finished run(s) kept under {out / 'runs'}; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    rows = compare_rows(load_runs(files))
    versions = package_versions()
    preamble = (f"Suite `{a.suite}`; regenerate with `adainfer-eval suite {a.suite} --output_path {out}`. "
                f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}. Date: {time.strftime('%Y-%m-%d')}.")
    write_report(rows, out, title=f"adainfer-lmeval: {Path(a.suite).stem}", preamble=preamble)
    print(leaderboard_markdown(rows))
    print(f"[suite] report: {out / 'report.md'} (also .csv, .html, plots)")
    return 0
