"""Training on the SimLens continuation: ``--kinds simlens`` (the rule's operating point, calibrated
on the answers it gives) and a classifier reading ``continuation_margin``, from a collection of the
real SmolLM2 on SST-2 (a tiny random model answers one option everywhere, so it could not tell the
continuation's answers from the lens'), checked against the policies run through lm-eval's
backend on the same documents.

Reference: what a document does offline (:func:`calibration.exit_layers` over the recorded
scores, the answer at its exit read off the recorded continuation or the lens) is what the
``adainfer`` backend does with the written file on the same SST-2 documents: exit layers and
per-document correctness.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from adainfer_lmeval.experiments import calibration as cal
from adainfer_lmeval.experiments import fitting
from adainfer_lmeval.experiments import train as tr
from adainfer_lmeval.experiments import training_data as td
from adainfer_lmeval.experiments.collect import collect
from adainfer_lmeval.experiments.collect_continuation import continuation_path
from adainfer_lmeval.policies import build_policy
from adainfer_lmeval.policies.rules import ContinuationMargin

DOCS = 24
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SST-2's first DOCS documents collected on SmolLM2; train writes simlens.json and an SVM
    reading gap and continuation_margin (empirical criterion loose enough to exit)."""
    from adainfer_lmeval.offline.models.fetch import fetch_model

    root = tmp_path_factory.mktemp("train_continuation")
    model = str(fetch_model("smollm2-135m"))
    path = root / "c.parquet"
    collect(model, ["sst2"], [0], None, path, doc_filter=lambda _n, i: i < DOCS, quiet=True)
    args = ["--model", model, "--features", str(path), "--kinds", "simlens,svm", "--use-features", "gap,continuation_margin",
            "--criterion", "agreement", "--tolerance", "0.5", "--no-study", "--folds", "2", "--inner-folds", "2",
            "--out", str(root / "out")]
    return {"model": model, "path": path, "out": root / "out", "args": args, "code": tr.main(args)}


