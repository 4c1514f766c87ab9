"""Reports: early exit beside the full-depth baseline, per task, as Markdown, CSV, HTML and plots.

Input is run files (see :mod:`adainfer_lmeval.experiments.suite`): each holds lm-eval's results, the ``adainfer``
statistics and compact samples of one (model, task, policy) run. Each early-exit run is paired
with the full-depth run of the same model, task, shots and limit; a run without its baseline is
refused. A task where the full-depth model is not clearly above chance (less than two standard
errors) is flagged: a saving there proves nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.reporting.tables import (  # noqa: F401  (HEADERS, _cells, Column: the long table's API, kept importable here)
    HEADERS, LEGEND, RUN_COLUMNS, WITHIN_POINTS, Column, _cells, leaderboard_columns, md_escape, render_csv,
    render_markdown_table, task_summary, verdict,
)

PRIMARY_METRICS = ("acc", "exact_match", "f1", "word_perplexity")
FULL = "full"


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


# --- The leaderboard: per model, one row per policy, one column group per task ------------------

def _group_label(task: str, shots) -> str:
    return task + (f" {shots}-shot" if shots is not None else "")


def task_groups(rows: list[dict]) -> list[dict]:
    """The (task, shots, limit) settings of early-exit rows, in row order, with their full-depth figures."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r["policy"] == FULL or r["task"] == "macro-average":
            continue
        key = (r["task"], r.get("num_fewshot"), r.get("limit"))
        if key not in groups:
            shots = "default" if r.get("num_fewshot") is None else r["num_fewshot"]
            groups[key] = {"key": f"{r['task']}-{shots}shot-{r.get('limit')}",
                           "label": _group_label(r["task"], r.get("num_fewshot")), "task": r["task"],
                           "shots": r.get("num_fewshot"), "limit": r.get("limit"), "metric": r["metric"],
                           "documents": r["documents"], "full": r["full"], "chance": r["chance"],
                           "at_chance": r["at_chance"]}
    labels = [g["label"] for g in groups.values()]
    # Tasks at chance last: their greyed columns are the ones to read least.
    groups = dict(sorted(groups.items(), key=lambda kv: kv[1]["at_chance"]))
    for g in groups.values():  # the same task and shots under two limits: tell them apart
        if labels.count(g["label"]) > 1:
            g["label"] += f" (limit {g['limit']})"
    return list(groups.values())


def _cell(r: dict) -> dict:
    return {"acc": r["early_exit"], "delta": r["delta"], "saved": r["layers_saved_pct"],
            "flops": r["flops_saved_pct"], "at_chance": r["at_chance"]}


def _macro(cells: dict, groups: list[dict]) -> dict | None:
    """Means over the tasks above chance; None when there is none or the row lacks one of them."""
    above = [g["key"] for g in groups if not g["at_chance"]]
    if not above or any(k not in cells for k in above):
        return None
    mean = lambda f: sum(cells[k][f] for k in above) / len(above)  # noqa: E731
    return {"acc": mean("acc"), "delta": mean("delta"), "saved": mean("saved"), "flops": mean("flops"), "tasks": len(above)}


def leaderboard(rows: list[dict]) -> list[dict]:
    """One section per model: its task groups and its rows (full depth, the oracle, then the
    policies ranked: those within ``WITHIN_POINTS`` of full depth on the macro first, by macro
    layers saved; then the rest, by macro Δ). The best row is the first ranked one that keeps
    accuracy and saves any layers."""
    sections = []
    models = list(dict.fromkeys(r["model"] for r in rows if r["policy"] != FULL))
    for model in models:
        mine = [r for r in rows if r["model"] == model and r["policy"] != FULL]
        groups = task_groups(mine)
        key_of = {(g["task"], g["shots"], g["limit"]): g["key"] for g in groups}
        full_cells = {g["key"]: {"acc": g["full"], "delta": 0.0, "saved": 0.0, "flops": 0.0, "at_chance": g["at_chance"]}
                      for g in groups}
        table = [{"model": model, "policy": FULL, "label": "full depth (reference)", "kind": "reference",
                  "cells": full_cells, "macro": _macro(full_cells, groups), "within": None, "rank": None, "best": False}]
        ranked = []
        for policy in dict.fromkeys(r["policy"] for r in mine):
            cells = {key_of[(r["task"], r.get("num_fewshot"), r.get("limit"))]: _cell(r) for r in mine if r["policy"] == policy}
            macro = _macro(cells, groups)
            within = None if macro is None else 100 * macro["delta"] >= -WITHIN_POINTS - 1e-9
            row = {"model": model, "policy": policy, "label": policy, "kind": "ranked", "cells": cells, "macro": macro,
                   "within": within, "rank": None, "best": False}
            if policy == "oracle":
                row.update(kind="bound", label="oracle (hindsight bound, untimed)")
                table.append(row)
            else:
                ranked.append(row)

        def order(row: dict) -> tuple:
            m = row["macro"]
            if m is None:
                return (2, 0.0, 0.0, 0.0, row["policy"])
            if row["within"]:  # ties in layers saved go to the cheaper policy (its checks cost FLOPs)
                return (0, -m["saved"], -m["delta"], -(m.get("flops") or 0.0), row["policy"])
            return (1, -m["delta"], -m["saved"], 0.0, row["policy"])

        ranked.sort(key=order)
        for i, row in enumerate(r for r in ranked if r["macro"] is not None):
            row["rank"] = i + 1
        best = next((r for r in ranked if r["within"] and r["macro"]["saved"] > 0), None)
        if best is not None:
            best["best"] = True
        num_layers = mine[0]["num_layers"]
        sections.append({"model": model, "num_layers": num_layers, "groups": groups, "rows": table + ranked})
    return sections


