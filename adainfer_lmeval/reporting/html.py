"""The report as one self-contained HTML page: inline CSS, inline JS (click a header to sort;
``#sort=KEY`` or ``#sort=KEY:asc`` in the URL sorts on load), plots embedded as data URIs, every
embedded string escaped. The page's script marks ``<body>`` with ``data-ready`` when it ran, and
``data-error`` when any script error happened (the browser test reads both)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from adainfer_lmeval.reporting.comparison import display_rows
from adainfer_lmeval.reporting.leaderboard import leaderboard
from adainfer_lmeval.reporting.tables import LEGEND, RUN_COLUMNS, Column, leaderboard_columns, task_summary, verdict

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif;color:#1d2430;margin:24px auto;
max-width:1500px;padding:0 20px;background:#fbfbfd}
h1{font-size:24px;margin:0 0 6px}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #dfe3ea;padding-bottom:4px}
h3{font-size:16px;margin:22px 0 4px}p.pre,p.legend{max-width:1100px;color:#444}p.legend{font-size:13px}
code{background:#eef1f5;padding:0 3px;border-radius:3px;font-size:12.5px}
ul.tasks{margin:4px 0 10px;padding-left:20px;font-size:13px;color:#333}ul.tasks li.chance{color:#999}
.wrap{overflow-x:auto}
table.board{border-collapse:separate;border-spacing:0;background:#fff;box-shadow:0 1px 3px rgba(0,0,0,.12);border-radius:6px;
font-size:13px;margin:6px 0 4px}
table.board th,table.board td{padding:5px 7px;border-bottom:1px solid #e8ebf0;white-space:nowrap}
table.board thead th{background:#2f3b52;color:#fff;font-weight:600;position:sticky;top:0}
table.board thead tr.groups th{background:#243046;font-size:12px;border-left:1px solid #46526a;text-align:center}
table.board thead tr.cols th[data-type=text]{text-align:left}
table.board thead tr.cols th{cursor:pointer;user-select:none;font-size:12px}
table.board thead tr.cols th:hover{background:#3d4c68}
table.board thead th[aria-sort=ascending]::after{content:" \\25B2"}table.board thead th[aria-sort=descending]::after{content:" \\25BC"}
table.board td.num{text-align:right;font-variant-numeric:tabular-nums}
table.board td.first{border-left:1px solid #e8ebf0}
table.board tbody.ranked tr:nth-child(even) td{background:#f7f8fb}
table.board tbody.ranked tr:hover td{background:#eef4ff}
table.board tbody.reference td{background:#f3f1e8;font-style:italic;color:#4a4a4a}
table.board tbody.reference tr:last-child td{border-bottom:2px solid #c9c3a8}
table.board tr.best td{background:#e3f4e5 !important;font-weight:600}
table.board td.muted{color:#a5a9b1 !important;background:#f1f1f1 !important;font-weight:400}
table.board td.pos{color:#1a7f37}table.board td.neg{color:#b42318}
table.board td.muted.pos,table.board td.muted.neg{color:#a5a9b1}
table.board td.policy{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;white-space:normal;min-width:220px;max-width:330px}
p.verdict{font-weight:600;margin:4px 0 14px}
img.plot{max-width:100%;background:#fff;border:1px solid #e1e4ea;border-radius:6px;margin:8px 0}
"""

# Sorts the rows of a table's tbody.sortable (reference rows stay on top); numbers compare as
# numbers, empty cells go last either way. Exposed as window.sortTable for the URL hash and tests.
JS = r"""
window.onerror = function (message) { document.body.setAttribute('data-error', String(message)); };
(function () {
  function key(td) {
    var v = td.getAttribute('data-v');
    if (v === null || v === '') return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function sortTable(table, col, dir) {
    var heads = table.querySelectorAll('thead tr.cols th');
    var index = -1, th = null;
    for (var i = 0; i < heads.length; i++) if (heads[i].getAttribute('data-col') === col) { index = i; th = heads[i]; }
    if (index < 0) return false;
    if (!dir) {
      var now = th.getAttribute('aria-sort');
      dir = now ? (now === 'descending' ? 'ascending' : 'descending') : (th.getAttribute('data-type') === 'text' ? 'ascending' : 'descending');
    }
    var sign = dir === 'ascending' ? 1 : -1;
    table.querySelectorAll('tbody.sortable').forEach(function (body) {
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a.cells[index]), y = key(b.cells[index]);
        if (x === null || y === null) return (x === null) - (y === null);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return sign * (x < y ? -1 : x > y ? 1 : 0);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
    heads.forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
    return true;
  }
  window.sortTable = sortTable;
  document.querySelectorAll('table.board').forEach(function (table) {
    table.querySelectorAll('thead tr.cols th').forEach(function (th) {
      th.addEventListener('click', function () { sortTable(table, th.getAttribute('data-col')); });
    });
  });
  var m = /^#sort=([^:&]+)(?::(asc|desc))?/.exec(decodeURIComponent(location.hash || ''));
  if (m) {
    var dir = m[2] ? (m[2] === 'asc' ? 'ascending' : 'descending') : null, hit = 0;
    document.querySelectorAll('table.board').forEach(function (t) { if (sortTable(t, m[1], dir)) hit++; });
    document.body.setAttribute('data-sorted', m[1] + ':' + hit);
  }
  document.body.setAttribute('data-ready', 'ok');
})();
"""

