"""Run files and the rows that compare each early-exit run with its full-depth baseline.

Input is run files (see :mod:`adainfer_lmeval.experiments.run_files`): each holds lm-eval's results, the
``adainfer`` statistics and compact samples of one (model, task, policy) run. Each early-exit run
is paired with the full-depth run of the same model, task, shots and limit; a run without its
baseline is refused. A task where the full-depth model is not clearly above chance (less than two
standard errors) is flagged: a saving there proves nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError

PRIMARY_METRICS = ("acc", "exact_match", "f1", "word_perplexity")
FULL = "full"  # the full-depth baseline's policy name
ORACLE = "oracle"  # not a policy: the earliest layer after which each answer never changes (hindsight)


def load_runs(paths: list[str | Path]) -> list[dict]:
    """Run files, from files or folders (searched recursively for runs/**.json)."""
    runs = []
    for p in map(Path, paths):
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise AdaInferError(f"{f}: not a readable run file ({error})") from None
            if "settings" in data and "adainfer" in data:
                data["path"] = str(f)
                runs.append(data)
    if not runs:
        raise AdaInferError(f"no run files found in {', '.join(map(str, paths))}; run `adainfer-eval suite` first")
    return runs


def metric_of(row: dict) -> tuple[str, float, float | None]:
    """(metric, value, stderr) of a task's results row: the first primary metric present.

    Generation tasks report metrics under their filter (``exact_match,remove_whitespace``);
    the unfiltered ``none`` is preferred where both exist.
    """
    for name in PRIMARY_METRICS:
        filters = [k.split(",", 1)[1] for k in row if k.startswith(f"{name},")]
        if filters:
            filt = "none" if "none" in filters else filters[0]
            stderr = row.get(f"{name}_stderr,{filt}")
            return name, float(row[f"{name},{filt}"]), float(stderr) if isinstance(stderr, (int, float)) else None
    raise AdaInferError(f"no known metric among {', '.join(PRIMARY_METRICS)} in {sorted(row)}")


def leaf_samples(run: dict) -> list[dict]:
    """All samples of the run's task (the leaves, for a group such as mmlu)."""
    return [s for rows in run["samples"].values() for s in rows]


def chance_level(samples: list[dict]) -> float | None:
    """Expected score of guessing: 1/options over multiple-choice documents; 0 for generations
    (a guessed free-text answer is almost never an exact match, so the floor is the bar)."""
    if samples and all("generation" in s for s in samples):
        return 0.0
    counts = [len(s["loglikelihoods"]) for s in samples if len(s.get("loglikelihoods", [])) > 1]
    return sum(1.0 / c for c in counts) / len(counts) if counts else None


def binomial_stderr(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 and 0 <= p <= 1 else None


def at_chance(score: float, chance: float | None, stderr: float | None) -> bool:
    """The one rule (reports and the study): full depth is not clearly above chance when it is
    within two standard errors of it, so a saving there proves nothing."""
    return chance is not None and stderr is not None and score - chance <= 2 * stderr


def _key(run: dict) -> tuple:
    s = run["settings"]
    return s["model"], s["task"], s["limit"], s["num_fewshot"]


def compare_rows(runs: list[dict]) -> list[dict]:
    """One row per early-exit run, beside its full-depth baseline (and one row per baseline)."""
    baselines = {_key(r): r for r in runs if r["settings"]["policy"] == FULL}
    rows = []
    for run in runs:
        baseline = baselines.get(_key(run))
        if baseline is None:
            s = run["settings"]
            raise AdaInferError(
                f"no full-depth run for {s['model']} / {s['task']} (limit {s['limit']}, shots {s['num_fewshot']}); "
                "a saving means nothing without its baseline"
            )
        rows.append(compare_run(baseline, run))
    return sorted(rows, key=lambda r: (r["model"], r["task"], r["policy"] != FULL, -r["layers_saved_pct"]))


def compare_run(full: dict, early: dict) -> dict:
    task = early["settings"]["task"]
    metric, full_value, full_se = metric_of(full["results"][task])
    _, early_value, early_se = metric_of(early["results"][task])
    stats = early["adainfer"]["tasks"][task]
    samples = leaf_samples(full)
    chance = chance_level(samples)
    # lm-eval gives groups (mmlu) no stderr without bootstrapping: use the binomial one then.
    full_se = full_se if full_se is not None else binomial_stderr(full_value, len(samples))
    early_se = early_se if early_se is not None else binomial_stderr(early_value, len(leaf_samples(early)))
    # Both runs score the same documents; with only per-run stderrs at hand, the root-sum-square
    # is the independent-samples bound on the difference's standard error.
    delta_se = math.hypot(full_se, early_se) if full_se is not None and early_se is not None else None
    # "<=": a score of exactly the floor (0 of n exact matches, stderr 0) is at chance too.
    flagged = at_chance(full_value, chance, full_se)
    requests = stats["requests"]
    seconds_full, seconds_early = full["adainfer"]["seconds"], early["adainfer"]["seconds"]
    timed = seconds_early is not None  # the oracle is computed in hindsight, not timed
    return {
        "model": early["settings"]["model"],
        "task": task,
        "policy": early["settings"]["policy"],
        "num_fewshot": early["settings"]["num_fewshot"],
        "limit": early["settings"]["limit"],
        "metric": metric,
        "documents": len(samples),
        "requests": requests,
        "chance": chance,
        "full": full_value,
        "early_exit": early_value,
        "delta": early_value - full_value,
        "delta_stderr": delta_se,
        "mean_layers": stats["mean_layers"],
        "num_layers": stats["num_layers"],
        "layers_saved_pct": stats["layers_saved_pct"],
        "flops_saved_pct": stats["flops_saved_pct"],
        "ms_per_request_full": 1000 * seconds_full / max(requests, 1),
        "ms_per_request_early_exit": 1000 * seconds_early / max(requests, 1) if timed else None,
        "speedup": seconds_full / seconds_early if timed and seconds_early else None,
        "at_chance": flagged,
        "exit_layer_histogram": stats.get("exit_layer_histogram", {}),
    }


def macro_average(rows: list[dict]) -> list[dict]:
    """One row per (model, policy): the mean over tasks of each figure."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["policy"]), []).append(r)  # over tasks and shot settings
    for (model, policy), members in groups.items():
        mean = lambda k: sum(m[k] for m in members) / len(members)  # noqa: E731
        timed = all(m["ms_per_request_early_exit"] for m in members)
        out.append({
            "model": model, "task": "macro-average", "policy": policy, "metric": "", "documents": sum(m["documents"] for m in members),
            "chance": None, "full": mean("full"), "early_exit": mean("early_exit"), "delta": mean("delta"),
            "delta_stderr": None, "mean_layers": mean("mean_layers"), "num_layers": members[0]["num_layers"],
            "layers_saved_pct": mean("layers_saved_pct"), "flops_saved_pct": mean("flops_saved_pct"),
            "ms_per_request_full": mean("ms_per_request_full"),
            "ms_per_request_early_exit": mean("ms_per_request_early_exit") if timed else None,
            "speedup": mean("ms_per_request_full") / mean("ms_per_request_early_exit") if timed else None,
            "at_chance": any(m["at_chance"] for m in members), "requests": sum(m["requests"] for m in members),
        })
    return out


def display_rows(rows: list[dict]) -> list[dict]:
    """What every table shows: the early-exit rows (each carries its baseline), then macro-averages."""
    early = [r for r in rows if r["policy"] != FULL]
    return early + macro_average(early)
