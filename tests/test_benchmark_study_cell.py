"""The benchmark on a study cell (``--study_cell``): the study's documents, its points, its exits.

A tiny random model stands in for a study model: its test collection of SST-2 0-shot is collected
as the study collects one, and the benchmark must build the same documents and, run online at
each rule's point, exit every request where the study's offline evaluation of that collection
exits its document. No timing is asserted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers as tf

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.bench import study_cell
from adainfer_lmeval.experiments.bench.report import format_tables
from adainfer_lmeval.experiments.bench.runs import benchmark_model
from adainfer_lmeval.experiments.bench.variants import Variant, make_backend

DOCS = 8


@pytest.fixture(scope="module")
def cell(tiny_model_dirs, tmp_path_factory):
    """A tiny model's study-style SST-2 0-shot test collection, with its continuation read-out."""
    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.experiments.collect import collect
    from adainfer_lmeval.experiments.collect_continuation import collect_continuation
    from adainfer_lmeval.experiments.study_tasks import StudyTask, doc_filter_for
    from adainfer_lmeval.experiments.training_data import load_data, with_continuation

    folder = str(tiny_model_dirs["llama"])
    path = tmp_path_factory.mktemp("cell") / "sst2@0-test.parquet"
    collect(folder, ["sst2"], [0], DOCS, path, seed=0, doc_filter=doc_filter_for(StudyTask.parse("sst2"), "test"),
            quiet=True)
    collect_continuation(AdaInferLM(pretrained=folder, policy="full", batch_size=1, device="cpu"), path)
    return folder, path, with_continuation(load_data(path), path)


def _rows(data) -> list[dict]:
    """Study-like rows of the rules at points that exit at various layers of the 4 (a static rule's
    score is 1 everywhere: the study records its exiting points at threshold 1)."""
    layers = data.num_layers
    margin = float(np.median(data.feats[:, 1:layers - 1, data.columns(["margin"])[0]]))
    carried = float(np.median(data.continuation.margin[:, 1:layers - 1]))
    points = {"margin": (margin, 2), "simlens": (carried, 2), "margin_simlens": (margin, 2), "static": (1.0, 3),
              "simlens_static": (1.0, 2), "threshold": (0.05, 2)}
    return [{"policy": p, "threshold": t, "min_layer": m, "layers": layers, "n_test": DOCS, "layers_saved": 0.0,
             "delta_points": 0.0, "mean_exit_layer": float(layers)} for p, (t, m) in points.items()]


def test_the_benchmark_runs_the_studys_documents_and_exits_where_the_study_does(cell, one_thread):
    folder, path, data = cell
    model, tokenizer = tf.AutoModelForCausalLM.from_pretrained(folder).eval(), tf.AutoTokenizer.from_pretrained(folder)
    requests, doc_ids = study_cell.cell_requests(make_backend(Variant("hf"), model, tokenizer, 1), "sst2@0", DOCS)
    assert len(requests) == 2 * DOCS and sorted(set(doc_ids)) == sorted(data.keys)

    rows = _rows(data)
    variants = [Variant("full")] + [study_cell.variant_of(r) for r in rows]
    assert variants[1:4] == [Variant("margin", {"margin": rows[0]["threshold"], "min_layer": 2}),
                             Variant("simlens", {"margin": rows[1]["threshold"], "min_layer": 2}),
                             Variant("margin", {"margin": rows[2]["threshold"], "min_layer": 2, "readout": "continuation"})]
    res = benchmark_model("tiny-llama", model, tokenizer, requests, variants, batch_sizes=[1, 3], repeats=1,
                          profile=False, decision_tokens=8, min_run_time=0.01, log=lambda *_: None)
    check = study_cell.check_against_study(path, sorted(set(doc_ids)), doc_ids, rows, res["rows"])
    assert check["present"] and check["same_documents"]
    for row in rows:
        label = study_cell.variant_of(row).label
        assert check["variants"][label]["exits_equal"], (row["policy"], check["variants"][label])
    exits = {r["variant"]: r["exit_layers"] for r in res["rows"] if r["batch"] == 1}
    assert len(set(exits[variants[1].label])) > 1 and len(set(exits[variants[2].label])) > 1  # they split the documents
    assert set(exits[study_cell.variant_of(rows[3]).label]) == {3}

    # the check can fail: a point the benchmark never ran is not equal, however its exits fall
    unrun = [{**rows[0], "min_layer": 3}]
    assert not study_cell.check_against_study(path, sorted(set(doc_ids)), doc_ids, unrun, res["rows"])["variants"][
        study_cell.variant_of(unrun[0]).label]["exits_equal"]
    # and a point whose exits differ from the ones the benchmark measured
    moved = [{**rows[3], "min_layer": 2}]
    res["rows"].append({**next(r for r in res["rows"] if r["variant"] == variants[4].label),
                        "variant": study_cell.variant_of(moved[0]).label})
    bad = study_cell.check_against_study(path, sorted(set(doc_ids)), doc_ids, moved, res["rows"])
    assert not bad["variants"][study_cell.variant_of(moved[0]).label]["exits_equal"]

    res["study_cell"] = {"cell": "sst2@0", "batch_sizes": [1, 3], "check": check,
                         "rows": [{"variant": study_cell.variant_of(r).label, **r} for r in rows]}
    text = format_tables([res])
    assert "The study's calibrated points" in text and text.count("| yes ") == len(rows)


