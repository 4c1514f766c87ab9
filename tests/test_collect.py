"""Collections resume: an interrupted or enlarged collection traces only what its log lacks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from adainfer_lmeval.experiments import collect as collect_mod
from adainfer_lmeval.experiments.collect import collect, read_metadata, trace_log_path


def _collect(dirs, docs, out, arch="llama"):
    """SST-2 0-shot, ``docs`` documents, batches of 4 rows (so a collection has several)."""
    return collect(str(dirs[arch]), ["sst2"], [0], docs, out, rows_per_batch=4, quiet=True)


def _rows(path):
    table = pq.read_table(path).to_pylist()
    return {(r["task"], r["doc_id"], r["num_fewshot"]): r for r in table}


@pytest.fixture(scope="module")
def fresh(tiny_model_dirs, tmp_path_factory):
    """Eight SST-2 documents collected in one go, without a log to read from."""
    out = tmp_path_factory.mktemp("fresh") / "fresh.parquet"
    _collect(tiny_model_dirs, 8, out)
    return _rows(out)


def test_an_interrupted_collection_resumes_from_its_log(tiny_model_dirs, tmp_path, monkeypatch, fresh):
    out = tmp_path / "c.parquet"
    append = collect_mod.TraceLog.append
    batches = []

    def dies_after_two_batches(self, examples):
        append(self, examples)
        batches.append(len(examples))
        if len(batches) == 2:
            raise KeyboardInterrupt  # as a user's ^C or a killed job would

    monkeypatch.setattr(collect_mod.TraceLog, "append", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        _collect(tiny_model_dirs, 8, out)
    assert not out.exists()
    logged = sum(batches)
    assert 0 < logged < 8
    monkeypatch.setattr(collect_mod.TraceLog, "append", append)
    with open(trace_log_path(out), "a") as f:
        f.write('{"key": "torn line of a process killed mid-wri')  # must be skipped, not crash
    meta = _collect(tiny_model_dirs, 8, out)
    assert meta["parts"][0]["resumed"] == logged
    assert read_metadata(out)["data_sha256"] == meta["data_sha256"]
    assert _rows(out) == fresh  # identical to the uninterrupted collection, value for value


def test_more_documents_trace_only_the_new_ones(tiny_model_dirs, tmp_path, fresh):
    out = tmp_path / "c.parquet"
    first = _collect(tiny_model_dirs, 5, out)
    assert first["parts"][0]["resumed"] == 0
    second = _collect(tiny_model_dirs, 8, out)
    assert second["parts"][0]["resumed"] == 5  # the sample of 5 is the first 5 of the sample of 8
    got = _rows(out)
    assert got.keys() == fresh.keys()
    for key, row in fresh.items():
        for column, value in row.items():
            if column in ("features", "option_ll", "option_logits"):
                # the new documents were batched with other rows (padding), so float noise only
                assert np.allclose(np.array(got[key][column], float), np.array(value, float), atol=1e-4, equal_nan=True), (key, column)
            else:
                assert got[key][column] == value, (key, column)


def test_a_log_of_another_model_fills_nothing(tiny_model_dirs, tmp_path, fresh):
    out = tmp_path / "c.parquet"
    _collect(tiny_model_dirs, 8, out)
    other = _collect(tiny_model_dirs, 8, out, "qwen2")
    assert other["parts"][0]["resumed"] == 0
    assert _rows(out) != fresh


@pytest.mark.parametrize("line", [
    "not json at all",
    '{"key": 3}',
    '[1, 2]',
    None,  # the right key, with values of the wrong type
])
def test_a_bad_log_line_is_traced_again_not_read(tiny_model_dirs, tmp_path, fresh, line):
    out = tmp_path / "c.parquet"
    _collect(tiny_model_dirs, 8, out)
    log = trace_log_path(out)
    records = [json.loads(raw) for raw in log.read_text().splitlines()]
    if line is None:
        records[0]["features"] = [["x"] * len(records[0]["features"][0])] * len(records[0]["features"])
        lines = [json.dumps(r) for r in records]
    else:
        lines = [line] + [json.dumps(r) for r in records[1:]]
    log.write_text("\n".join(lines) + "\n")
    again = _collect(tiny_model_dirs, 8, out)
    assert again["parts"][0]["resumed"] == 7
    assert _rows(out).keys() == fresh.keys()
