"""Smoke test of the wall-clock benchmark's machinery on a tiny random model (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import transformers as tf

from adainfer_lmeval.experiments import benchmark
from adainfer_lmeval.experiments.bench.report import COLUMNS, format_tables, table_rows, write_report
from adainfer_lmeval.experiments.bench.requests import synthetic_requests
from adainfer_lmeval.experiments.bench.runs import benchmark_model
from adainfer_lmeval.experiments.bench.variants import Variant, variants_for


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    folder = tiny_model_dirs["llama"]
    return tf.AutoModelForCausalLM.from_pretrained(folder).eval(), tf.AutoTokenizer.from_pretrained(folder)


def test_benchmark_table_on_tiny_model(tiny, tmp_path, one_thread):
    model, tokenizer = tiny
    requests = synthetic_requests(tokenizer, n_docs=3, choices=2)
    variants = [Variant("hf"), Variant("full"), Variant("threshold", {"gap": 0.1, "min_layer": 2})]
    res = benchmark_model("tiny-llama", model, tokenizer, requests, variants, batch_sizes=[1, 4], repeats=2,
                             decision_tokens=16, min_run_time=0.01, log=lambda *_: None)

    rows = res["rows"]
    assert [(r["batch"], r["variant"]) for r in rows] == [
        (bs, v) for bs in (1, 4) for v in ("hf", "full", "threshold(gap=0.1,min_layer=2)")
    ]
    for r in rows:
        assert len(r["times_s"]) == 2 and r["requests"] == len(requests)
        assert r["time_vs_hf"] is not None
        if r["variant"] == "hf":
            assert r["ideal_speedup"] is None and r["measured_speedup"] is None
        else:
            assert r["measured_speedup"] > 0 and r["measured_over_ideal"] > 0
        if r["variant"] == "full":
            assert r["ideal_speedup"] == 1.0
            assert r["mean_layers"] == res["num_layers"] == 4
        if r["variant"].startswith("threshold"):
            assert 1 <= r["mean_layers"] <= 4
    # policy=full through the engine scores exactly what lm-eval's hf backend scores
    assert res["max_abs_logprob_diff_full_vs_hf"] < 1e-4
    d = res["decision_cost"]
    assert d["tokens"] == 16 and d["layer_ms"] > 0 and d["decision_ms"] > 0 and d["decision_pct_of_layer"] > 0
    assert d["pruned_decision_ms"] > 0 and d["pruned_decision_pct_of_layer"] > 0
    assert d["options"] == 4 and "margin decision ms (4 options)" in format_tables([res])
    # a SimLens decision carries two tokens through the upper half of the 4 layers: its FLOPs share
    # is two 2-token layers against one 16-token layer
    from adainfer_lmeval.core.accounting import CostModel
    from adainfer_lmeval.core.architectures import DecoderStack

    costs = CostModel.from_stack(DecoderStack(model))
    assert d["simlens_layer"] == 2 and d["simlens_decision_ms"] > 0
    assert d["simlens_flops_pct_of_layer"] == pytest.approx(100 * 2 * costs.layer_flops(2) / costs.layer_flops(16))
    assert "simlens % of layer" in format_tables([res])
    assert set(res["breakdown"]) == {f"{v}@{bs}" for bs in (1, 4) for v in ("full", "threshold(gap=0.1,min_layer=2)")}
    full_breakdown = res["breakdown"]["full@1"]
    assert full_breakdown["calls"]["checks"] == 0 and full_breakdown["calls"]["layer_calls"] > 0

    table = table_rows([res])
    assert len(table) == 6 and all(len(row) == len(COLUMNS) for row in table)
    full_rows = [row for row in table if row[2] == "full"]
    assert all(row[COLUMNS.index("ideal speedup")] == "1.00" for row in full_rows)
    text = format_tables([res])
    for column in COLUMNS:
        assert column in text

    payload = {"environment": benchmark.environment(["--models", "tiny-llama"]),
               "machine_state": {"quiet": True, "quiet_throughout": False, "waited_s": 0.0, "load_at_start": 0.5,
                                 "max_load": 1.0},
               "requests_per_task": {"tiny": len(requests)}, "batch_sizes": [1, 4], "repeats": 2, "results": [res]}
    write_report(tmp_path, payload)
    assert json.loads((tmp_path / "benchmark.json").read_text())["results"][0]["model"] == "tiny-llama"
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "TAKEN UNDER LOAD" in markdown
    assert "-m adainfer_lmeval.experiments.benchmark --models tiny-llama`" in markdown  # the arguments given, not pytest's


def test_variants_skip_missing_svm(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_POLICIES", str(tmp_path))  # no shipped policies here
    messages = []
    labels = [v.label for v in variants_for("smollm2-135m", log=messages.append)]
    assert labels == ["hf", "full", "threshold(gap=0.6,min_layer=20)", "threshold(gap=0.6,min_layer=20,check_vocab=64)",
                      "threshold(gap=0.6,min_layer=20,check_vocab=64,check_clusters=256)", "margin(margin=0.9,min_layer=20)",
                      "simlens(margin=0.9,min_layer=20)"]
    labels = [v.label for v in variants_for("smollm2-135m", log=messages.append, check_clusters=0)]
    assert labels[-3] == "threshold(gap=0.6,min_layer=20,check_vocab=64)"
    assert messages and "svm" in messages[0]


def test_cheap_check_variants_are_timed_counted_and_compared(tiny, one_thread, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path))
    model, tokenizer = tiny
    requests = synthetic_requests(tokenizer, n_docs=2, choices=2)
    plain = Variant("threshold", {"gap": 0.1, "min_layer": 1})
    pruned = Variant("threshold", {"gap": 0.1, "min_layer": 1, "check_vocab": 8})
    picked = Variant("threshold", {"gap": 0.1, "min_layer": 1, "check_vocab": 8, "check_clusters": 16})
    res = benchmark_model("tiny-llama", model, tokenizer, requests, [Variant("full"), plain, pruned, picked],
                             batch_sizes=[2], repeats=1, decision_tokens=16, min_run_time=0.01, log=lambda *_: None,
                             check_vocab=8)
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows[pruned.label]["checks_per_request"] > 0
    assert res["breakdown"][f"{pruned.label}@2"]["calls"]["checks"] > 0
    assert "same_exit_as_full_checks" not in rows[plain.label]
    for variant in (pruned, picked):  # compared with the same policy's full-vocabulary checks
        assert 0.0 <= rows[variant.label]["same_exit_as_full_checks"] <= 1.0
    recall = res["picker_recall"]
    assert recall["clusters"] == 16 and recall["pick_ms"] > 0
    assert recall["first_layer"] == 1 and recall["checks"] == recall["contexts"] * 3  # layers 1..L-1 of 4
    assert 0.0 <= recall["top1_recall"] <= 1.0 and recall["mean_head_rows"] > 16
    assert "top-1 recall" in format_tables([res])
