"""The leaderboard tables and the report's escaping, from copies of committed run files (no model)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from adainfer_lmeval.reporting.comparison import FULL, compare_rows, load_runs
from adainfer_lmeval.reporting.leaderboard import leaderboard
from adainfer_lmeval.reporting.report import write_report

RUNS = Path(__file__).resolve().parent.parent / "reports" / "leaderboard" / "runs"
PICK = {
    "qwen2.5_coder_0.5b/sst2-4shot-limit60": ["full", "oracle", "svm", "threshold_gap_0.6_min_layer_22",
                                             "threshold_gap_0.3_min_layer_22"],
    "qwen2.5_coder_0.5b/mmlu-0shot-limit1": ["full", "svm", "threshold_gap_0.6_min_layer_22", "threshold_gap_0.3_min_layer_22"],
    "smollm2_135m/sst2-0shot-limit100": ["full", "oracle", "crf", "threshold_gap_0.3_min_layer_20"],
}
EVIL_POLICY = "threshold,gap=0.6|x<script>alert(1)</script>\n`tick` *star* _u_ [l](u) $m$ & #"
EVIL_TASK = "sst2|<b>bold</b>\nnext"


def copy_runs(dest: Path) -> Path:
    for folder, names in PICK.items():
        (dest / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(RUNS / folder / f"{name}.json", dest / folder / f"{name}.json")
    return dest


def _rename_task(run: dict, old: str, new: str) -> None:
    run["settings"]["task"] = new
    for part in (run["results"], run["samples"], run["adainfer"]["tasks"]):
        part[new] = part.pop(old)


def evil_runs(dest: Path) -> Path:
    """The copied runs plus a pair whose policy and task names hold Markdown and HTML syntax."""
    copy_runs(dest)
    src = RUNS / "qwen2.5_coder_0.5b/sst2-4shot-limit60"
    (dest / "evil").mkdir()
    for name, policy in (("full", FULL), ("threshold_gap_0.6_min_layer_22", EVIL_POLICY)):
        run = json.loads((src / f"{name}.json").read_text())
        run["settings"]["policy"] = policy
        _rename_task(run, "sst2", EVIL_TASK)
        (dest / "evil" / f"{name}.json").write_text(json.dumps(run))
    return dest


def test_one_row_per_policy_ranked_by_savings_within_one_point(tmp_path):
    rows = compare_rows(load_runs([copy_runs(tmp_path / "runs")]))
    sections = {s["model"]: s for s in leaderboard(rows)}
    assert set(sections) == {"qwen2.5-coder-0.5b", "smollm2-135m"}
    qwen = sections["qwen2.5-coder-0.5b"]
    # mmlu is at chance for this model: its columns come last and it counts in no macro.
    assert [(g["task"], g["at_chance"]) for g in qwen["groups"]] == [("sst2", False), ("mmlu", True)]
    kinds = [(r["kind"], r["policy"]) for r in qwen["rows"]]
    assert kinds[:2] == [("reference", FULL), ("bound", "oracle")]
    ranked = [r for r in qwen["rows"] if r["kind"] == "ranked"]
    assert sorted(r["policy"] for r in ranked) == sorted({r["policy"] for r in rows if r["model"] == "qwen2.5-coder-0.5b"} - {FULL, "oracle"})
    by_policy = {r["policy"]: r for r in rows if r["model"] == "qwen2.5-coder-0.5b" and r["task"] == "sst2"}
    for r in ranked:  # the macro is the sst2 figure alone
        assert r["macro"]["saved"] == pytest.approx(by_policy[r["policy"]]["layers_saved_pct"])
        assert r["macro"]["delta"] == pytest.approx(by_policy[r["policy"]]["delta"])
        assert r["within"] == (100 * r["macro"]["delta"] >= -1.0)
    # within 1 point first (by saving), then the rest by Δ
    keep = [r for r in ranked if r["within"]]
    assert ranked[:len(keep)] == keep
    assert [r["macro"]["saved"] for r in keep] == sorted((r["macro"]["saved"] for r in keep), reverse=True)
    rest = ranked[len(keep):]
    assert [r["macro"]["delta"] for r in rest] == sorted((r["macro"]["delta"] for r in rest), reverse=True)
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    # the shipped SVM keeps accuracy but saves nothing: no row is "best"
    assert not any(r["best"] for r in qwen["rows"])


def test_best_row_is_the_largest_saving_within_one_point(tmp_path):
    rows = compare_rows(load_runs([copy_runs(tmp_path / "runs")]))
    for r in rows:  # pretend the gap=0.6 threshold lost nothing on sst2
        if r["policy"] == "threshold,gap=0.6,min_layer=22" and r["task"] == "sst2":
            r["early_exit"], r["delta"] = r["full"], 0.0
    qwen = next(s for s in leaderboard(rows) if s["model"] == "qwen2.5-coder-0.5b")
    best = [r for r in qwen["rows"] if r["best"]]
    assert [r["policy"] for r in best] == ["threshold,gap=0.6,min_layer=22"] and best[0]["rank"] == 1


def test_leaderboard_markdown_csv_and_json_agree(tmp_path):
    rows = compare_rows(load_runs([copy_runs(tmp_path / "runs")]))
    written = write_report(rows, tmp_path / "report")
    board = list(csv.DictReader(written["leaderboard_csv"].open()))
    sections = leaderboard(rows)
    assert [(b["model"], b["policy"]) for b in board] == [(s["model"], r["label"]) for s in sections for r in s["rows"]]
    # every (model, policy) of report.json, plus each model's full depth, is one leaderboard row
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert sorted((b["model"], b["policy"]) for b in board if b["rank"] not in ("ref", "bound")) == sorted(
        {(r["model"], r["policy"]) for r in saved if r["policy"] not in (FULL, "oracle")})
    md = (tmp_path / "report" / "report.md").read_text()
    board_md = md.split("## Leaderboard", 1)[1].split("## Plots", 1)[0]
    md_rows = [line for line in board_md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(md_rows) == len(board)
    # at-chance cells are daggered in Markdown (the mmlu columns), and only those
    qwen_md = board_md.split("### qwen2.5-coder-0.5b", 1)[1].split("###", 1)[0]
    header = next(line for line in qwen_md.splitlines() if line.startswith("| rank"))
    names = [c.strip() for c in header.strip("|").split("|")]
    for line in (x for x in qwen_md.splitlines() if x.startswith("| ") and x is not header and not x.startswith("| rank")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name, cell in zip(names, cells):
            assert cell.endswith("†") == (name.startswith("mmlu") and cell != "-"), (name, cell)
    # the long per-run table is still there, unchanged in shape
    assert "## All runs" in md and len(list(csv.DictReader(written["csv"].open()))) > len(board)


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_report_md_escapes_policy_and_task_names(tmp_path):
    rows = compare_rows(load_runs([evil_runs(tmp_path / "runs")]))
    written = write_report(rows, tmp_path / "report")
    md = written["markdown"].read_text()
    assert "<script>" not in md and "<b>" not in md
    # every table line has its header's number of column separators: no name breaks a row
    tables: list[list[str]] = [[]]
    for line in md.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    for table in (t for t in tables if t):
        assert {_unescaped_pipes(line) for line in table} == {_unescaped_pipes(table[0])}
    # its leaderboard row, its all-runs row and its macro-average row, each one line
    assert sum("alert(1)" in line for line in md.splitlines()) == 3
    # rendered by a CommonMark/GFM parser: no element from the names, the name reads as itself
    markdown_it = pytest.importorskip("markdown_it")
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(md)
    for made in ("<script>", "<b>", "<em>star", "<em>u", "<code>tick", '<a href="u"', "\\(", "\\$"):
        assert made not in rendered, made
    assert "threshold,gap=0.6|x&lt;script&gt;alert(1)&lt;/script&gt; `tick` *star* _u_ [l](u) $m$ &amp; #" in rendered
    # HTML: only the page's own script; CSV: the names round-trip exactly
    page = written["html"].read_text()
    assert page.count("<script") == 1 and "<b>bold" not in page and "alert(1)&lt;/script&gt;" in page
    board = list(csv.DictReader(written["leaderboard_csv"].open()))
    assert EVIL_POLICY in {b["policy"] for b in board}
    assert any(EVIL_TASK in name for name in board[0])


def _png_size(path: Path) -> tuple[int, int]:
    import struct

    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_any_number_of_models_and_a_task_at_chance_for_one_only(tmp_path):
    import copy

    rows = compare_rows(load_runs([copy_runs(tmp_path / "runs")]))
    bigger = copy.deepcopy([r for r in rows if r["model"] == "qwen2.5-coder-0.5b"])
    for r in bigger:  # a third model on which mmlu is above chance
        r["model"] = "qwen2.5-coder-1.5b"
        if r["task"] == "mmlu":
            r["at_chance"] = False
    rows += bigger
    written = write_report(rows, tmp_path / "report")
    sections = {s["model"]: s for s in leaderboard(rows)}
    assert len(sections) == 3
    # the 1.5B macro counts mmlu, the 0.5B macro does not
    svm_big = next(r for r in sections["qwen2.5-coder-1.5b"]["rows"] if r["policy"] == "svm")
    svm_small = next(r for r in sections["qwen2.5-coder-0.5b"]["rows"] if r["policy"] == "svm")
    assert svm_big["macro"]["tasks"] == 2 and svm_small["macro"]["tasks"] == 1
    board = list(csv.DictReader(written["leaderboard_csv"].open()))
    flags = {(b["model"], b["mmlu 0-shot acc %"] != "-", b["mmlu 0-shot at chance"]) for b in board}
    # the copied runs have no mmlu oracle, and SmolLM2 no mmlu at all: those cells are empty
    assert flags == {("qwen2.5-coder-0.5b", True, "yes"), ("qwen2.5-coder-1.5b", True, "no"), ("qwen2.5-coder-0.5b", False, ""),
                     ("qwen2.5-coder-1.5b", False, ""), ("smollm2-135m", False, "")}
    # 5 panels (2 + 2 Qwen tasks, 1 SmolLM2): a grid of at most 3 columns (5.4 in each at 100 dpi), two rows
    for plot in ("accuracy_vs_layers_saved.png", "exit_layers.png"):
        width, height = _png_size(tmp_path / "report" / plot)
        assert width <= 3 * 540 + 100 and height >= 2 * 400, (plot, width, height)


def _with_settings(folder: Path, **settings) -> None:
    for f in folder.glob("*.json"):
        run = json.loads(f.read_text())
        run["settings"].update(settings)
        f.write_text(json.dumps(run))


def test_a_task_under_two_limits_is_told_apart_by_its_limit(tmp_path):
    runs = copy_runs(tmp_path / "runs")
    smol = runs / "smollm2_135m"
    # SmolLM2 runs sst2 0-shot under limits 100 and 50 (a copy of its runs, relabelled)
    shutil.copytree(smol / "sst2-0shot-limit100", smol / "sst2-0shot-limit50")
    _with_settings(smol / "sst2-0shot-limit50", limit=50)
    # and its 100-document runs are relabelled 4-shot: Qwen ran sst2 4-shot under limit 60
    _with_settings(smol / "sst2-0shot-limit100", num_fewshot=4)
    rows = compare_rows(load_runs([runs]))
    sections = {s["model"]: s for s in leaderboard(rows)}
    assert sorted(g["label"] for g in sections["smollm2-135m"]["groups"]) == ["sst2 0-shot", "sst2 4-shot"]
    assert [g["label"] for g in sections["qwen2.5-coder-0.5b"]["groups"]] == ["sst2 4-shot", "mmlu 0-shot"]
    written = write_report(rows, tmp_path / "report")
    header = next(csv.reader(written["leaderboard_csv"].open()))
    # one CSV over both models: the two "sst2 4-shot" groups carry their limits
    assert {h.split(" acc %")[0] for h in header if h.endswith(" acc %")} == {
        "sst2 4-shot (limit 60)", "sst2 4-shot (limit 100)", "sst2 0-shot", "mmlu 0-shot"}
    one = [{**r, "model": "one"} for r in rows if r["model"] == "smollm2-135m"]
    for r in one:  # one model, the same task and shots under two limits
        r["num_fewshot"] = 0
    assert sorted(g["label"] for g in leaderboard(one)[0]["groups"]) == ["sst2 0-shot (limit 100)", "sst2 0-shot (limit 50)"]
