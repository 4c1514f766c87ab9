"""Suites never lose or mislabel a run: the resume key, file names, malformed suites, Ctrl-C.

The runs themselves are faked (``suite_runner._open_model``): what is tested is which runs a suite
decides to run, where it writes them and what survives an interruption; no model loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adainfer_lmeval.policies import files as policy_files
from adainfer_lmeval.experiments import run_files, suite_runner
from adainfer_lmeval.experiments.suite import main as suite_main
from adainfer_lmeval.experiments.suite_file import Suite
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.reporting.comparison import FULL

REPORTS = Path(__file__).resolve().parent.parent / "reports"


@pytest.fixture
def fake_runs(monkeypatch):
    """Replace model loading and evaluation; return the list of (model, task, policy) run."""
    calls = []

    def open_model(suite, model_name, log):
        def run(task, policy):
            calls.append((model_name, task.name, policy))
            return {"results": {}, "adainfer": {"policy": {"name": policy}}, "samples": {}, "ran": len(calls)}
        return run

    monkeypatch.setattr(suite_runner, "_open_model", open_model)
    monkeypatch.setattr(suite_runner, "_preflight", lambda suite: None)
    return calls


def suite_of(**spec) -> Suite:
    spec.setdefault("models", ["tiny"])
    spec.setdefault("tasks", [{"name": "sst2", "limit": 4}])
    return Suite.from_dict(spec)


# ---- the resume key ---------------------------------------------------------------------------


def test_changing_model_args_runs_again(fake_runs, tmp_path):
    suite_runner.run_suite(suite_of(policies=["threshold,gap=0.6"]), tmp_path, log=lambda m: None)
    assert len(fake_runs) == 2
    suite_runner.run_suite(suite_of(policies=["threshold,gap=0.6"]), tmp_path, log=lambda m: None)
    assert len(fake_runs) == 2  # unchanged suite: kept
    logged = []
    suite = suite_of(policies=["threshold,gap=0.6"], model_args="check_vocab=64")
    files = suite_runner.run_suite(suite, tmp_path, log=logged.append)
    assert len(fake_runs) == 4  # both runs again, under the new args
    assert any("other settings (model_args)" in line for line in logged)
    assert all(json.loads(f.read_text())["settings"]["model_args"] == {"check_vocab": 64} for f in files)


@pytest.mark.parametrize("change", [{"device": "cuda"}, {"dtype": "bfloat16"}, {"batch_size": 4}])
def test_changing_device_dtype_or_batch_size_runs_again(fake_runs, tmp_path, change):
    suite_runner.run_suite(suite_of(), tmp_path, log=lambda m: None)
    suite_runner.run_suite(suite_of(**change), tmp_path, log=lambda m: None)
    assert len(fake_runs) == 2


def test_editing_a_policy_file_runs_it_again(fake_runs, tmp_path):
    policy = tmp_path / "mine" / "svm.json"
    policy.parent.mkdir()
    policy.write_text('{"threshold": 1.0}')
    suite = suite_of(policies=[str(policy)])
    suite_runner.run_suite(suite, tmp_path / "out", log=lambda m: None)
    suite_runner.run_suite(suite, tmp_path / "out", log=lambda m: None)
    assert len(fake_runs) == 2
    policy.write_text('{"threshold": 2.0}')  # same path, other content
    suite_runner.run_suite(suite, tmp_path / "out", log=lambda m: None)
    assert fake_runs[-1][2] == str(policy) and len(fake_runs) == 3


def test_a_shipped_policy_is_keyed_by_its_content(tmp_path, monkeypatch):
    monkeypatch.setattr(policy_files, "policies_dir", lambda: tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "svm.json").write_text("one")
    (tmp_path / "tiny" / "crf.json").write_text('{"crfsuite_file": "crf.crfsuite"}')
    (tmp_path / "tiny" / "crf.crfsuite").write_bytes(b"lCRF one")
    suite = suite_of(policies=["svm", "crf"])
    key = lambda policy: run_files.run_settings(suite, "tiny", suite.tasks["tiny"][0], policy)["policy_sha256"]  # noqa: E731
    before = key("svm"), key("crf")
    assert None not in before and key(FULL) is None
    (tmp_path / "tiny" / "svm.json").write_text("two")
    (tmp_path / "tiny" / "crf.crfsuite").write_bytes(b"lCRF two")  # the CRF's model file counts too
    assert key("svm") != before[0] and key("crf") != before[1]


# ---- run files never overwrite each other ----------------------------------------------------


def test_policies_whose_paths_slug_alike_keep_both_runs(fake_runs, tmp_path):
    policies = ["a_b/svm.json", "a/b/svm.json"]
    files = suite_runner.run_suite(suite_of(policies=policies), tmp_path, log=lambda m: None)
    assert len(files) == len(set(files)) == 3
    stored = sorted(json.loads(f.read_text())["settings"]["policy"] for f in files)
    assert stored == sorted([FULL, *policies])
    suite_runner.run_suite(suite_of(policies=policies), tmp_path, log=lambda m: None)
    assert len(fake_runs) == 3  # and both are found again on resume


def test_models_whose_names_slug_alike_keep_both_runs(fake_runs, tmp_path):
    files = suite_runner.run_suite(suite_of(models=["m-1", "m_1"]), tmp_path, log=lambda m: None)
    assert len(set(files)) == 2
    assert sorted(json.loads(f.read_text())["settings"]["model"] for f in files) == ["m-1", "m_1"]


def test_a_foreign_run_under_the_same_name_is_not_overwritten(fake_runs, tmp_path):
    suite = suite_of(policies=["threshold,gap=0.6"])
    plain = run_files.run_path(tmp_path, "tiny", suite.tasks["tiny"][0], "threshold,gap=0.6")
    plain.parent.mkdir(parents=True)
    foreign = {"settings": {"model": "tiny", "policy": "threshold_gap,0.6"}, "adainfer": {}}
    plain.write_text(json.dumps(foreign))
    files = suite_runner.run_suite(suite, tmp_path, log=lambda m: None)
    assert json.loads(plain.read_text()) == foreign and plain not in files
    assert len(fake_runs) == 2


# ---- malformed suites: one line naming the key ------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ("models: [tiny\ntasks: [sst2]\n", "not valid YAML"),
    ("models: smollm2-135m\ntasks: [sst2]\n", "models must be a list"),
    ("models: [tiny]\ntasks:\n  - {name: sst2, limt: 10}\n", "limt"),
    ("models: [tiny]\ntasks: [sst2]\nbatch_size: eight\n", "batch_size"),
    ("models: [tiny]\ntasks: sst2\n", "tasks must be a list"),
    ("models: [tiny]\ntasks: [sst2]\npolicies: svm\n", "policies must be a list"),
    ("models: [tiny]\ntasks: [sst2]\npolicies: {tinny: [svm]}\n", "tinny"),
    ("models: [tiny]\ntasks: {tiny: [sst2]}\npolicies: [svm, svm]\n", "svm more than once"),
    ("models: [tiny]\ntasks:\n  - {name: sst2, limit: all}\n", "limit"),
    ("models: [tiny]\ntasks:\n  - {name: sst2, num_fewshot: -1}\n", "num_fewshot"),
    ("models: [tiny]\ntasks: [sst2]\nmodel_args: device=cuda\n", "device"),
    ("models: [tiny]\ntasks: [sst2]\ndtype: fp64\n", "dtype"),
    ("models: [tiny]\ntasks: [sst2]\nlimt: 3\n", "limt"),
    ("- tiny\n", "mapping"),
    ("models: [tiny]\n", "tasks"),
])
def test_a_malformed_suite_is_refused_in_one_line(tmp_path, text, key):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(AdaInferError) as error:
        Suite.load(path)
    assert key in str(error.value) and "\n" not in str(error.value)


def test_a_missing_suite_file_is_one_line(tmp_path):
    with pytest.raises(AdaInferError, match="cannot read"):
        Suite.load(tmp_path / "nope.yaml")


# ---- Ctrl-C and atomic writes ----------------------------------------------------------------


def test_ctrl_c_ends_in_one_line_and_keeps_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite_runner, "_preflight", lambda suite: None)

    def open_model(suite, model_name, log):
        def run(task, policy):
            if policy != FULL:
                raise KeyboardInterrupt
            return {"results": {}, "adainfer": {}, "samples": {}}
        return run

    monkeypatch.setattr(suite_runner, "_open_model", open_model)
    (tmp_path / "suite.yaml").write_text("models: [tiny]\ntasks: [{name: sst2, limit: 4}]\npolicies: [svm]\n")
    out = tmp_path / "out"
    assert suite_main([str(tmp_path / "suite.yaml"), "--output_path", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted: 1 finished run(s) kept" in err[0]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["full.json"]  # no half-written or temporary file
    assert json.loads(files[0].read_text())["settings"]["policy"] == FULL


def test_a_write_killed_before_the_rename_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "runs" / "full.json"

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_files.write_run_file(target, {"settings": {}})
    assert list(tmp_path.rglob("*.*")) == []


# ---- committed runs are recognised ------------------------------------------------------------


@pytest.mark.parametrize("name", ["leaderboard", "generation"])
def test_committed_suites_would_rerun_nothing(name):
    """``adainfer-eval suite reports/NAME/suite.yaml --output_path reports/NAME`` runs nothing."""
    plan = run_files.plan_suite(Suite.load(REPORTS / name / "suite.yaml"), REPORTS / name)
    assert plan and [(r.path, r.status) for r in plan if not r.done] == []


def test_dry_run_lists_and_loads_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite_runner, "_open_model", lambda *a: pytest.fail("a dry run must not load a model"))
    assert suite_main([str(REPORTS / "leaderboard" / "suite.yaml"), "--output_path", str(REPORTS / "leaderboard"),
                    "--dry_run"]) == 0
    planned = len(run_files.plan_suite(Suite.load(REPORTS / "leaderboard" / "suite.yaml"), REPORTS / "leaderboard"))
    assert planned > 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"[suite] 0 of {planned} runs would run"


def test_migration_upgrades_only_matching_legacy_runs(fake_runs, tmp_path):
    suite = suite_of(policies=["threshold,gap=0.6"])
    files = suite_runner.run_suite(suite, tmp_path, log=lambda m: None)
    for f, batch in zip(files, (8, 16)):  # as written before the key grew; the second under another batch size
        record = json.loads(f.read_text())
        record["settings"] = {k: record["settings"][k] for k in run_files.LEGACY_FIELDS} | {"batch_size": batch}
        f.write_text(json.dumps(record))
    assert [r.status for r in run_files.plan_suite(suite, tmp_path)] == ["legacy", "legacy"]
    assert run_files.migrate_legacy_runs(suite, tmp_path, log=lambda m: None) == (1, 1)
    assert [r.status for r in run_files.plan_suite(suite, tmp_path)] == ["done", "legacy"]


# ---- check: cannot be fooled or emptied ------------------------------------------------------

from adainfer_lmeval.reporting import regression_check as ck  # noqa: E402
from adainfer_lmeval.reporting.comparison import compare_rows, load_runs  # noqa: E402

SST2 = REPORTS / "leaderboard" / "runs" / "smollm2_135m" / "sst2-0shot-limit100"


@pytest.fixture
def sst2_runs(tmp_path):
    """A copy of the committed SmolLM2 SST-2 runs (full depth + every policy) and its baseline rows."""
    folder = tmp_path / "runs"
    folder.mkdir()
    for f in SST2.glob("*.json"):
        (folder / f.name).write_text(f.read_text())
    return folder, compare_rows(load_runs([folder]))


def _check(folder, baseline):
    return ck.check_runs(load_runs([folder]), baseline, max_accuracy_drop=1.0, min_savings_fraction=0.9)


def test_committed_runs_hold_against_their_own_report(sst2_runs):
    folder, rows = sst2_runs
    assert _check(folder, rows) == []
    for name in ("leaderboard", "generation"):
        runs = load_runs([REPORTS / name / "runs"])
        assert ck.check_runs(runs, json.loads((REPORTS / name / "report.json").read_text()), 0.0, 1.0) == []


@pytest.mark.parametrize("baseline, message", [
    ([], "no early-exit rows"),
    ("full-only", "no early-exit rows"),
    ({"rows": []}, "list of rows"),
    ([1, 2], "row 0 is a int"),
    ("no-early_exit", "'early_exit'"),
    ("nan", "must be finite"),
    ("duplicate", "more than once"),
])
def test_a_baseline_that_holds_nothing_or_is_malformed_is_an_error(sst2_runs, baseline, message):
    folder, rows = sst2_runs
    early = [r for r in rows if r["policy"] != FULL]
    baseline = {"full-only": [r for r in rows if r["policy"] == FULL],
                "no-early_exit": [{k: v for k, v in early[0].items() if k != "early_exit"}],
                "nan": [{**early[0], "early_exit": float("nan")}],
                "duplicate": [early[0], early[0]]}.get(baseline, baseline) if isinstance(baseline, str) else baseline
    with pytest.raises(AdaInferError) as error:
        _check(folder, baseline)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("doctor, message", [
    (lambda r: r["results"]["sst2"].update({"acc,none": 0.9}), "acc 0.9 stored"),
    (lambda r: r["adainfer"]["tasks"]["sst2"].update({"layers_saved_pct": 60.0}), "layers saved 60.0% stored"),
    (lambda r: r["adainfer"]["tasks"]["sst2"].update({"mean_layers": 12.0}), "mean layers 12.0 stored"),
    (lambda r: r["samples"]["sst2"][0].update({"exit_layers": [5.0, 5.0]}), "from its samples"),
    (lambda r: r["samples"].update({"sst2": []}), "no logged samples"),
    (lambda r: r.pop("results"), "not a complete run file"),
])
def test_a_run_whose_figures_do_not_follow_from_its_samples_is_refused(sst2_runs, doctor, message):
    folder, rows = sst2_runs
    path = folder / "threshold_gap_0.6_min_layer_20.json"
    record = json.loads(path.read_text())
    doctor(record)
    path.write_text(json.dumps(record))
    with pytest.raises(AdaInferError) as error:
        ck.verify_runs(load_runs([folder]))
    assert message in str(error.value) and path.name in str(error.value) and "\n" not in str(error.value)


def test_two_current_runs_for_one_key_are_an_error(sst2_runs, tmp_path):
    folder, rows = sst2_runs
    again = tmp_path / "again"
    again.mkdir()
    (again / "copy.json").write_text((folder / "svm.json").read_text())
    with pytest.raises(AdaInferError, match="more than once"):
        ck.check_runs(load_runs([folder, again]), rows, 1.0, 0.9)


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable report.json"),
    (b"\xff\xfe\x00garbage", "not a readable report.json"),
    (b'{"model": "x"}', "list of rows"),
    (b"[]", "no early-exit rows"),
])
def test_check_cli_refuses_a_bad_baseline_in_one_line(sst2_runs, tmp_path, content, message):
    folder, _ = sst2_runs
    baseline = tmp_path / "baseline.json"
    baseline.write_bytes(content)
    with pytest.raises(AdaInferError, match=message):
        ck.main([str(folder), "--baseline", str(baseline)])


def test_check_cli_ok_counts_the_rows_it_held(sst2_runs, tmp_path, capsys):
    folder, rows = sst2_runs
    (tmp_path / "baseline.json").write_text(json.dumps(rows))
    assert ck.main([str(folder), "--baseline", str(tmp_path / "baseline.json")]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {len(rows) - 1} rows hold against {tmp_path / 'baseline.json'}"