def test_the_filled_read_outs_points_run_with_carry_filled_and_exit_where_that_read_out_does(cell, one_thread):
    """``--study_readouts filled``: the SimLens rules at points of the filled read-out run with
    ``carry=filled`` and exit where the filled read-out of the same collection says (its file
    written beside the collection as filled_continuation writes it); without the file, not equal."""
    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.experiments.filled_continuation import read_filled, write_filled

    folder, path, data = cell
    model, tokenizer = tf.AutoModelForCausalLM.from_pretrained(folder).eval(), tf.AutoTokenizer.from_pretrained(folder)
    requests, doc_ids = study_cell.cell_requests(make_backend(Variant("hf"), model, tokenizer, 1), "sst2@0", DOCS)
    rows = [r for r in _rows(data) if r["policy"] in ("simlens", "simlens_static")]
    for row in rows:
        row.update(readout="filled", from_layer=1)
    assert study_cell.check_against_study(path, sorted(set(doc_ids)), doc_ids, rows, [])["variants"][
        study_cell.variant_of(rows[0]).label]["missing"].startswith("no current filled read-out")
    write_filled(AdaInferLM(pretrained=folder, policy="full", batch_size=1, device="cpu"), path, 1, [None], log=lambda _: None)
    filled = read_filled(data, path, 1)
    rows[0]["threshold"] = float(np.median(filled.continuation.margin[:, 1:data.num_layers - 1]))
    variants = [study_cell.variant_of(r) for r in rows]
    assert variants == [Variant("simlens", {"margin": rows[0]["threshold"], "min_layer": 2, "carry": "filled"}),
                        Variant("static", {"layer": 2, "readout": "continuation", "carry": "filled"})]
    res = benchmark_model("tiny-llama", model, tokenizer, requests, variants, batch_sizes=[1, 3], repeats=1,
                          profile=False, decision_tokens=8, min_run_time=0.01, log=lambda *_: None)
    check = study_cell.check_against_study(path, sorted(set(doc_ids)), doc_ids, rows, res["rows"])
    for row in rows:
        assert check["variants"][study_cell.variant_of(row).label]["exits_equal"], row["policy"]
    exits = {r["variant"]: r["exit_layers"] for r in res["rows"] if r["batch"] == 1}
    assert len(set(exits[variants[0].label])) > 1  # the filled margin splits the documents


def test_readout_points_take_one_read_outs_rows_of_the_model_and_cell_and_refuse_others_in_one_line(tmp_path):
    rows = [{"readout": r, "policy": "simlens", "criterion": c, "threshold": 0.3, "min_layer": m, "n_test": 10,
             "layers_saved": 0.1, "delta_points": 0.0, "mean_exit_layer": 20.0}
            for r, c, m in (("filled", "agreement", 17), ("filled", "agreement", 24), ("filled", "guarantee", 20),
                            ("simlens", "agreement", 18))]
    found = tmp_path / "m_sst2@4.json"
    found.write_text(json.dumps({"model": "m", "task": "sst2@4", "num_layers": 24, "from_layer": 12, "rows": rows}))
    kept = study_cell.readout_points(found, "m", "sst2@4")
    assert [(r["readout"], r["min_layer"], r["layers"], r["from_layer"]) for r in kept] == [("filled", 17, 24, 12)]
    assert [r["min_layer"] for r in study_cell.readout_points(found, "m", "sst2@4", readout="simlens")] == [18]
    with pytest.raises(AdaInferError, match="is the read-out of m on sst2@4, not of q on sst2@4"):
        study_cell.readout_points(found, "q", "sst2@4")
    with pytest.raises(AdaInferError, match="has no complete accuracy rows of the filled read-out"):
        study_cell.readout_points(found, "m", "sst2@4", criterion="accuracy")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(AdaInferError, match="cannot read a filled-continuation result"):
        study_cell.readout_points(tmp_path / "bad.json", "m", "sst2@4")
    from adainfer_lmeval.experiments import benchmark

    with pytest.raises(SystemExit):
        benchmark.main(["--models", "m,q", "--study_cell", "sst2@4", "--study_readouts", "filled", "--study_results", str(found)])


