"""The HTML report in a real headless browser (Chromium, from the Debian packages: scripts/setup_browser.sh).

The page's script marks ``<body>`` with ``data-ready`` when it ran and ``data-error`` on any
script error; ``--dump-dom`` gives the DOM after the scripts ran. Without Chromium the tests skip,
except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from adainfer_lmeval.reporting.comparison import compare_rows, load_runs
from adainfer_lmeval.reporting.leaderboard import leaderboard
from adainfer_lmeval.reporting.report import write_report
from test_report_leaderboard import copy_runs

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    found = os.environ.get("ADAINFER_CHROMIUM") or next((b for b in map(shutil.which, BROWSERS) if b), None)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("no Chromium found under CI: scripts/setup_browser.sh installs it (apt-get install chromium)")
    pytest.skip("no Chromium found (install it with scripts/setup_browser.sh); CI runs this test")


def dump_dom(page: Path, fragment: str = "") -> str:
    browser = find_browser()
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
         f"--user-data-dir={page.parent / '.chromium'}", "--virtual-time-budget=5000", "--dump-dom",
         page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<body" in done.stdout, done.stderr[-2000:]
    return done.stdout


class Page(HTMLParser):
    """The body's attributes and, per table id, its rows: (tbody class, tr attributes, cell texts and data-v)."""

    def __init__(self, text: str):
        super().__init__()
        self.body: dict = {}
        self.tables: dict[str, list[dict]] = {}
        self._table = self._tbody = None
        self._row: dict | None = None
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._tbody = a.get("class", "")
        elif tag == "tr" and self._tbody is not None:
            self._row = {"tbody": self._tbody, **a, "cells": [], "values": []}
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._row["values"].append(a.get("data-v", ""))

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row["cells"].append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._tbody = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser")
    rows = compare_rows(load_runs([copy_runs(out / "runs")]))
    write_report(rows, out / "report", title="browser test")
    return out / "report" / "report.html", rows


def test_page_loads_without_errors_and_holds_the_report_rows(report):
    page, rows = report
    dom = Page(dump_dom(page))
    assert dom.body.get("data-ready") == "ok", dom.body
    assert "data-error" not in dom.body, dom.body["data-error"]
    sections = leaderboard(rows)
    assert len(sections) == 2
    for n, section in enumerate(sections):
        shown = dom.tables[f"board-{n}"]
        assert [(r["data-model"], r["data-policy"]) for r in shown] == [(section["model"], r["policy"]) for r in section["rows"]]
        assert [r["cells"][1] for r in shown] == [r["label"] for r in section["rows"]]
    # the Markdown leaderboard has the same rows
    md = (page.parent / "report.md").read_text().split("## Leaderboard", 1)[1].split("## Plots", 1)[0]
    md_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(md_rows) == sum(len(t) for k, t in dom.tables.items() if k.startswith("board-"))
    # and the all-runs table every run of report.json (with its macro-averages)
    runs = [r for r in rows if r["policy"] != "full"]
    assert len([r for r in dom.tables["all-runs"] if r["cells"][1] != "macro-average"]) == len(runs)


def _ranked(dom: Page, table: str) -> list[dict]:
    return [r for r in dom.tables[table] if "sortable" in r["tbody"]]


def _number(v: str) -> float:
    return float(v) if v else float("-inf")


def test_sorting_from_the_url_reorders_the_rows(report):
    page, _ = report
    before = Page(dump_dom(page))
    by_saving = Page(dump_dom(page, "#sort=macro.saved:desc"))
    assert by_saving.body.get("data-ready") == "ok" and "data-error" not in by_saving.body
    assert by_saving.body.get("data-sorted") == "macro.saved:2"  # both model tables have the column
    for table in ("board-0", "board-1"):
        names = [r["data-policy"] for r in _ranked(before, table)]
        shown = _ranked(by_saving, table)
        assert sorted(r["data-policy"] for r in shown) == sorted(names)  # same rows, reordered
        saved = [_number(r["values"][-2]) for r in shown]  # the last columns: macro Δ, saved, FLOPs
        assert saved == sorted(saved, reverse=True)
        # reference rows (full depth, the oracle) stay on top, unsorted
        assert [r["data-policy"] for r in by_saving.tables[table] if r["tbody"] == "reference"] == ["full", "oracle"]
    # the default order (by rank) is not the saving order on the Qwen table: the sort did something
    assert [r["data-policy"] for r in _ranked(before, "board-0")] != [r["data-policy"] for r in _ranked(by_saving, "board-0")]
    by_name = Page(dump_dom(page, "#sort=policy:asc"))
    for table in ("board-0", "board-1", "all-runs"):
        names = [r["data-policy"] for r in _ranked(by_name, table)]
        assert names == sorted(names)


def test_a_script_error_is_caught(report, tmp_path):
    """The error marker works: the same page with a throwing script reports it."""
    page, _ = report
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<script>undefinedFunction();</script></body>"))
    dom = Page(dump_dom(broken))
    assert "undefinedFunction" in dom.body.get("data-error", "")


def test_screenshot_renders(report, tmp_path):
    page, _ = report
    shot = tmp_path / "page.png"
    done = subprocess.run(
        [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / '.c'}",
         f"--screenshot={shot}", "--window-size=1400,1000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-2000:]


def test_clicking_a_header_sorts(report, tmp_path):
    """A real click event on a header (dispatched after the page's script ran): numbers sort
    descending first, a second click ascending."""
    page, _ = report
    for clicks, reverse in ((1, True), (2, False)):
        clicked = tmp_path / f"clicked{clicks}.html"
        click = "document.querySelector('#board-0 thead tr.cols th[data-col=\"macro.saved\"]').click();" * clicks
        clicked.write_text(page.read_text().replace("</body>", f"<script>{click}</script></body>"))
        dom = Page(dump_dom(clicked))
        assert "data-error" not in dom.body, dom.body.get("data-error")
        saved = [_number(r["values"][-2]) for r in _ranked(dom, "board-0")]
        assert saved == sorted(saved, reverse=reverse) and len(set(saved)) > 1
