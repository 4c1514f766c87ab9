"""The report's column table and its renderers: one list of :class:`Column` drives the Markdown,
CSV and HTML forms of a table (the long per-run table and each model's leaderboard), so adding a
column is one place. It renders rows built elsewhere (:mod:`.comparison`, :mod:`.leaderboard`)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from adainfer_lmeval.reporting.leaderboard import WITHIN_POINTS

# --- The column table: Markdown, CSV and HTML all render from lists of these ---------------------


@dataclass(frozen=True)
class Column:
    """One report column. ``text`` is the cell as shown; ``value`` what the HTML page sorts by
    (default: the text); ``muted`` greys a cell (HTML) or daggers it (Markdown): its task is at
    chance. ``group`` (a task) spans its columns in HTML and prefixes the header elsewhere;
    ``where`` names the outputs that show the column."""

    key: str
    header: str
    text: Callable[[dict], str]
    value: Callable[[dict], Any] | None = None
    group: str = ""
    numeric: bool = True
    muted: Callable[[dict], bool] | None = None
    where: frozenset = frozenset({"md", "csv", "html"})

    def flat_header(self) -> str:
        return f"{self.group} {self.header}" if self.group else self.header

    def sort_value(self, row: dict) -> Any:
        return self.value(row) if self.value is not None else self.text(row)

    def is_muted(self, row: dict) -> bool:
        return bool(self.muted and self.muted(row))


def _pct(v: float | None) -> str:
    return f"{100 * v:.1f}" if v is not None else "-"


def _shots(r: dict) -> str:
    if r["task"] == "macro-average":
        return ""
    return "default" if r.get("num_fewshot") is None else str(r["num_fewshot"])


def _delta_text(r: dict) -> str:
    return f"{100 * r['delta']:+.1f}" + (f" ± {100 * r['delta_stderr']:.1f}" if r.get("delta_stderr") is not None else "")


def _scaled(key: str, scale: float = 100.0) -> Callable[[dict], float | None]:
    return lambda r: None if r.get(key) is None else scale * r[key]


# The long table: one row per early-exit run beside its baseline, then the macro-averages.
RUN_COLUMNS = [
    Column("model", "model", lambda r: r["model"], numeric=False),
    Column("task", "task", lambda r: r["task"], numeric=False),
    Column("shots", "shots", _shots),
    Column("policy", "policy", lambda r: r["policy"], numeric=False),
    Column("docs", "docs", lambda r: str(r["documents"]), lambda r: r["documents"]),
    Column("metric", "metric", lambda r: r["metric"], numeric=False),
    Column("chance", "chance %", lambda r: _pct(r["chance"]), _scaled("chance")),
    Column("full", "full %", lambda r: _pct(r["full"]), _scaled("full")),
    Column("early_exit", "early exit %", lambda r: _pct(r["early_exit"]), _scaled("early_exit")),
    Column("delta", "Δ points", _delta_text, _scaled("delta")),
    Column("layers", "layers used", lambda r: f"{r['mean_layers']:.1f}/{r['num_layers']}", lambda r: r["mean_layers"]),
    Column("saved", "layers saved %", lambda r: f"{r['layers_saved_pct']:.1f}", lambda r: r["layers_saved_pct"]),
    Column("flops", "FLOPs saved %", lambda r: f"{r['flops_saved_pct']:.1f}", lambda r: r["flops_saved_pct"]),
    Column("ms_full", "ms/req full", lambda r: f"{r['ms_per_request_full']:.1f}", lambda r: r["ms_per_request_full"]),
    Column("ms_exit", "ms/req exit",
           lambda r: f"{r['ms_per_request_early_exit']:.1f}" if r["ms_per_request_early_exit"] is not None else "(hindsight)",
           lambda r: r["ms_per_request_early_exit"]),
    Column("speedup", "speedup", lambda r: f"{r['speedup']:.2f}x" if r["speedup"] else "-", lambda r: r["speedup"]),
    Column("note", "note", lambda r: "AT CHANCE: saving proves nothing" if r["at_chance"] else "", numeric=False,
           muted=lambda r: r["at_chance"]),
]


def _rank_text(row: dict) -> str:
    if row["kind"] == "reference":
        return "ref"
    if row["kind"] == "bound":
        return "bound"
    if row["rank"] is None:
        return "-"
    return ("★ " if row["best"] else "") + str(row["rank"])


def _percent_field(pick: Callable[[dict], dict | None], field: str, fmt: str) -> tuple[Callable, Callable]:
    """(text, sort value) of ``field`` in the dict ``pick(row)`` gives (a task cell or the macro);
    accuracy and Δ are fractions there, shown as percent / points."""
    def value(row: dict):
        source = pick(row)
        if source is None:
            return None
        return 100 * source[field] if field in ("acc", "delta") else source[field]

    def text(row: dict) -> str:
        v = value(row)
        return "-" if v is None else format(v, fmt)

    return text, value


def _cell_field(gkey: str, field: str, fmt: str) -> tuple[Callable, Callable]:
    return _percent_field(lambda row: row["cells"].get(gkey), field, fmt)


def _macro_field(field: str, fmt: str) -> tuple[Callable, Callable]:
    return _percent_field(lambda row: row["macro"], field, fmt)


SHORT_METRIC = {"acc": "acc", "exact_match": "EM", "f1": "F1", "word_perplexity": "ppl"}  # headers stay narrow


def leaderboard_columns(groups: list[dict], with_model: bool = False) -> list[Column]:
    """The leaderboard's columns for these task groups (one model's, or all models' for the CSV)."""
    cols = [Column("model", "model", lambda r: r["model"], numeric=False)] if with_model else []
    cols += [
        Column("rank", "rank", _rank_text, lambda r: r["rank"]),
        Column("policy", "policy", lambda r: r["label"], lambda r: r["policy"], numeric=False),
        Column("within", f"within {WITHIN_POINTS:g} pt",
               lambda r: "" if r["kind"] != "ranked" else {True: "yes", False: "no", None: "-"}[r["within"]],
               lambda r: None if r["within"] is None else int(r["within"]), numeric=False),
    ]
    for g in groups:
        # Read off the row: a task can be at chance for one model and not for another (the CSV holds all models).
        chance = (lambda key: lambda r: bool((r["cells"].get(key) or {}).get("at_chance")))(g["key"])
        flag = (lambda key: lambda r: "" if key not in r["cells"] else "yes" if r["cells"][key]["at_chance"] else "no")(g["key"])
        score = SHORT_METRIC.get(g["metric"], g["metric"])
        for field, header, fmt in (("acc", f"{score} %", ".1f"), ("delta", "Δ pts", "+.1f"), ("saved", "saved %", ".1f")):
            text, value = _cell_field(g["key"], field, fmt)
            cols.append(Column(f"{g['key']}.{field}", header, text, value, group=g["label"], muted=chance))
        cols.append(Column(f"{g['key']}.at_chance", "at chance", flag,
                           group=g["label"], numeric=False, where=frozenset({"csv"})))
    macro = "macro"
    for field, header, fmt in (("delta", "Δ pts", "+.1f"), ("saved", "saved %", ".1f"), ("flops", "FLOPs saved %", ".1f")):
        text, value = _macro_field(field, fmt)
        cols.append(Column(f"macro.{field}", header, text, value, group=macro))
    return cols