def test_study_points_keep_the_rules_that_exit_and_refuse_bad_input_in_one_line(tmp_path, capsys):
    rows = [{"model": "m", "task": "sst2", "shots": 4, "setting": "intra", "criterion": "agreement", "policy": p,
             "threshold": 0.5, "min_layer": m, "layers": 24, "n_test": 10}
            for p, m in (("margin", 17), ("simlens", 24), ("svm", 10), ("static", 20))]
    for row in rows:
        row.update(layers_saved=0.1, delta_points=0.0, mean_exit_layer=20.0)
    rows.append({**rows[0], "criterion": "accuracy", "min_layer": 5})
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": rows}))
    kept = study_cell.study_points(results, "m", "sst2@4")
    assert [(r["policy"], r["min_layer"]) for r in kept] == [("margin", 17), ("static", 20)]  # no svm, no never-exit
    assert study_cell.study_points(results, "m", "sst2@4", criterion="accuracy")[0]["min_layer"] == 5
    with pytest.raises(AdaInferError, match="no intra agreement rows of m on sst2@0.*m:sst2@4"):
        study_cell.study_points(results, "m", "sst2@0")
    with pytest.raises(AdaInferError, match="cannot read the study's results"):
        study_cell.study_points(tmp_path / "missing.json", "m", "sst2@4")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AdaInferError, match="cannot read the study's results"):
        study_cell.study_points(tmp_path / "bad.json", "m", "sst2@4")
    results.write_text(json.dumps({"rows": [{k: v for k, v in rows[0].items() if k != "threshold"}]}))
    with pytest.raises(AdaInferError, match="rows of margin lack some of"):
        study_cell.study_points(results, "m", "sst2@4")
    with pytest.raises(AdaInferError, match="bad task spec"):
        study_cell.study_points(results, "m", "sst2@x")
    # the command: one line, before any model loads, when no rule exits on the cell
    from adainfer_lmeval.experiments import benchmark

    results.write_text(json.dumps({"rows": [rows[1]]}))  # simlens at min_layer 24 of 24: never exits
    assert benchmark.main(["--models", "m", "--study_cell", "sst2@4", "--study_results", str(results)]) == 2
    assert "no rule of the study exits on m sst2@4" in capsys.readouterr().err
    assert study_cell.check_against_study(tmp_path / "none.parquet", [], [], [], []) == {
        "collection": str(tmp_path / "none.parquet"), "present": False}


def test_the_clock_plot_reads_time_and_flops_saved_off_study_cell_runs(tmp_path):
    from adainfer_lmeval.experiments.bench.clock_plot import clock_points, main

    rows = [{"variant": "full", "batch": 1, "ideal_speedup": 1.0, "measured_speedup": 1.0},
            {"variant": "margin(margin=0.7,min_layer=17)", "batch": 1, "ideal_speedup": 1.25, "measured_speedup": 1.1},
            {"variant": "margin(margin=0.7,min_layer=17)", "batch": 8, "ideal_speedup": 1.25, "measured_speedup": 1.25},
            {"variant": "simlens(margin=0.2,carry=filled)", "batch": 1, "ideal_speedup": 1.2, "measured_speedup": 1.1}]
    run = {"results": [{"model": "m", "rows": rows, "study_cell": {
        "cell": "sst2@4", "doc_ids": ["sst2:1", "sst2:2"],
        "rows": [{"variant": "margin(margin=0.7,min_layer=17)", "policy": "margin"},
                 {"variant": "simlens(margin=0.2,carry=filled)", "policy": "simlens", "readout": "filled"}]}}]}
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(run))
    points = clock_points([path])
    assert [(p["policy"], p["batch"]) for p in points] == [("margin", 1), ("margin", 8), ("simlens (filled)", 1)]  # full depth is no point
    assert points[0]["flops_saved"] == pytest.approx(20.0) and points[0]["time_saved"] == pytest.approx(100 / 11)
    assert points[1]["time_saved"] == pytest.approx(20.0) and points[0]["documents"] == 2
    out = tmp_path / "clock.png"
    assert main([str(path), "--out", str(out)]) == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"results": [{"model": "m", "rows": rows}]}))
    with pytest.raises(AdaInferError, match="none of these benchmark files has a --study_cell run"):
        clock_points([plain])
    (tmp_path / "odd.json").write_text(json.dumps({"results": [1]}))
    with pytest.raises(AdaInferError, match="odd.json: not a benchmark.json"):
        clock_points([tmp_path / "odd.json"])
    (tmp_path / "bad.json").write_text("[1, 2")
    assert main([str(tmp_path / "bad.json"), "--out", str(out)]) == 2
