"""``adainfer-eval check``: fail when early exit's accuracy or savings regress against a baseline.

The baseline is a ``report.json`` written by ``adainfer-eval report`` / ``suite`` (committed,
for CI). Every early-exit row of the baseline must have a current row of the same model, task,
policy, shots and limit; rows of the same model, task and policy under other shots or limits
are refused (they measure something else). A row fails when

- its accuracy fell more than ``--max_accuracy_drop`` points below the baseline's, or
- its layers saved fell below ``--min_savings_fraction`` of the baseline's, or
- (with ``--max_drop_vs_full``) it lost more than that many points against its own full depth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AdaInferError
from .report import FULL, compare_rows, load_runs

IDENTITY = ("model", "task", "policy")
SETTINGS = ("num_fewshot", "limit")


def check_rows(current: list[dict], baseline: list[dict], max_accuracy_drop: float, min_savings_fraction: float,
               max_drop_vs_full: float | None = None) -> list[str]:
    """One line per failure; empty when everything holds."""
    failures = []
    for base in (r for r in baseline if r["policy"] != FULL and r["task"] != "macro-average"):
        ident = tuple(base[k] for k in IDENTITY)
        name = "/".join(map(str, ident))
        candidates = [r for r in current if tuple(r[k] for k in IDENTITY) == ident]
        same = [r for r in candidates if all(r[k] == base[k] for k in SETTINGS)]
        if not same and candidates:
            now = candidates[0]
            differing = [k for k in SETTINGS if now[k] != base[k]]
            raise AdaInferError(
                f"{name}: cannot compare runs with different {', '.join(differing)} "
                f"({', '.join(f'{k} {base[k]} vs {now[k]}' for k in differing)}); rerun with the baseline's settings"
            )
        if not same:
            failures.append(f"{name}: missing from the current run")
            continue
        now = same[0]
        name += f" ({base['num_fewshot']}-shot)"
        drop = -100 * now["delta"]
        if max_drop_vs_full is not None and drop > max_drop_vs_full:
            failures.append(f"{name}: accuracy {drop:.1f} points below full depth (allowed {max_drop_vs_full})")
        fall = 100 * (base["early_exit"] - now["early_exit"])
        if fall > max_accuracy_drop:
            failures.append(f"{name}: accuracy {fall:.1f} points below the baseline's (allowed {max_accuracy_drop})")
        floor = min_savings_fraction * base["layers_saved_pct"]
        if now["layers_saved_pct"] < floor - 1e-9:
            failures.append(
                f"{name}: layers saved {now['layers_saved_pct']:.1f}% < {min_savings_fraction:.0%} of the baseline's "
                f"{base['layers_saved_pct']:.1f}%"
            )
    return failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="adainfer-eval check", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run files or folders (adainfer-eval suite output)")
    parser.add_argument("--baseline", required=True, help="a report.json to hold the runs to")
    parser.add_argument("--max_accuracy_drop", type=float, default=1.0, help="points (default 1.0)")
    parser.add_argument("--min_savings_fraction", type=float, default=0.9, help="of the baseline's layers saved (default 0.9)")
    parser.add_argument("--max_drop_vs_full", type=float, default=None, help="points against the run's own full depth (off by default)")
    a = parser.parse_args(argv)
    try:
        baseline = json.loads(Path(a.baseline).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AdaInferError(f"baseline {a.baseline} is not a readable report.json ({error})") from None
    failures = check_rows(compare_rows(load_runs(a.runs)), baseline, a.max_accuracy_drop, a.min_savings_fraction,
                          a.max_drop_vs_full)
    for line in failures:
        print(f"FAIL {line}")
    if not failures:
        print(f"ok: {sum(1 for r in baseline if r['policy'] != FULL and r['task'] != 'macro-average')} rows hold against {a.baseline}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