LEGEND = (
    "Per model, one row per policy; per task, its accuracy, Δ points against full depth and % of layers saved. "
    "**macro**: the mean over the tasks where full depth is clearly above chance (more than 2 standard errors). "
    f"**rank**: rows whose macro Δ is within {WITHIN_POINTS:g} point of full depth first, by macro layers saved; "
    "then the rest, by macro Δ. **★** marks the best row: the most layers saved within "
    f"{WITHIN_POINTS:g} point (when any policy saves any). **†** (greyed in the HTML page): the task is at chance, "
    "a saving there proves nothing and counts in no macro. **oracle**: the earliest layer after which each answer "
    "never changes, found in hindsight: the bound on what a policy could save, not ranked. "
    "*All runs* below has every run with its standard error, FLOPs and timings."
)


_MD_SPECIAL = re.compile(r"([\\`*\[\]|#~])")
_MD_LONE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_escape(text) -> str:
    """Text embedded in Markdown (a cell, a heading) renders as itself: no table break (``|``,
    newlines), no code span, emphasis, link or raw HTML."""
    s = " ".join(str(text).split())  # newlines and tabs would end a table row
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return _MD_LONE_UNDERSCORE.sub(r"\\_", s)


def render_markdown_table(columns: list[Column], rows: list[dict]) -> str:
    """A GitHub-flavoured Markdown table; muted cells carry a dagger."""
    cols = [c for c in columns if "md" in c.where]
    header = [md_escape(c.flat_header()) for c in cols]
    body = [[md_escape(c.text(r)) + ("†" if c.is_muted(r) else "") for c in cols] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join(("-" * (w + 1) + ":") if c.numeric else ("-" * (w + 2)) for c, w in zip(cols, widths)) + "|"
    return "\n".join([line(header), rule] + [line(b) for b in body])


def render_csv(columns: list[Column], rows: list[dict], path: Path) -> None:
    cols = [c for c in columns if "csv" in c.where]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c.flat_header() for c in cols])
        writer.writerows([c.text(r) for c in cols] for r in rows)


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def task_summary(group: dict, mark: str = "") -> str:
    """One line per task: what full depth scores against chance, on how many documents; ``mark``
    follows the task's name when it is at chance."""
    s = (f"{group['label']}{mark if group['at_chance'] else ''}: full depth {_percent(group['full'])} {group['metric']} "
         f"on {group['documents']} documents, chance {_percent(group['chance'])}")
    return s + (" (AT CHANCE: its savings prove nothing)" if group["at_chance"] else "")


def verdict(section: dict) -> str:
    """The one sentence a reader wants from a model's table."""
    rows = section["rows"]
    oracle = next((r for r in rows if r["kind"] == "bound" and r["macro"]), None)
    bound = f" (the oracle's bound: {oracle['macro']['saved']:.1f}%)" if oracle else ""
    best = next((r for r in rows if r["best"]), None)
    if not any(not g["at_chance"] for g in section["groups"]):
        return "No task is above chance for this model: nothing is ranked."
    if best is None:
        return f"No policy saves any layers within {WITHIN_POINTS:g} point of full depth{bound}."
    m = best["macro"]
    return (f"Best within {WITHIN_POINTS:g} point: {best['label']}, {m['saved']:.1f}% of layers saved "
            f"at {100 * m['delta']:+.1f} points (macro){bound}.")