def markdown_table(rows: list[dict]) -> str:
    """The long table (every run beside its baseline, then macro-averages), as Markdown."""
    return render_markdown_table(RUN_COLUMNS, display_rows(rows))


def write_csv(rows: list[dict], path: Path) -> None:
    """The long table as CSV."""
    render_csv(RUN_COLUMNS, display_rows(rows), path)


def leaderboard_markdown(rows: list[dict]) -> str:
    """Per model: its tasks, then its leaderboard table."""
    parts = [LEGEND]
    for section in leaderboard(rows):
        parts.append(f"### {md_escape(section['model'])} ({section['num_layers']} layers)")
        parts.append("\n".join(f"- {md_escape(task_summary(g, '†'))}" for g in section["groups"]))
        parts.append(render_markdown_table(leaderboard_columns(section["groups"]), section["rows"]))
        parts.append(md_escape(verdict(section)))
    return "\n\n".join(parts)


def write_leaderboard_csv(rows: list[dict], path: Path) -> None:
    """Every model's leaderboard rows in one CSV, over the union of the models' task groups."""
    sections = leaderboard(rows)
    groups = [dict(g) for g in {g["key"]: g for s in sections for g in s["groups"]}.values()]
    labels = [g["label"] for g in groups]
    for g in groups:  # two models ran the same task and shots under different limits
        if labels.count(g["label"]) > 1:
            g["label"] += f" (limit {g['limit']})"
    render_csv(leaderboard_columns(groups, with_model=True), [r for s in sections for r in s["rows"]], path)


# --- Plots (report_plots.py) ---------------------------------------------------------------------


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Accuracy against layers saved, one panel per (model, task)."""
    from adainfer_lmeval.reporting.plots import plot_tradeoff as plot

    plot(rows, path)


def plot_exit_layers(rows: list[dict], path: Path) -> None:
    """Where requests exit, one panel per (model, task), one line per policy."""
    from adainfer_lmeval.reporting.plots import plot_exit_layers as plot

    plot(rows, path)


def write_report(rows: list[dict], out: Path, title: str = "adainfer-lmeval report", preamble: str = "") -> dict:
    """report.md, report.csv (every run), leaderboard.csv, report.json, report.html (self-contained)
    and the plots, into ``out``. ``preamble`` is Markdown written by the caller (not escaped)."""
    from adainfer_lmeval.reporting.html import write_html

    out.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(rows, out / "accuracy_vs_layers_saved.png")
    plot_exit_layers(rows, out / "exit_layers.png")
    write_csv(rows, out / "report.csv")
    write_leaderboard_csv(rows, out / "leaderboard.csv")
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    md = [f"# {md_escape(title)}", preamble, "## Leaderboard", leaderboard_markdown(rows),
          "## Plots", "![accuracy vs layers saved](accuracy_vs_layers_saved.png)", "![exit layers](exit_layers.png)",
          "## All runs", "Every early-exit run beside its full-depth run (Δ with its standard error), then the "
          "macro-averages over each policy's tasks.", markdown_table(rows)]
    (out / "report.md").write_text("\n\n".join(p for p in md if p) + "\n")
    write_html(rows, out / "report.html", title, preamble,
               [out / "accuracy_vs_layers_saved.png", out / "exit_layers.png"])
    return {"markdown": out / "report.md", "csv": out / "report.csv", "leaderboard_csv": out / "leaderboard.csv",
            "html": out / "report.html"}


def runs_preamble(runs: list[dict], sources: list[str]) -> str:
    """Where the runs came from: their folders, dates and the package versions they record."""
    dates = sorted(str(r["date"]) for r in runs if r.get("date"))
    versions: dict[str, list[str]] = {}
    for r in runs:
        for k, v in (r.get("versions") or {}).items():
            versions.setdefault(k, [])
            if str(v) not in versions[k]:
                versions[k].append(str(v))
    plain = lambda path: str(path).replace("`", "")  # noqa: E731  (inside a code span)
    folders = ", ".join(f"`{plain(s)}`" for s in sources)
    text = ""
    for source in map(Path, sources):  # a suite's output folder: name the command that fills it
        suite = source.parent / "suite.yaml"
        if source.name == "runs" and suite.is_file():
            text += (f"Suite `{plain(suite)}`: `adainfer-eval suite {plain(suite)} --output_path {plain(source.parent)}` "
                     "runs what is missing and renders this report. ")
    text += f"Rendered by `adainfer-eval report` from {len(runs)} run files ({folders})"
    if dates:
        span = f"between {dates[0]} and {dates[-1]}" if dates[0] != dates[-1] else dates[0]
        text += f", run {md_escape(span)}"
    text += "."
    if versions:
        text += " Versions: " + md_escape(", ".join(f"{k} {' / '.join(v)}" for k, v in versions.items())) + "."
    return text


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="adainfer-eval report", description="Report early exit beside full depth.")
    parser.add_argument("runs", nargs="+", help="run files or folders holding them (adainfer-eval suite output)")
    parser.add_argument("--output_path", default="out/report")
    parser.add_argument("--title", default="adainfer-lmeval report")
    parser.add_argument("--preamble", default="",
                        help="Markdown under the title, before the line naming the runs' folders, dates and versions")
    a = parser.parse_args(argv)
    runs = load_runs(a.runs)
    rows = compare_rows(runs)
    preamble = " ".join(p for p in (a.preamble.strip(), runs_preamble(runs, a.runs)) if p)
    written = write_report(rows, Path(a.output_path), title=a.title, preamble=preamble)
    print(leaderboard_markdown(rows))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