e = html.escape


def _inline_markdown(text: str) -> str:
    """A preamble's Markdown, escaped, with its code spans kept as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", e(text))


def _sort_attr(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(round(float(value), 6))
    return str(value)


def table_html(columns: list[Column], rows: list[dict], table_id: str, reference: list[dict] | None = None) -> str:
    """A sortable table; ``reference`` rows (full depth, the oracle) sit above the sorted body."""
    cols = [c for c in columns if "html" in c.where]
    out = [f'<div class="wrap"><table class="board" id="{e(table_id)}"><thead>']
    if any(c.group for c in cols):
        out.append('<tr class="groups">')
        i = 0
        while i < len(cols):
            j = i
            while j < len(cols) and cols[j].group == cols[i].group:
                j += 1
            out.append(f'<th colspan="{j - i}">{e(cols[i].group)}</th>')
            i = j
        out.append("</tr>")
    out.append('<tr class="cols">')
    for c in cols:
        out.append(f'<th data-col="{e(c.key)}" data-type="{"num" if c.numeric else "text"}" title="click to sort">{e(c.header)}</th>')
    out.append("</tr></thead>")

    def body(members: list[dict], cls: str) -> None:
        out.append(f'<tbody class="{cls}">')
        for r in members:
            attrs = f' data-model="{e(str(r.get("model", "")))}" data-policy="{e(str(r.get("policy", "")))}"'
            out.append(f'<tr class="{"best" if r.get("best") else ""}"{attrs}>')
            for k, c in enumerate(cols):
                text = c.text(r)
                classes = ["num" if c.numeric else "text"]
                if k > 0 and c.group and c.group != cols[k - 1].group:
                    classes.append("first")
                if c.is_muted(r):
                    classes.append("muted")
                if c.key.endswith(".delta") and text not in ("-", ""):
                    v = c.sort_value(r)
                    classes.append("pos" if v > 0.05 else "neg" if v < -0.05 else "")
                if c.key == "policy":
                    classes.append("policy")
                shown = e(text).replace(",", ",<wbr>") if c.key == "policy" else e(text)  # long policies wrap at commas
                out.append(f'<td class="{" ".join(x for x in classes if x)}" data-v="{e(_sort_attr(c.sort_value(r)))}">{shown}</td>')
            out.append("</tr>")
        out.append("</tbody>")

    if reference:
        body(reference, "reference")
    body(rows, "ranked sortable")
    out.append("</table></div>")
    return "".join(out)


def _embedded(png: Path) -> str:
    return (f'<img class="plot" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" '
            f'alt="{e(png.stem)}">')


def write_html(rows: list[dict], path: Path, title: str, preamble: str, plots: list[Path]) -> None:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if preamble:
        parts.append(f'<p class="pre">{_inline_markdown(preamble)}</p>')
    parts.append("<h2>Leaderboard</h2>")
    parts.append(f'<p class="legend">{_inline_markdown(LEGEND.replace("**", "").replace("*", ""))}</p>')
    for n, section in enumerate(leaderboard(rows)):
        parts.append(f"<h3>{e(section['model'])} <small>({section['num_layers']} layers)</small></h3>")
        parts.append('<ul class="tasks">' + "".join(
            f'<li class="{"chance" if g["at_chance"] else ""}">{e(task_summary(g))}</li>' for g in section["groups"]) + "</ul>")
        reference = [r for r in section["rows"] if r["kind"] != "ranked"]
        ranked = [r for r in section["rows"] if r["kind"] == "ranked"]
        parts.append(table_html(leaderboard_columns(section["groups"]), ranked, f"board-{n}", reference))
        parts.append(f'<p class="verdict">{e(verdict(section))}</p>')
    parts.append("<h2>Plots</h2>" + "".join(_embedded(p) for p in plots))
    parts.append("<h2>All runs</h2><p class='legend'>Every early-exit run beside its full-depth run (Δ with its "
                 "standard error), then the macro-averages over each policy's tasks.</p>")
    parts.append(table_html(RUN_COLUMNS, display_rows(rows), "all-runs"))
    parts.append(f"<script>{JS}</script></body></html>")
    path.write_text("".join(parts))