def _backend(model: str, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """Exit layers and correctness of the first DOCS SST-2 documents through lm-eval's backend."""
    from adainfer_lmeval.adapter.harness import evaluate, task_manager
    from adainfer_lmeval.offline.environment import configure_offline_environment

    configure_offline_environment()
    result = evaluate(model="adainfer", model_args=f"pretrained={model},policy={spec}", tasks=["sst2"], num_fewshot=0,
                      limit=DOCS, device="cpu", batch_size=8, log_samples=True, bootstrap_iters=0,
                      task_manager=task_manager())
    samples = sorted(result["samples"]["sst2"], key=lambda s: s["doc_id"])
    assert all(len(set(s["exit_layers"])) == 1 for s in samples)
    return np.array([s["exit_layers"][0] for s in samples]), np.array([s["acc"] for s in samples], dtype=bool)


def _offline(trained) -> td.Data:
    data = td.with_continuation_signals(td.with_continuation(td.load_data(trained["path"]), trained["path"]))
    return data.subset(np.argsort([int(k.split(":")[-1]) for k in data.keys]))  # by doc id, as lm-eval's samples


def test_train_collects_the_read_out_and_writes_a_simlens_file(trained, capsys):
    assert trained["code"] == 0
    assert continuation_path(trained["path"]).exists()  # collected for the kinds that read it
    meta = json.loads((trained["out"] / "simlens.json").read_text())
    assert meta["kind"] == "simlens" and meta["features"] == ["continuation_margin"]
    point = meta["operating_point"]
    assert meta["min_layer"] < meta["model"]["num_layers"] and point["calibration_continuation_layers"] > 0  # exits, pays
    policy = build_policy(str(trained["out"] / "simlens.json"), {})
    assert isinstance(policy, ContinuationMargin) and policy.exit_readout == "continuation"
    assert (policy.margin, policy.min_layer) == (meta["threshold"], meta["min_layer"])
    assert policy.describe()["kind"] == "simlens"
    # the calibration answered with the continuation: the same point by hand, and not the lens' one
    data = _offline(trained)
    scores = data.feats[:, : data.num_layers - 1, data.columns(["continuation_margin"])[0]]
    carried = cal.calibrate(data, scores, 0.5, criterion="agreement", check_cost=cal.DEFAULT_CHECK_COST, max_threshold=1.0,
                            readout=cal.Readout.carried(data, checks=True, answers=True))
    assert (carried["threshold"], carried["min_layer"]) == (meta["threshold"], meta["min_layer"])
    assert carried["continuation_layers"] == pytest.approx(point["calibration_continuation_layers"])
    # a second run reads the read-out back instead of collecting it again
    capsys.readouterr()
    assert tr.main(trained["args"]) == 0
    assert "collecting the continuation read-out" not in capsys.readouterr().out


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_the_simlens_file_exits_and_answers_online_as_offline(trained, quantile):
    data = _offline(trained)
    L = data.num_layers
    threshold = float(np.quantile(data.continuation.margin[:, 14], quantile))  # some stop at layer 15, some later
    exits = cal.exit_layers(data.continuation.margin[:, : L - 1], threshold, 15)
    outcome = cal.Readout.carried(data, checks=True, answers=True).outcome(exits, 15)
    assert 1 < len(set(exits.tolist())), "the point should split the documents"
    backend_exits, correct = _backend(trained["model"], f"{trained['out'] / 'simlens.json'},threshold={threshold!r},min_layer=15")
    assert backend_exits.tolist() == exits.tolist()
    assert correct.tolist() == (outcome.answers == data.gold).tolist()
    lens = data.choice[np.arange(len(exits)), exits - 1]
    assert (outcome.answers != lens).any(), "the continuation should answer some document otherwise than the lens"


def test_an_svm_reading_the_continuation_margin_runs_online_as_trained(trained):
    meta = json.loads((trained["out"] / "svm.json").read_text())
    assert meta["features"] == ["gap", "continuation_margin"]
    assert meta["operating_point"]["calibration_continuation_layers"] > 0  # its checks carry, counted in calibration
    data = _offline(trained)
    params = build_policy(str(trained["out"] / "svm.json"), {}).estimator
    scores = fitting.classifier_scores(params, data, data.columns(meta["features"]))
    threshold = float(np.quantile(scores[:, 14], 0.6))  # 40% stop at layer 15, the others later or never
    exits = cal.exit_layers(scores, threshold, 15)
    assert 1 < len(set(exits.tolist()))
    backend_exits, correct = _backend(trained["model"], f"{trained['out'] / 'svm.json'},threshold={threshold!r},min_layer=15")
    assert backend_exits.tolist() == exits.tolist()
    assert correct.tolist() == (data.choice[np.arange(len(exits)), exits - 1] == data.gold).tolist()  # the lens answers


FILLED_FROM = 20


def test_a_simlens_file_trained_on_the_filled_read_out_runs_filled_and_exits_online_as_offline(trained, capsys):
    """``--carry filled``: the filled read-out written beside the collection (from layer 20), the
    point calibrated on its answers and carries, the file running as ``policy=simlens,carry=filled``
    and, at a point that splits the documents, exiting and answering through lm-eval as offline."""
    from adainfer_lmeval.experiments.filled_continuation import filled_path, read_filled

    out = trained["out"] / "filled"
    args = ["--model", trained["model"], "--features", str(trained["path"]), "--kinds", "simlens", "--carry", "filled",
            "--carry-from-layer", str(FILLED_FROM), "--criterion", "agreement", "--tolerance", "0.5", "--no-study",
            "--folds", "2", "--inner-folds", "2", "--out", str(out)]
    assert tr.main(args) == 0
    assert "collecting the filled read-out" in capsys.readouterr().out and filled_path(trained["path"]).exists()
    meta = json.loads((out / "simlens.json").read_text())
    assert meta["continuation_carry"] == "filled" and meta["training"]["continuation"]["from_layer"] == FILLED_FROM
    policy = build_policy(str(out / "simlens.json"), {})
    assert policy.continuation_carry == "filled" and policy.describe()["continuation_carry"] == "filled"
    assert build_policy(str(trained["out"] / "simlens.json"), {}).continuation_carry == "simlens"  # older files as before

    data = td.with_continuation_signals(read_filled(td.load_data(trained["path"]), trained["path"], FILLED_FROM))
    data = data.subset(np.argsort([int(k.split(":")[-1]) for k in data.keys]))
    scores = data.feats[:, : data.num_layers - 1, data.columns(["continuation_margin"])[0]]
    readout = cal.Readout.carried(data, checks=True, answers=True)
    carried = cal.calibrate(data, scores, 0.5, criterion="agreement", check_cost=cal.DEFAULT_CHECK_COST, max_threshold=1.0,
                            readout=readout)
    assert (carried["threshold"], carried["min_layer"]) == (meta["threshold"], meta["min_layer"])
    threshold = float(np.quantile(data.continuation.margin[:, FILLED_FROM - 1], 0.5))
    exits = cal.exit_layers(data.continuation.margin[:, : data.num_layers - 1], threshold, FILLED_FROM)
    assert 1 < len(set(exits.tolist())), "the point should split the documents"
    backend_exits, correct = _backend(trained["model"], f"{out / 'simlens.json'},threshold={threshold!r},min_layer={FILLED_FROM}")
    assert backend_exits.tolist() == exits.tolist()
    assert correct.tolist() == (readout.outcome(exits, FILLED_FROM).answers == data.gold).tolist()
    # the classifiers read SimLens's continuation: --carry filled is refused for them in one line
    assert tr.main(args[:4] + ["--kinds", "svm", "--use-features", "gap,continuation_margin"] + args[6:]) == 2
    assert "--carry filled is for --kinds simlens" in capsys.readouterr().err
