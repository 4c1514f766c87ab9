"""Reports: early exit beside the full-depth baseline, per task, as Markdown, CSV, HTML and plots.

Input is run files (see :mod:`.suite`): each holds lm-eval's results, the ``adainfer``
statistics and compact samples of one (model, task, policy) run. Each early-exit run is paired
with the full-depth run of the same model, task, shots and limit; a run without its baseline is
refused. A task where the full-depth model is not clearly above chance (less than two standard
errors) is flagged: a saving there proves nothing.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

from .errors import AdaInferError

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
    at_chance = chance is not None and full_se is not None and full_value - chance <= 2 * full_se
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
        "at_chance": at_chance,
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


HEADERS = ["model", "task", "shots", "policy", "docs", "metric", "chance %", "full %", "early exit %", "Δ points",
           "layers used", "layers saved %", "FLOPs saved %", "ms/req full", "ms/req exit", "speedup", "note"]


def _cells(r: dict) -> list:
    pct = lambda v: f"{100 * v:.1f}" if v is not None else "-"  # noqa: E731
    delta = f"{100 * r['delta']:+.1f}" + (f" ± {100 * r['delta_stderr']:.1f}" if r.get("delta_stderr") is not None else "")
    note = "AT CHANCE: saving proves nothing" if r["at_chance"] else ""
    shots = "default" if r.get("num_fewshot") is None else r["num_fewshot"]
    return [r["model"], r["task"], shots if r["task"] != "macro-average" else "", r["policy"], r["documents"], r["metric"], pct(r["chance"]), pct(r["full"]),
            pct(r["early_exit"]), delta, f"{r['mean_layers']:.1f}/{r['num_layers']}", f"{r['layers_saved_pct']:.1f}",
            f"{r['flops_saved_pct']:.1f}", f"{r['ms_per_request_full']:.1f}",
            f"{r['ms_per_request_early_exit']:.1f}" if r["ms_per_request_early_exit"] is not None else "(hindsight)",
            f"{r['speedup']:.2f}x" if r["speedup"] else "-", note]


def display_rows(rows: list[dict]) -> list[dict]:
    """What every table shows: the early-exit rows (each carries its baseline), then macro-averages."""
    early = [r for r in rows if r["policy"] != FULL]
    return early + macro_average(early)


def markdown_table(rows: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate([_cells(r) for r in display_rows(rows)], headers=HEADERS, tablefmt="github")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADERS)
        writer.writerows(_cells(r) for r in display_rows(rows))


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Accuracy against layers saved, per task: the full-depth point, each policy, threshold sweeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    early = [r for r in rows if r["policy"] != FULL]
    tasks = sorted({(r["model"], r["task"], r.get("num_fewshot")) for r in early}, key=str)
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, (model, task, shots) in zip(axes[0], tasks):
        members = [r for r in early if (r["model"], r["task"], r.get("num_fewshot")) == (model, task, shots)]
        ax.scatter([0], [100 * members[0]["full"]], marker="*", s=150, color="black", label="full depth", zorder=3)
        sweeps: dict[str, list[dict]] = {}
        for r in members:
            family = r["policy"].split(",")[0]
            sweeps.setdefault(family, []).append(r)
        for family, points in sweeps.items():
            points.sort(key=lambda r: r["layers_saved_pct"])
            xs = [r["layers_saved_pct"] for r in points]
            ys = [100 * r["early_exit"] for r in points]
            ax.plot(xs, ys, marker="D" if family == "oracle" else "o", label=family if len(points) == 1 else f"{family} sweep")
        if members[0]["chance"] is not None:
            ax.axhline(100 * members[0]["chance"], color="grey", linestyle=":", label="chance")
        label = f"{model} / {task}" + (f" / {shots}-shot" if shots is not None else "")
        ax.set_title(label + (" (AT CHANCE)" if members[0]["at_chance"] else ""), fontsize=9)
        ax.set_xlabel("layers saved (%)")
        ax.set_ylabel(f"{members[0]['metric']} (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_exit_layers(rows: list[dict], path: Path) -> None:
    """Where requests exit, per task and policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    early = [r for r in rows if r["policy"] != FULL and r.get("exit_layer_histogram")]
    fig, axes = plt.subplots(len(early) or 1, 1, figsize=(7, 2.2 * max(len(early), 1)), squeeze=False)
    for ax, r in zip(axes[:, 0], early):
        layers = [float(k) for k in r["exit_layer_histogram"]]
        ax.bar(layers, list(r["exit_layer_histogram"].values()), width=0.8)
        ax.set_xlim(0, r["num_layers"] + 1)
        shots = "" if r.get("num_fewshot") is None else f" / {r['num_fewshot']}-shot"
        ax.set_title(f"{r['model']} / {r['task']}{shots} / {r['policy']}", fontsize=8)
        ax.set_ylabel("requests", fontsize=8)
    axes[-1, 0].set_xlabel("exit layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _embedded(png: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" alt="{png.stem}">'


def write_report(rows: list[dict], out: Path, title: str = "adainfer-lmeval report", preamble: str = "") -> dict:
    """report.md, report.csv, report.html (self-contained) and the plots, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    plot_tradeoff(rows, out / "accuracy_vs_layers_saved.png")
    plot_exit_layers(rows, out / "exit_layers.png")
    write_csv(rows, out / "report.csv")
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    md = f"# {title}\n\n{preamble}\n\n{table}\n\n![accuracy vs layers saved](accuracy_vs_layers_saved.png)\n\n![exit layers](exit_layers.png)\n"
    (out / "report.md").write_text(md)
    buffer = io.StringIO()
    buffer.write(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>")
    buffer.write("<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style>")
    buffer.write(f"<h1>{html.escape(title)}</h1><p>{html.escape(preamble)}</p><table><tr>")
    buffer.write("".join(f"<th>{html.escape(h)}</th>" for h in HEADERS) + "</tr>")
    for r in display_rows(rows):
        buffer.write("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in _cells(r)) + "</tr>")
    buffer.write("</table>")
    buffer.write(_embedded(out / "accuracy_vs_layers_saved.png") + _embedded(out / "exit_layers.png"))
    (out / "report.html").write_text(buffer.getvalue())
    return {"markdown": out / "report.md", "csv": out / "report.csv", "html": out / "report.html"}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="adainfer-eval report", description="Report early exit beside full depth.")
    parser.add_argument("runs", nargs="+", help="run files or folders holding them (adainfer-eval suite output)")
    parser.add_argument("--output_path", default="out/report")
    a = parser.parse_args(argv)
    rows = compare_rows(load_runs(a.runs))
    written = write_report(rows, Path(a.output_path))
    print(markdown_table(rows))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
