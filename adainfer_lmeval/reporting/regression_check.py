"""``adainfer-eval check``: fail when early exit's accuracy or savings regress against a baseline.

The baseline is a ``report.json`` written by ``adainfer-eval report`` / ``suite`` (committed,
for CI). Every early-exit row of the baseline must have a current row of the same model, task,
policy, shots and limit; rows of the same model, task and policy under other shots or limits
are refused (they measure something else). A row fails when

- its accuracy fell more than ``--max_accuracy_drop`` points below the baseline's, or
- its layers saved fell below ``--min_savings_fraction`` of the baseline's, or
- (with ``--max_drop_vs_full``) it lost more than that many points against its own full depth.

Nothing is taken on trust: every run's accuracy, mean exit layer, layers saved and exit-layer
histogram are recomputed from its logged samples and a run whose stored figures differ is
refused; an empty baseline, one without early-exit rows, one of the wrong shape, and two rows
(baseline or current) for one model, task, policy, shots and limit are errors, not "ok".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.reporting.comparison import FULL, compare_rows, leaf_samples, load_runs, metric_of

IDENTITY = ("model", "task", "policy")
SHOTS_AND_LIMIT = ("num_fewshot", "limit")  # settings both rows must share
# What a baseline row must hold, and of what type (None allowed where the figure may be absent).
ROW_FIELDS = {"model": (str,), "task": (str,), "policy": (str,), "num_fewshot": (int, type(None)),
              "limit": (int, float, type(None)), "early_exit": (int, float), "layers_saved_pct": (int, float)}


def _is_early_exit(row: dict) -> bool:
    return row["policy"] != FULL and row["task"] != "macro-average"


def _row_key(row: dict) -> tuple:
    return tuple(row[k] for k in IDENTITY + SHOTS_AND_LIMIT)


def validate_baseline(baseline, source: str = "baseline") -> list[dict]:
    """The baseline's early-exit rows; one-line errors for a wrong shape, duplicates or no rows."""
    if not isinstance(baseline, list):
        raise AdaInferError(f"{source}: a baseline is the list of rows of a report.json, got a {type(baseline).__name__}")
    for i, row in enumerate(baseline):
        if not isinstance(row, dict):
            raise AdaInferError(f"{source}: row {i} is a {type(row).__name__}, not a report row")
        for key, types in ROW_FIELDS.items():
            value = row.get(key, KeyError)
            if value is KeyError or isinstance(value, bool) or not isinstance(value, types):
                raise AdaInferError(f"{source}: row {i} has no valid {key!r} ({value if value is not KeyError else 'missing'}); "
                                    "regenerate the baseline from adainfer-eval suite's report.json")
            if isinstance(value, float) and not math.isfinite(value):
                raise AdaInferError(f"{source}: row {i} has {key}={value}; a baseline figure must be finite")
    rows = [r for r in baseline if _is_early_exit(r)]
    if not rows:
        raise AdaInferError(f"{source}: no early-exit rows ({len(baseline)} rows in all): it holds the runs to nothing; "
                            "regenerate it with adainfer-eval suite ... && cp OUT/report.json BASELINE")
    _refuse_duplicates(rows, source)
    return rows


def _refuse_duplicates(rows: list[dict], source: str) -> None:
    counts = Counter(_row_key(r) for r in rows)
    twice = [k for k, n in counts.items() if n > 1]
    if twice:
        model, task, policy, shots, limit = twice[0]
        raise AdaInferError(f"{source}: {len(twice)} row key(s) appear more than once, e.g. {model}/{task}/{policy} "
                            f"(shots {shots}, limit {limit}); one run per key, or the comparison is ambiguous")


def _close(a, b) -> bool:
    return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
            and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))


def recompute_figures(run: dict) -> dict:
    """A run's figures from its logged samples alone: metric, mean exit layer, histogram, documents."""
    task = run["settings"]["task"]
    metric, _, _ = metric_of(run["results"][task])
    samples = leaf_samples(run)
    scores, units = [], []
    for s in samples:
        if metric == "acc" and s.get("loglikelihoods") and isinstance(s.get("target"), int):
            lls = s["loglikelihoods"]  # lm-eval's acc: the option with the highest log-likelihood
            scores.append(float(max(range(len(lls)), key=lls.__getitem__) == s["target"]))
        elif isinstance(s.get(metric), (int, float)):
            scores.append(float(s[metric]))
        layers = s.get("exit_layers", [])
        units.extend(layers if isinstance(layers, list) else [layers])
    figures = {"documents": len(samples)}
    if samples and len(scores) == len(samples):
        figures[metric] = sum(scores) / len(scores)
    if units:
        figures["mean_layers"] = sum(map(float, units)) / len(units)
        figures["exit_layer_histogram"] = {
            str(int(v)) if v.is_integer() else f"{v:.2f}": n for v, n in Counter(map(float, units)).items()}
    return figures


