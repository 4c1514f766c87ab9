"""Suite, report and check on real runs: the CI suite (SmolLM2, SST-2 slice) against its baseline."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from adainfer_lmeval.reporting.regression_check import check_rows
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.suite_file import Suite
from adainfer_lmeval.experiments.suite_runner import run_suite
from adainfer_lmeval.reporting.comparison import compare_rows, display_rows, load_runs
from adainfer_lmeval.reporting.report import write_report

pytestmark = pytest.mark.real

CI = Path(__file__).resolve().parent.parent / "reports" / "ci"


@pytest.fixture(scope="module")
def ci_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ci_suite")
    files = run_suite(Suite.load(CI / "suite.yaml"), out)
    return out, files


def test_report_numbers_equal_a_recomputation_from_the_samples(ci_runs):
    out, files = ci_runs
    runs = load_runs(files)
    rows = compare_rows(runs)
    by_policy = {r["settings"]["policy"]: r for r in runs}
    for row in rows:
        samples = by_policy[row["policy"]]["samples"]["sst2"]
        correct = [max(range(len(s["loglikelihoods"])), key=s["loglikelihoods"].__getitem__) == s["target"] for s in samples]
        assert row["early_exit"] == pytest.approx(sum(correct) / len(correct))
        layers = [layer for s in samples for layer in s["exit_layers"]]
        assert row["mean_layers"] == pytest.approx(sum(layers) / len(layers))
        assert row["layers_saved_pct"] == pytest.approx(100 * (1 - sum(layers) / len(layers) / row["num_layers"]))
        assert row["documents"] == len(samples) == 40
    written = write_report(rows, out / "report")
    assert all(p.exists() for p in written.values())
    assert (out / "report" / "accuracy_vs_layers_saved.png").stat().st_size > 1000
    # Every table row (macro-averages included) carries the chance note exactly when it is at chance.
    table = list(csv.DictReader(written["csv"].open()))
    assert [("AT CHANCE" in t["note"], t["policy"]) for t in table] == [
        (r["at_chance"], r["policy"]) for r in display_rows(rows)
    ]


def test_suite_resumes_without_rerunning(ci_runs):
    out, files = ci_runs
    before = {f: f.stat().st_mtime for f in files}
    logged = []
    run_suite(Suite.load(CI / "suite.yaml"), out, log=logged.append)
    assert {f: f.stat().st_mtime for f in files} == before
    assert all("done before, kept" in line for line in logged)


def test_check_holds_against_the_committed_baseline(ci_runs):
    _, files = ci_runs
    baseline = json.loads((CI / "baseline.json").read_text())
    # One SST-2 document is 2.5 points of 40: allow one flip from float noise across machines.
    assert check_rows(compare_rows(load_runs(files)), baseline, max_accuracy_drop=3.0, min_savings_fraction=0.9) == []


def test_check_fails_on_a_doctored_run(ci_runs):
    _, files = ci_runs
    baseline = json.loads((CI / "baseline.json").read_text())
    rows = compare_rows(load_runs(files))
    doctored = copy.deepcopy(rows)
    for r in doctored:
        if r["policy"] != "full":
            r["layers_saved_pct"] *= 0.5
            r["early_exit"] -= 0.10
    failures = check_rows(doctored, baseline, max_accuracy_drop=3.0, min_savings_fraction=0.9)
    assert any("layers saved" in f for f in failures)
    assert any("below the baseline's" in f for f in failures)

    other_limit = copy.deepcopy(rows)
    for r in other_limit:
        r["limit"] = 10
    with pytest.raises(AdaInferError, match="different limit"):
        check_rows(other_limit, baseline, max_accuracy_drop=3.0, min_savings_fraction=0.9)


def test_a_run_without_its_baseline_is_refused(ci_runs):
    _, files = ci_runs
    early_only = [f for f in files if f.name != "full.json"]
    with pytest.raises(AdaInferError, match="no full-depth run"):
        compare_rows(load_runs(early_only))


def test_oracle_keeps_full_depth_answers_at_its_exit_layers(ci_runs):
    _, files = ci_runs
    runs = {r["settings"]["policy"]: r for r in load_runs(files)}
    oracle, full = runs["oracle"], runs["full"]
    assert oracle["results"]["sst2"]["acc,none"] == pytest.approx(full["results"]["sst2"]["acc,none"])
    full_choice = {s["doc_id"]: max(range(2), key=s["loglikelihoods"].__getitem__) for s in full["samples"]["sst2"]}
    for s in oracle["samples"]["sst2"]:
        # the exit layer's answer is the full-depth answer (read off the exit layer's log-probs)
        assert max(range(2), key=s["loglikelihoods"].__getitem__) == full_choice[s["doc_id"]]
    row = next(r for r in compare_rows(list(runs.values())) if r["policy"] == "oracle")
    assert row["delta"] == pytest.approx(0.0) and row["speedup"] is None


def test_oracle_layer_is_where_the_answer_stops_changing():
    from adainfer_lmeval.experiments.oracle import oracle_layer

    assert oracle_layer([0, 1, 1, 1]) == 2
    assert oracle_layer([1, 1, 1, 1]) == 1
    assert oracle_layer([1, 1, 0, 1]) == 4
    assert oracle_layer([0, 1, 0, 0]) == 3


def test_leaderboard_of_the_ci_runs(ci_runs, tmp_path):
    """The CI runs' leaderboard: full depth and the oracle as reference rows, each policy one ranked row."""
    from adainfer_lmeval.reporting.leaderboard import leaderboard

    _, files = ci_runs
    rows = compare_rows(load_runs(files))
    written = write_report(rows, tmp_path / "report")
    board = list(csv.DictReader(written["leaderboard_csv"].open()))
    assert [(b["rank"], b["policy"]) for b in board][:2] == [("ref", "full depth (reference)"),
                                                            ("bound", "oracle (hindsight bound, untimed)")]
    ranked = [r for s in leaderboard(rows) for r in s["rows"] if r["kind"] == "ranked"]
    assert [b["policy"] for b in board[2:]] == [r["policy"] for r in ranked] == ["threshold,gap=0.6,min_layer=20"]
    page = written["html"].read_text()
    assert all(f'data-policy="{p}"' in page for p in ("full", "oracle", "threshold,gap=0.6,min_layer=20"))


def test_each_task_is_warmed_untimed_at_full_depth_before_its_first_timed_run(tmp_path, monkeypatch):
    # Without it the reference (each task's first run) paid the task's warm-up (2026-12-07).
    from adainfer_lmeval.adapter import harness

    calls = []
    real_evaluate = harness.evaluate

    def recording(model, tasks, **options):
        calls.append((model.exit_policy.describe()["name"], tuple(tasks), options.get("limit")))
        return real_evaluate(model, tasks, **options)

    monkeypatch.setattr(harness, "evaluate", recording)
    suite = tmp_path / "suite.yaml"
    suite.write_text('models: [smollm2-135m]\npolicies: ["static,layer=27"]\n'
                     'tasks:\n  - {name: sst2, limit: 4}\nbatch_size: 2\n')
    files = run_suite(Suite.load(suite), tmp_path / "runs", log=lambda _m: None)
    assert calls[0] == ("full", ("sst2",), 2)  # one batch, untimed, before anything is timed
    assert calls[1:] == [("full", ("sst2",), 4), ("static", ("sst2",), 4)]
    assert [len(json.loads(f.read_text())["samples"]["sst2"]) for f in files] == [4, 4]  # the warm-up is in no run
