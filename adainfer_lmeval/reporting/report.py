"""The report files: early exit beside the full-depth baseline, per task, as Markdown, CSV, JSON,
a self-contained HTML page and plots, and the ``adainfer-eval report`` command that writes them.

The rows come from :mod:`.comparison` and :mod:`.leaderboard`; one column table (:mod:`.tables`)
drives the Markdown, CSV and HTML (:mod:`.html`) forms.
"""

from __future__ import annotations

import json
from pathlib import Path

from adainfer_lmeval.reporting.comparison import compare_rows, display_rows, load_runs
from adainfer_lmeval.reporting.html import write_html
from adainfer_lmeval.reporting.leaderboard import label_limits, leaderboard
from adainfer_lmeval.reporting.plots import plot_exit_layers, plot_tradeoff
from adainfer_lmeval.reporting.tables import (
    LEGEND, RUN_COLUMNS, leaderboard_columns, md_escape, render_csv, render_markdown_table, task_summary, verdict,
)


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
    # two models may have run the same task and shots under different limits
    groups = label_limits([dict(g) for g in {g["key"]: g for s in sections for g in s["groups"]}.values()])
    render_csv(leaderboard_columns(groups, with_model=True), [r for s in sections for r in s["rows"]], path)


def write_report(rows: list[dict], out: Path, title: str = "adainfer-lmeval report", preamble: str = "") -> dict:
    """report.md, report.csv (every run), leaderboard.csv, report.json, report.html (self-contained)
    and the plots, into ``out``. ``preamble`` is Markdown written by the caller (not escaped)."""
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