def verify_run(run: dict) -> list[str]:
    """Where a run's stored figures differ from its samples' (empty when they agree)."""
    try:
        task = run["settings"]["task"]
        metric, value, _ = metric_of(run["results"][task])
        stats = run["adainfer"]["tasks"][task]
        figures = recompute_figures(run)
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        return [f"not a complete run file ({type(error).__name__}: {error})"]
    if not figures["documents"]:
        return ["no logged samples to recompute its figures from"]
    problems = []
    if metric not in figures:
        problems.append(f"{metric} is not logged per sample")
    elif not _close(figures[metric], value):
        problems.append(f"{metric} {value} stored, {figures[metric]} from its samples")
    if "mean_layers" not in figures:
        problems.append("no exit layers logged per sample")
    else:
        if not _close(figures["mean_layers"], stats.get("mean_layers")):
            problems.append(f"mean layers {stats.get('mean_layers')} stored, {figures['mean_layers']} from its samples")
        num_layers = stats.get("num_layers")
        numeric = isinstance(num_layers, int) and not isinstance(num_layers, bool) and num_layers > 0
        saved = 100 * (1 - figures["mean_layers"] / num_layers) if numeric else None
        if not _close(stats.get("layers_saved_pct"), saved):
            problems.append(f"layers saved {stats.get('layers_saved_pct')}% stored, {saved}% from its samples")
        if stats.get("exit_layer_histogram") != figures["exit_layer_histogram"]:
            problems.append("exit-layer histogram differs from its samples'")
    return problems


def verify_runs(runs: list[dict]) -> None:
    """Refuse (one line) runs whose figures do not follow from their samples."""
    bad = [(run.get("path", "?"), problems) for run in runs if (problems := verify_run(run))]
    if bad:
        path, problems = bad[0]
        more = f" (and {len(bad) - 1} more run(s))" if len(bad) > 1 else ""
        raise AdaInferError(f"{path}: its figures do not follow from its logged samples: {'; '.join(problems)}{more}; "
                            "re-run it with adainfer-eval suite")


def check_runs(runs: list[dict], baseline, max_accuracy_drop: float, min_savings_fraction: float,
               max_drop_vs_full: float | None = None, source: str = "baseline") -> list[str]:
    """Verify the runs against their samples, then hold them to the baseline."""
    validate_baseline(baseline, source)
    verify_runs(runs)
    current = compare_rows(runs)
    _refuse_duplicates([r for r in current if _is_early_exit(r)], "current runs")
    return check_rows(current, baseline, max_accuracy_drop, min_savings_fraction, max_drop_vs_full)


def check_rows(current: list[dict], baseline: list[dict], max_accuracy_drop: float, min_savings_fraction: float,
               max_drop_vs_full: float | None = None) -> list[str]:
    """One line per failure; empty when everything holds."""
    baseline = validate_baseline(baseline)
    failures = []
    for base in baseline:
        ident = tuple(base[k] for k in IDENTITY)
        name = "/".join(map(str, ident))
        candidates = [r for r in current if tuple(r[k] for k in IDENTITY) == ident]
        same = [r for r in candidates if all(r[k] == base[k] for k in SHOTS_AND_LIMIT)]
        if not same and candidates:
            now = candidates[0]
            differing = [k for k in SHOTS_AND_LIMIT if now[k] != base[k]]
            raise AdaInferError(
                f"{name}: cannot compare runs with different {', '.join(differing)} "
                f"({', '.join(f'{k} {base[k]} vs {now[k]}' for k in differing)}); rerun with the baseline's settings"
            )
        if not same:
            failures.append(f"{name}: missing from the current run")
            continue
        if len(same) > 1:
            raise AdaInferError(f"{name}: {len(same)} current runs for one key (shots {base['num_fewshot']}, "
                                f"limit {base['limit']}); check one run per key")
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
    except (OSError, ValueError) as error:  # ValueError: not JSON, or bytes that are not text
        raise AdaInferError(f"baseline {a.baseline} is not a readable report.json ({error})") from None
    failures = check_runs(load_runs(a.runs), baseline, a.max_accuracy_drop, a.min_savings_fraction,
                          a.max_drop_vs_full, source=f"baseline {a.baseline}")
    for line in failures:
        print(f"FAIL {line}")
    if not failures:
        print(f"ok: {len(validate_baseline(baseline))} rows hold against {a.baseline}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
