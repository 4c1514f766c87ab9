"""SVM/CRF stop classifiers: training, safe files, refusals, causality, registry."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import adainfer_lmeval  # noqa: F401
from adainfer_lmeval.policies.learned.base import read_policy  # importing the package registers every kind
from adainfer_lmeval.policies.learned.crf import CrfKind
from adainfer_lmeval.policies.learned.svm import SvmKind
from adainfer_lmeval.cli import policy as policy_cli
from adainfer_lmeval.policies import files as policy_files
from adainfer_lmeval.experiments import calibration as cal, fitting, train as tr, training_data as td
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.policies import ModelIdentity, build_policy

L = 6
IDENTITY = ModelIdentity(name="toy", model_type="llama", num_layers=L, hidden_size=32, vocab_size=300)


def synthetic_data(n: int = 60, seed: int = 0) -> td.Data:
    """Docs whose layers become right (and confident) from a random depth on."""
    rng = np.random.default_rng(seed)
    feats = np.zeros((n, L, len(FEATURE_NAMES)))
    choice = np.zeros((n, L), dtype=int)
    gold = rng.integers(0, 4, n)
    top1 = np.zeros((n, L), dtype=int)
    for i in range(n):
        settle = rng.integers(2, L + 1)  # first layer with the final answer
        final = gold[i] if rng.random() < 0.8 else (gold[i] + 1) % 4
        for layer in range(1, L + 1):
            ok = layer >= settle
            p1 = (0.7 if ok else 0.2) + 0.1 * rng.random()
            feats[i, layer - 1] = [p1, p1 - 0.1 if ok else 0.02, 1.0 if ok else 4.0, 0.9, layer / L]
            choice[i, layer - 1] = final if ok else rng.integers(0, 4)
            top1[i, layer - 1] = 100 + choice[i, layer - 1]
    meta = {"model": {"name": "toy", "model_type": "llama", "num_layers": L, "hidden_size": 32, "vocab_size": 300},
            "data_sha256": "0" * 64, "parts": []}
    return td.Data(feats, top1, choice, gold, 100 + gold, [f"t:{i}" for i in range(n)], ["t"] * n,
                   np.zeros(n, dtype=int), np.full(n, 4), meta)


COLS = list(range(len(FEATURE_NAMES)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """svm.json, crf.json + crf.crfsuite trained on synthetic data, in a policies/toy folder."""
    root = tmp_path_factory.mktemp("policies")
    data = synthetic_data()
    y = td.make_labels(data, "final", "option")
    out = {}
    for kind in ("svm", "crf"):
        params, point = fitting.fit_policy(data, y, kind, COLS, 0.01, 3, 0)
        meta = tr.policy_meta(kind, data, params, point, list(FEATURE_NAMES), {"mode": "final", "prediction": "option"},
                              cal.evaluate(data, np.full(len(data.keys), L)), {"tolerance": 0.01, "tasks": ["t"], "shots": [0]})
        out[kind] = tr.write_policy(root / "toy", kind, meta, params)[0]
    return root, out, data


def test_labels_both_modes():
    data = synthetic_data(10)
    for mode in td.LABEL_MODES:
        for prediction in td.PREDICTIONS:
            y = td.make_labels(data, mode, prediction)
            assert y.shape == (10, L - 1) and y.dtype == bool
    final = td.make_labels(data, "final", "option")
    assert (final == (data.choice[:, :-1] == data.choice[:, -1:])).all()
    both = td.make_labels(data, "gold", "both")
    assert (both <= td.make_labels(data, "gold", "token")).all()


def test_files_are_small_json_and_load(trained):
    _, paths, _ = trained
    for kind, path in paths.items():
        meta = json.loads(path.read_text())
        assert meta["kind"] == kind and meta["model"]["num_layers"] == L
        assert path.stat().st_size < 1_000_000
        policy = build_policy(kind, {"path": str(path)})
        policy.bind(IDENTITY)
        assert policy.features == FEATURE_NAMES and policy.describe()["kind"] == kind
    assert (paths["crf"].parent / "crf.crfsuite").read_bytes().startswith(b"lCRF")


def test_a_file_at_the_never_exit_point_consults_nothing(trained):
    """min_layer = L (what training writes when no point passes): no layer is consulted, the
    CRF's chain included, so the run is full depth with no check paid for."""
    _, paths, _ = trained
    for kind, path in paths.items():
        policy = build_policy(kind, {"path": str(path), "min_layer": L})
        policy.bind(IDENTITY)
        assert not any(policy.consults_at(layer, L) for layer in range(1, L + 1)), kind
        reading = build_policy(kind, {"path": str(path), "min_layer": L - 1})
        reading.bind(IDENTITY)
        assert reading.consults_at(L - 1, L), kind  # one layer earlier it does read


def test_policy_path_and_file_resolve(trained):
    _, paths, _ = trained
    assert isinstance(build_policy(str(paths["crf"]), {}), CrfKind.policy)  # policy=<path>.json
    assert isinstance(build_policy("file", {"path": str(paths["svm"])}), SvmKind.policy)


def test_svm_resolves_shipped_file_by_model_name(trained, monkeypatch):
    root, _, _ = trained
    monkeypatch.setenv("ADAINFER_POLICIES", str(root))
    policy = build_policy("svm", {})
    policy.bind(IDENTITY)
    assert policy.source.endswith("toy/svm.json")
    other = build_policy("crf", {})
    with pytest.raises(AdaInferError, match="no crf policy is shipped for model 'other'") as err:
        other.bind(ModelIdentity("other", "llama", L, 32, 300))
    assert "\n" not in str(err.value)


def _one_line_error(fn, match):
    with pytest.raises(AdaInferError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_refusals_are_one_line(trained, tmp_path):
    _, paths, _ = trained
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(paths["svm"].read_text()[:-40])
    _one_line_error(lambda: build_policy("svm", {"path": str(corrupt)}), "corrupt policy file")
    bad_numbers = tmp_path / "bad.json"
    meta = json.loads(paths["svm"].read_text())
    meta["coef"] = meta["coef"][:-1]
    bad_numbers.write_text(json.dumps(meta))
    _one_line_error(lambda: build_policy("svm", {"path": str(bad_numbers)}), "corrupt policy file")
    pickled = tmp_path / "policy.json"
    pickled.write_bytes(pickle.dumps(json.loads(paths["svm"].read_text())))
    _one_line_error(lambda: build_policy("svm", {"path": str(pickled)}), "pickle")
    _one_line_error(lambda: build_policy(str(pickled), {}), "pickle")
    pkl = tmp_path / "policy.pkl"
    pkl.write_bytes(b"whatever")
    _one_line_error(lambda: build_policy("file", {"path": str(pkl)}), "pickles are never loaded")
    # wrong depth / width: refused when bound to the running model
    policy = build_policy("svm", {"path": str(paths["svm"])})
    _one_line_error(lambda: policy.bind(ModelIdentity("toy", "llama", L + 2, 32, 300)), "does not fit")
    _one_line_error(lambda: policy.bind(ModelIdentity("toy", "llama", L, 64, 300)), "does not fit")
    # the crfsuite file: tampered bytes (hash), wrong magic, missing
    crf_dir = tmp_path / "crf"
    crf_dir.mkdir()
    (crf_dir / "crf.json").write_text(paths["crf"].read_text())
    model = (paths["crf"].parent / "crf.crfsuite").read_bytes()
    (crf_dir / "crf.crfsuite").write_bytes(model[:-10] + b"0123456789")
    _one_line_error(lambda: build_policy("crf", {"path": str(crf_dir / "crf.json")}), "sha256")
    (crf_dir / "crf.crfsuite").write_bytes(b"garbage" + model)
    _one_line_error(lambda: build_policy("crf", {"path": str(crf_dir / "crf.json")}), "bad magic")
    (crf_dir / "crf.crfsuite").unlink()
    _one_line_error(lambda: build_policy("crf", {"path": str(crf_dir / "crf.json")}), "missing")
    _one_line_error(lambda: build_policy("svm", {"path": str(paths["crf"])}), "holds a crf policy")


@pytest.mark.parametrize("kind", ["svm", "crf"])
def test_decision_at_l_reads_only_layers_up_to_l(trained, kind):
    """Stepping the policy through prefixes gives the same exits as the training simulation,
    and changing later layers never changes the decision at l."""
    _, paths, data = trained
    policy = build_policy(kind, {"path": str(paths[kind]), "min_layer": 1})
    policy.bind(IDENTITY)
    hist = torch.full((len(data.keys), L + 1, len(FEATURE_NAMES)), float("nan"))
    hist[:, 1:] = torch.tensor(data.feats, dtype=torch.float32)
    exits = torch.full((len(data.keys),), L)
    rng = torch.Generator().manual_seed(0)
    for layer in range(1, L):
        stop = policy.decide(layer, L, hist[:, : layer + 1])
        scrambled = hist.clone()
        scrambled[:, layer + 1 :] = torch.rand(scrambled[:, layer + 1 :].shape, generator=rng) * 5
        assert torch.equal(stop, policy.decide(layer, L, scrambled[:, : layer + 1]))
        new = stop & (exits == L)
        exits[new] = layer
    learned, meta = read_policy(paths[kind])
    simulated = cal.exit_layers(fitting.classifier_scores(learned.from_dict(meta, paths[kind]), data, COLS), policy.threshold, 1)
    assert exits.tolist() == simulated.tolist()


def test_calibration_keeps_accuracy_within_tolerance():
    data = synthetic_data(80, seed=3)
    y = td.make_labels(data, "final", "option")
    scores = fitting.cross_fitted_scores(data, y, "svm", COLS, 4, 0)
    point = cal.calibrate(data, scores, tolerance=0.01)
    exits = cal.exit_layers(scores, point["threshold"], point["min_layer"])
    result = cal.evaluate(data, exits)
    assert result["policy_acc"] >= result["full_acc"] - 0.01
    assert result["mean_exit_layer"] < L  # the synthetic layers settle early: something is saved


def test_calibration_charges_consultations():
    """A consultation costs: one row that could stop early no longer makes every row consult early."""
    data = synthetic_data(80, seed=3)
    final = data.choice[:, L - 1]
    band = 4  # every row has its final answer from layer 4 on, and there the scores reach 1
    data.choice[:, band - 1 :] = final[:, None]
    scores = np.where(np.arange(1, L) >= band, 1.0, -1.0)[None, :].repeat(len(final), 0)
    data.choice[0, 1] = final[0]  # row 0 alone is right, and says so, at layer 2
    scores[0, 1] = 1.0
    free = cal.calibrate(data, scores, tolerance=0.0)
    charged = cal.calibrate(data, scores, tolerance=0.0, check_cost=0.05)
    assert free["min_layer"] == 1 and free["mean_exit_layer"] == band - (band - 2) / 80
    assert charged["min_layer"] == band and charged["mean_exit_layer"] == band and charged["mean_checks"] == 1
    cost = lambda p: p["mean_exit_layer"] + 0.05 * p["mean_checks"]  # noqa: E731
    assert cost(charged) < cost(free)
    for point in (free, charged):  # mean_checks is what the policy consults
        exits = cal.exit_layers(scores, point["threshold"], point["min_layer"])
        assert point["mean_checks"] == float((np.minimum(exits, L - 1) - point["min_layer"] + 1).mean())
    # A CRF's chain starts at layer 1 whatever min_layer is: every layer up to its exit is read.
    chain = cal.calibrate(data, scores, tolerance=0.0, check_cost=0.05, chain_start=1)
    exits = cal.exit_layers(scores, chain["threshold"], chain["min_layer"])
    assert chain["mean_checks"] == float(np.minimum(exits, L - 1).mean())


def _tiny_model_policies(tiny_models, tmp_path):
    """Train svm/crf files for the tiny llama on synthetic features; run each through the engine."""
    from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch

    model = tiny_models["llama"]
    ident = EarlyExitEngine(model, build_policy("full", {})).stack.identity()
    data = synthetic_data(40)
    data.meta["model"] = {"name": ident.name, "model_type": ident.model_type, "num_layers": ident.num_layers,
                          "hidden_size": ident.hidden_size, "vocab_size": ident.vocab_size}
    n_layers = ident.num_layers
    data.feats, data.choice, data.top1 = data.feats[:, :n_layers], data.choice[:, :n_layers], data.top1[:, :n_layers]
    y = td.make_labels(data, "final", "option")
    for kind in ("svm", "crf"):
        params, point = fitting.fit_policy(data, y, kind, COLS, 0.01, 3, 0)
        point["min_layer"] = 1
        meta = tr.policy_meta(kind, data, params, point, list(FEATURE_NAMES), {"mode": "final"}, {}, {"tolerance": 0.01})
        path = tr.write_policy(tmp_path / kind, kind, meta, params)[0]
        engine = EarlyExitEngine(model, build_policy(str(path), {}))
        batch = ExitBatch.from_rows([[5, 6, 7, 8, 9], [5, 6, 7, 10], [11, 12, 13]], [3, 2, 1], [0, 0, 1])
        out = engine.run(batch)
        assert out.exit_layers[0] == out.exit_layers[1]  # a group shares its decision
        assert all(1 <= e <= n_layers for e in out.exit_layers)
    return tmp_path


def test_engine_runs_a_learned_policy_on_a_tiny_model(tiny_models, tmp_path):
    _tiny_model_policies(tiny_models, tmp_path)


def test_backend_takes_a_policy_path(tiny_model_dirs, tiny_models, tmp_path):
    from lm_eval.api.instance import Instance

    from adainfer_lmeval.adapter.backend import AdaInferLM

    folder = _tiny_model_policies(tiny_models, tmp_path)
    for kind in ("svm", "crf"):
        lm = AdaInferLM(pretrained=str(tiny_model_dirs["llama"]), device="cpu", batch_size=4,
                        policy=str(folder / kind / f"{kind}.json"))
        assert lm.exit_policy.kind == kind
        reqs = [Instance("loglikelihood", {}, ("question : what is the answer ? answer :", c), idx=i)
                for i, c in enumerate([" yes", " no", " maybe"])]
        out = lm.loglikelihood(reqs)
        assert len({r.exit.layers for r in out}) == 1  # one question: one exit


def test_policy_list_command(trained, monkeypatch, capsys):
    root, _, _ = trained
    monkeypatch.setenv("ADAINFER_POLICIES", str(root))
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "svm.json").write_text("{")
    assert policy_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "svm" in out and "crf" in out and "BROKEN" in out


@pytest.mark.real
def test_shipped_svm_runs_on_smollm2_arc():
    """policy=svm on smollm2-135m loads policies/smollm2-135m/svm.json and scores ARC requests."""
    from adainfer_lmeval.experiments.task_documents import load_tasks
    from adainfer_lmeval.adapter.backend import AdaInferLM

    assert policy_files.shipped_path("smollm2-135m", "svm").exists(), "the smollm2-135m SVM policy is not shipped"
    lm = AdaInferLM(pretrained="smollm2-135m", policy="svm", device="cpu", batch_size=8)
    assert lm.exit_policy.source.endswith("smollm2-135m/svm.json")
    assert lm.get_model_info()["adainfer"]["policy"]["kind"] == "svm"
    task = load_tasks(["arc_easy"])["arc_easy"]
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(samples=[0, 1, 2], rank=0, world_size=1)
    results = lm.loglikelihood(task.instances)
    assert len(results) == len(task.instances)
    layers = [r.exit.layers for r in results]
    assert all(1 <= x <= 30 for x in layers)
    per_doc = {}
    for instance, result in zip(task.instances, results):  # the options of a document share one exit
        per_doc.setdefault(instance.doc_id, set()).add(result.exit.layers)
    assert len(per_doc) == 3 and all(len(found) == 1 for found in per_doc.values())
    assert all(isinstance(r[0], float) for r in results)
    # The file at the never-exit point (min_layer = L, where training writes it when nothing passes):
    # full depth's answers and FLOPs, no check paid.
    never = AdaInferLM(pretrained="smollm2-135m", policy="svm", min_layer=30, device="cpu", batch_size=8)
    never_results = never.loglikelihood(task.instances)
    full = AdaInferLM(pretrained="smollm2-135m", policy="full", device="cpu", batch_size=8).loglikelihood(task.instances)
    assert [r.exit.layers for r in never_results] == [30] * len(results) and all(r.exit.checks == 0 for r in never_results)
    assert [r.exit.flops for r in never_results] == [r.exit.flops for r in full]
    assert [tuple(r[:2]) for r in never_results] == [tuple(r[:2]) for r in full]


# ---- the operating point under the guarantee ---------------------------------------------------


def binomial_upper_bound(changed: int, n: int, confidence: float = 0.95) -> float:
    """The Clopper-Pearson bound found from its definition: the p at which seeing <= ``changed``
    changes in ``n`` has probability 1 - confidence (independent of calibration.py's beta quantile)."""
    from scipy.optimize import brentq
    from scipy.stats import binom

    return brentq(lambda p: binom.cdf(changed, n, p) - (1 - confidence), 1e-12, 1 - 1e-12, xtol=1e-14)


def ladder_data(n: int = 300, changers: int = 30) -> tuple[td.Data, np.ndarray]:
    """``n`` documents whose answer at layers 1..3 differs from full depth for the ``changers``
    with the lowest scores (score 0.10, 0.11, ... for them, 0.9 for the rest, the same at every
    layer) and equals it from layer 4 on."""
    choice = np.zeros((n, L), dtype=int)
    choice[:changers, :3] = 1
    u = np.full(n, 0.9)
    u[:changers] = 0.10 + 0.01 * np.arange(changers)
    meta = {"model": IDENTITY.__dict__, "data_sha256": "0" * 64, "parts": []}
    data = td.Data(np.zeros((n, L, 1)), np.zeros((n, L), dtype=int), choice, np.zeros(n, dtype=int), np.zeros(n, dtype=int),
                   [f"t:{i}" for i in range(n)], ["t"] * n, np.zeros(n, dtype=int), np.full(n, 2), meta, ("margin",))
    return data, np.repeat(u[:, None], L - 1, 1)


def test_the_bound_is_clopper_pearson():
    assert cal.changed_upper_bound(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300), abs=1e-12)
    assert round(cal.changed_upper_bound(0, 300), 5) == 0.00994
    for changed, n, confidence in ((0, 100, 0.95), (1, 300, 0.95), (3, 300, 0.95), (4, 300, 0.95), (2, 50, 0.9)):
        assert cal.changed_upper_bound(changed, n, confidence) == pytest.approx(
            binomial_upper_bound(changed, n, confidence), abs=1e-9)
    assert cal.passes_guarantee(0, 299, 0.01) and not cal.passes_guarantee(0, 298, 0.01)  # n >= ln 0.05 / ln 0.99 = 298.1
    assert cal.passes_guarantee(3, 300, 0.03) and not cal.passes_guarantee(4, 300, 0.03)


PATH_CONFIDENCE = 1 - 0.05 / (L - 1)  # 95% over the L - 1 min_layer paths (Bonferroni)


@pytest.mark.parametrize("max_changed, allowed", [(0.01, 0), (0.025, 6)])
def test_the_guarantee_picks_the_cheapest_passing_point(max_changed, allowed):
    """Each of the 5 min_layer paths is tested at 99%: 0 of 600 changed passes δ = 0.01 (bound
    0.0076) and 1 does not (0.0110); δ = 0.025 allows 6 (0.0241) but not 7 (0.0265). The cheapest
    point exits the 570 settled documents and the ``allowed`` highest-scored changers at layer 1,
    and sends the other changers to full depth."""
    data, scores = ladder_data(n=600)
    point = cal.calibrate(data, scores, criterion="guarantee", max_changed=max_changed, n_thresholds=1000)
    exits = cal.exit_layers(scores, point["threshold"], point["min_layer"])
    assert point["min_layer"] == 1 and point["passed"]
    assert (exits == 1).sum() == 570 + allowed and (exits == L).sum() == 30 - allowed
    assert point["calibration_changed"] == allowed and point["calibration_docs"] == 600
    assert point["changed_upper_bound"] == pytest.approx(binomial_upper_bound(allowed, 600, PATH_CONFIDENCE), abs=1e-9)
    assert point["changed_upper_bound"] <= max_changed < binomial_upper_bound(allowed + 1, 600, PATH_CONFIDENCE)
    assert point["mean_exit_layer"] == pytest.approx(((570 + allowed) * 1 + (30 - allowed) * L) / 600)


def test_the_best_of_the_min_layer_paths_is_corrected_for():
    """0 of 300 changed would pass δ = 0.01 for one path at 95% (0.00994), but not for the best of
    5 paths, each tested at 99% (0.0152): the never-exit point."""
    data, scores = ladder_data(n=300, changers=0)
    point = cal.calibrate(data, scores, criterion="guarantee", max_changed=0.01, n_thresholds=1000)
    assert cal.passes_guarantee(0, 300, 0.01, 0.95) and not point["passed"]
    assert point["path_confidence"] == pytest.approx(PATH_CONFIDENCE)
    assert point["changed_upper_bound"] == pytest.approx(binomial_upper_bound(0, 300, PATH_CONFIDENCE), abs=1e-9)


def test_the_empirical_criterion_stays_selectable():
    """``agreement`` at 3% takes 9 changed answers of 300 (3% observed), where the guarantee at
    δ = 3% takes 3 (bound 2.6%); the default of calibrate is still ``accuracy``."""
    data, scores = ladder_data()
    empirical = cal.calibrate(data, scores, criterion="agreement", tolerance=0.03, n_thresholds=1000)
    assert empirical["calibration_changed"] == 9 and empirical["tolerance"] == 0.03 and "passed" not in empirical
    assert cal.calibrate(data, scores)["criterion"] == "accuracy"


def test_a_guarantee_path_ends_at_its_first_failure():
    """Fixed-sequence testing: past a failing threshold, a lower one that happens to pass is not taken.

    Document 0 scores 0.95 at layer 2, where its answer differs from full depth, and 0.5 at
    layer 1, where it does not; every other score is 0.9 and every other answer settled. From
    min_layer 1 or 2, the thresholds above 0.9 fail (document 0 changes at layer 2), so the
    threshold 0.5, which would pass with every document at layer 1, is never reached; the
    cheapest point left is min_layer 3."""
    data, scores = ladder_data(n=600, changers=0)
    data.choice[0, 1] = 1
    scores[0, 0], scores[0, 1] = 0.5, 0.95
    point = cal.calibrate(data, scores, criterion="guarantee", max_changed=0.01, n_thresholds=1000)
    assert point["passed"] and point["min_layer"] == 3 and point["calibration_changed"] == 0
    assert (cal.exit_layers(scores, point["threshold"], point["min_layer"]) == 3).all()
    unguarded = cal.calibrate(data, scores, criterion="agreement", tolerance=0.0, n_thresholds=1000)
    assert unguarded["min_layer"] == 1 and unguarded["mean_exit_layer"] == 1  # what the fixed sequence refuses


def test_too_few_documents_for_the_guarantee_keep_full_depth():
    """0 of 100 changed bounds the rate at 0.0295 even for one path at 95%: nothing passes δ = 0.01,
    the never-exit point."""
    data, scores = ladder_data(n=100, changers=0)
    point = cal.calibrate(data, scores, criterion="guarantee", max_changed=0.01)
    assert not point["passed"] and point["calibration_changed"] == 0
    assert point["changed_upper_bound"] == pytest.approx(binomial_upper_bound(0, 100, PATH_CONFIDENCE), abs=1e-9)
    assert (cal.exit_layers(scores, point["threshold"], point["min_layer"]) == L).all()
    assert point["min_layer"] == L and point["mean_checks"] == 0  # stops nowhere, so consults nothing
    chain = cal.calibrate(data, scores, criterion="guarantee", max_changed=0.01, chain_start=1)
    assert chain["min_layer"] == L and chain["mean_checks"] == 0  # a CRF's chain too
    assert "never exits" in tr._operating_point_line("svm", point)


def test_a_document_under_several_shot_settings_counts_once():
    """Two rows of one document (0- and 3-shot) are one calibration document, changed if either is."""
    data, scores = ladder_data(n=300, changers=1)
    data.keys[1] = data.keys[0]  # rows 0 (a changer) and 1 (settled) are one document
    point = cal.calibrate(data, scores, criterion="agreement", tolerance=1.0)
    assert point["calibration_docs"] == 299 and point["calibration_changed"] == 1 and point["changed_rate"] == 1 / 300


def test_a_guarantee_file_records_its_evidence_and_round_trips(tmp_path):
    data = synthetic_data(80, seed=1)
    y = td.make_labels(data, "final", "option")
    params, point = fitting.fit_policy(data, y, "svm", COLS, 0.01, 3, 0, criterion="guarantee", max_changed=0.05,
                                       confidence=0.9)
    meta = tr.policy_meta("svm", data, params, point, list(FEATURE_NAMES), {"mode": "final"}, {}, {"tolerance": 0.01})
    path = tr.write_policy(tmp_path, "svm", meta, params)[0]
    stored = read_policy(path)[1]["operating_point"]
    assert stored["criterion"] == "guarantee" and stored["max_changed"] == 0.05 and stored["confidence"] == 0.9
    assert stored["calibration_docs"] == 80 and stored["calibration_changed"] == point["calibration_changed"]
    assert stored["changed_upper_bound"] == cal.changed_upper_bound(point["calibration_changed"], 80, 1 - 0.1 / (L - 1))
    assert stored["path_confidence"] == pytest.approx(1 - 0.1 / (L - 1))
    assert stored["passed"] == (stored["changed_upper_bound"] <= 0.05)
    assert "tolerance" not in stored
    policy = build_policy(str(path), {})
    assert (policy.threshold, policy.min_layer) == (point["threshold"], point["min_layer"])
    for key, value in (("confidence", 1.5), ("calibration_changed", 81), ("max_changed", 0.0)):
        bad = json.loads(path.read_text())
        bad["operating_point"][key] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        _one_line_error(lambda: build_policy(str(tmp_path / "bad.json"), {}), f"operating_point '{key}'")


# ---- policies over the answer-option signals -------------------------------------------------


def with_option_signals(data: td.Data, seed: int = 0) -> td.Data:
    """``data`` with margin (high where the layer holds the final answer), option_change and
    option_kl (NaN at layer 1, as collected) after the paper's features."""
    rng = np.random.default_rng(seed)
    settled = data.choice == data.choice[:, -1:]
    margin = np.where(settled, 0.6, 0.1) + 0.3 * rng.random(settled.shape)
    change = np.full(settled.shape, np.nan)
    change[:, 1:] = (data.choice[:, 1:] != data.choice[:, :-1]).astype(float)
    kl = np.full(settled.shape, np.nan)
    kl[:, 1:] = change[:, 1:] * rng.random((len(settled), L - 1))
    feats = np.concatenate([data.feats, np.stack([margin, change, kl], -1)], -1)
    return dataclasses.replace(data, feats=feats, feature_names=FEATURE_NAMES + td.OPTION_SIGNALS)


def test_option_signals_are_the_cores():
    """The collected option logits give the signals the engine's own functions compute."""
    from adainfer_lmeval.core.options import option_kl, option_margin, option_probs

    logits = [[[2.0, 0.5, -1.0], [0.0, 3.0, 0.0], [0.1, 3.2, 0.0]], [[1.0, 1.0], [4.0, -4.0], [-1.0, 2.0]]]
    columns = td.option_signal_columns(logits)
    assert td.OPTION_SIGNALS == ("margin", "option_change", "option_kl") and columns.shape == (2, 3, 3)
    for i, per_layer in enumerate(logits):
        x = torch.tensor(per_layer)
        valid = torch.ones_like(x, dtype=torch.bool)
        probs = option_probs(x, valid)
        assert np.allclose(columns[i, :, 0], option_margin(probs, valid).numpy())
        assert np.allclose(columns[i, 1:, 2], option_kl(probs[1:], probs[:-1], valid[1:]).numpy())
        assert np.isnan(columns[i, 0, 1:]).all()
    assert columns[0, 1:, 1].tolist() == [1.0, 0.0] and columns[1, 1:, 1].tolist() == [0.0, 1.0]  # argmax moves


def test_an_svm_reading_option_signals_declares_them(tmp_path):
    data = with_option_signals(synthetic_data(60))
    names = ["gap", "margin", "option_change"]
    cols = data.columns(names)
    y = td.make_labels(data, "final", "option")
    params, point = fitting.fit_policy(data, y, "svm", cols, 0.01, 3, 0, criterion="agreement")
    assert np.isfinite(params.coef).all() and np.isfinite(params.mean).all()  # NaN at layer 1 sits at the mean
    path = tr.write_policy(tmp_path, "svm", tr.policy_meta("svm", data, params, point, names, {}, {}, {}), params)[0]
    policy = build_policy(str(path), {"min_layer": 3})
    assert policy.features == tuple(names)
    # option_change at layer 3 compares with layer 2: the policy consults layer 2 (and stops nowhere there)
    assert [policy.consults_at(layer, L) for layer in range(1, L + 1)] == [False, True, True, True, True, False]
    history = torch.full((len(data.keys), L + 1, len(names)), float("nan"))
    history[:, 1:] = torch.tensor(data.feats[:, :, cols])
    assert not policy.decide(2, L, history[:, :3]).any()
    offline = fitting.classifier_scores(params, data, cols)[:, 2] >= policy.threshold
    assert torch.equal(policy.decide(3, L, history[:, :4]), torch.from_numpy(offline)) and offline.any()
    unknown = json.loads(path.read_text())
    unknown["features"] = ["gap", "no_such_signal", "option_change"]
    (tmp_path / "unknown.json").write_text(json.dumps(unknown))
    _one_line_error(lambda: build_policy(str(tmp_path / "unknown.json"), {}), "subset of p1, gap.*margin")


def margin_file(tmp_path, data: td.Data, **choose) -> tuple[Path, dict]:
    """margin.json as train --kinds margin writes it, for ``data``."""
    cols = data.columns(["margin"])
    params, point = fitting.fit_policy(data, td.make_labels(data, "final", "option"), "margin", cols, 0.01, 3, 0, **choose)
    meta = tr.policy_meta("margin", data, params, point, ["margin"], {"mode": "final"}, {}, {"tolerance": 0.01})
    return tr.write_policy(tmp_path, "margin", meta, params)[0], point


def test_a_margin_file_holds_only_its_operating_point(tmp_path):
    from adainfer_lmeval.policies.rules import OptionMargin

    data = with_option_signals(synthetic_data(80, seed=2))
    path, point = margin_file(tmp_path, data, criterion="agreement", check_cost=0.05)
    meta = json.loads(path.read_text())
    assert meta["kind"] == "margin" and meta["features"] == ["margin"] and "scaler" not in meta and "label" not in meta
    policy = build_policy("file", {"path": str(path)})
    assert isinstance(policy, OptionMargin) and policy.features == ("margin",)
    assert (policy.margin, policy.min_layer) == (point["threshold"], point["min_layer"])
    policy.bind(IDENTITY)
    assert policy.describe()["file"] == str(path) and policy.describe()["kind"] == "margin"
    # its operating point is the rule's on the calibration margins
    margins = data.feats[:, : L - 1, data.columns(["margin"])[0]]
    rule_exits = cal.exit_layers(margins, point["threshold"], point["min_layer"])
    assert point["mean_exit_layer"] == rule_exits.mean() < L
    # nothing passes on 80 documents at δ = 0.01: the never-exit point, capped at the margin's ceiling 1
    never, point = margin_file(tmp_path / "never", data, criterion="guarantee")
    assert not point["passed"] and point["threshold"] == 1.0 and build_policy(str(never), {}).margin == 1.0
    row = policy_cli._row(never, json.loads(never.read_text()))
    assert row[2] == "-" and row[7] == f"thr=1 min_layer={L}, none passed <=1% changed at 95% (n=80): never exits"
    _one_line_error(lambda: policy.bind(ModelIdentity("toy", "llama", L + 1, 32, 300)), "does not fit")


def test_a_margin_file_runs_as_the_margin_rule_in_the_engine(tiny_models, tmp_path):
    """The same exits as policy=margin,margin=τ,min_layer=m on a batch of answer options."""
    from adainfer_lmeval.adapter import request_encoding
    from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch

    model = tiny_models["llama"]
    ident = EarlyExitEngine(model, build_policy("full", {})).stack.identity()
    data = with_option_signals(synthetic_data(40))
    data.meta["model"] = {k: getattr(ident, k) for k in ("name", "model_type", "num_layers", "hidden_size", "vocab_size")}
    n_layers = ident.num_layers
    data = dataclasses.replace(data, feats=data.feats[:, :n_layers], choice=data.choice[:, :n_layers],
                               top1=data.top1[:, :n_layers])
    path, _ = margin_file(tmp_path, data, criterion="agreement")
    g = torch.Generator().manual_seed(0)
    pairs, keys = [], []
    for key, options in enumerate([[[7, 8], [7, 9]], [[12], [13], [15]], [[20, 21], [22]], [[40], [41]]] * 3):
        context = torch.randint(50, 250, (6,), generator=g).tolist()
        pairs += [(context, option) for option in options]
        keys += [key] * len(options)
    (encoded,) = list(request_encoding.encode(pairs, max_length=64, keys=keys).batches(rows_per_batch=64))
    batch = ExitBatch.from_rows(encoded.tokens, encoded.decisions, encoded.row_groups,
                                options=encoded.option_tokens, margin_offsets=encoded.margin_offsets)
    seen = set()
    for margin in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 1.0):
        for min_layer in (1, 2):
            from_file = EarlyExitEngine(model, build_policy(str(path), {"threshold": margin, "min_layer": min_layer}))
            rule = EarlyExitEngine(model, build_policy("margin", {"margin": margin, "min_layer": min_layer}))
            exits = from_file.run(batch).exit_layers
            assert list(exits) == list(rule.run(batch).exit_layers)
            seen.add(tuple(exits))
    assert len(seen) > 2  # the thresholds tried stop different rows at different layers


def write_collection(path: Path, data: td.Data, option_logits: np.ndarray) -> Path:
    """``data`` as a collected parquet file (the collector's table and metadata), with the
    options' logits [N, L, K] at the margin position."""
    import pyarrow.parquet as pq

    from adainfer_lmeval.experiments.collect import SCHEMA_VERSION, Example, examples_table

    examples = []
    for i, key in enumerate(data.keys):
        task, doc = key.split(":")
        option_ll = [[0.0 if j == data.choice[i, layer] else -1.0 for j in range(4)] for layer in range(L)]
        examples.append(Example(task, int(doc), 0, [[1, 2, 10 + j] for j in range(4)], [1] * 4, [[10 + j] for j in range(4)],
                                int(data.gold[i]), source=task, features=data.feats[i].tolist(),
                                top1=data.top1[i].tolist(), option_ll=option_ll,
                                option_logits=option_logits[i].tolist()))
    meta = {"schema_version": SCHEMA_VERSION, "model": data.meta["model"], "feature_names": list(FEATURE_NAMES),
            "data_sha256": "1" * 64, "parts": [], "fewshot_seed": 1234}
    pq.write_table(examples_table(examples).replace_schema_metadata({b"adainfer": json.dumps(meta).encode()}), path)
    return path


def test_train_command_fits_svm_on_the_margin_and_a_margin_file(tmp_path, capsys):
    """From a collection: the loader derives the option signals, the SVM reads the ones named,
    margin.json holds the margin rule's point; too few documents for δ = 1% is said in one line."""
    data = synthetic_data(60, seed=4)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, L, 4))
    logits[np.arange(60)[:, None], np.arange(L)[None, :], data.choice] += 3.0  # the layer's choice leads
    path = write_collection(tmp_path / "toy.parquet", data, logits)
    loaded = td.load_data(path)
    assert loaded.feature_names == FEATURE_NAMES + td.OPTION_SIGNALS
    assert np.allclose(loaded.feats[:, :, : len(FEATURE_NAMES)], data.feats, atol=1e-6)
    assert np.allclose(loaded.feats[:, :, loaded.columns(["margin"])[0]], td.option_signal_columns(logits.tolist())[:, :, 0])
    out = tmp_path / "out"
    assert tr.main(["--features", str(path), "--kinds", "svm,margin", "--use-features", "gap,margin,option_kl",
                    "--no-study", "--folds", "2", "--inner-folds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("no operating point keeps the changed answers <= 1% at 95% confidence") == 2
    svm_meta = json.loads((out / "svm.json").read_text())
    assert svm_meta["features"] == ["gap", "margin", "option_kl"]
    assert svm_meta["operating_point"]["calibration_docs"] == 60 and not svm_meta["operating_point"]["passed"]
    assert build_policy(str(out / "margin.json"), {}).features == ("margin",)
    assert tr.main(["--features", str(path), "--kinds", "margin", "--max-changed", "0.2", "--out", str(out / "loose"),
                    "--no-study", "--folds", "2"]) == 0
    loose = json.loads((out / "loose" / "margin.json").read_text())["operating_point"]
    assert loose["passed"] and loose["changed_upper_bound"] <= 0.2 and loose["max_changed"] == 0.2
    assert tr.main(["--features", str(path), "--use-features", "gap,nothing", "--out", str(out)]) == 2
    assert "no signal nothing" in capsys.readouterr().err


def test_an_svm_on_option_signals_exits_online_where_training_says(tiny_models, tmp_path):
    """Offline: the option signals derived from the traced option logits, as the loader derives
    them from a collection; online: the engine computing them. The SVM's exits agree, its first
    decision (min_layer 2) reading option_change against layer 1, which it consults for that."""
    from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch

    model = tiny_models["llama"]
    engine = EarlyExitEngine(model, build_policy("full", {}))
    ident = engine.stack.identity()
    n_layers = ident.num_layers
    g = torch.Generator().manual_seed(1)
    rows, decisions, groups, options = [], [], [], []
    for group in range(24):
        context = torch.randint(50, 250, (6,), generator=g).tolist()
        tokens = torch.randperm(40, generator=g)[: 2 + group % 3].add(10).tolist()
        options.append(tokens)
        for token in tokens:
            rows.append(context + [token])
            decisions.append(len(context) - 1)
            groups.append(group)
    batch = ExitBatch.from_rows(rows, decisions, groups, options=options, margin_offsets=[0] * len(options))
    first_row = [groups.index(group) for group in range(len(options))]
    paper, option_logits = [], [[] for _ in options]
    for view in engine.trace(batch):
        paper.append(view.features[first_row].double().numpy())
        for group, tokens in enumerate(options):
            option_logits[group].append([float(view.logits[first_row[group] + j][0, token]) for j, token in enumerate(tokens)])
    n = len(options)
    feats = np.concatenate([np.stack(paper, 1), td.option_signal_columns(option_logits)], -1)
    data = td.Data(feats, np.zeros((n, n_layers), dtype=int), np.zeros((n, n_layers), dtype=int), np.zeros(n, dtype=int),
                   np.zeros(n, dtype=int), [f"t:{i}" for i in range(n)], ["t"] * n, np.zeros(n, dtype=int),
                   np.array([len(t) for t in options]), {"model": {k: getattr(ident, k) for k in
                   ("name", "model_type", "num_layers", "hidden_size", "vocab_size")}}, FEATURE_NAMES + td.OPTION_SIGNALS)
    names = ["margin", "option_change", "gap"]
    cols = data.columns(names)
    settled = feats[:, : n_layers - 1, cols[1]] == 0  # the options' argmax did not move: an SVM leaning on option_change
    params = fitting.fit_classifier("svm", data, settled, cols)
    scores = fitting.classifier_scores(params, data, cols)
    seen = set()
    for quantile in (0.3, 0.5, 0.7):
        threshold = float(np.quantile(scores[:, 1:], quantile))
        point = {"threshold": threshold, "min_layer": 2, "acc": 0, "full_acc": 0, "mean_exit_layer": 0, "mean_checks": 0,
                 "check_cost": 0, "criterion": "agreement", "tolerance": 0}
        path = tr.write_policy(tmp_path / str(quantile), "svm", tr.policy_meta("svm", data, params, point, names, {}, {}, {}),
                               params)[0]
        online = EarlyExitEngine(model, build_policy(str(path), {})).run(batch).exit_layers
        offline = cal.exit_layers(scores, threshold, 2)
        assert [online[row] for row in first_row] == offline.tolist()
        seen.add(tuple(offline.tolist()))
    assert len(seen) == 3 and len(set(offline.tolist())) > 1


@pytest.mark.parametrize("path", sorted(policy_files.policies_dir().glob("*/*.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_file_loads_for_its_model_and_says_what_its_point_is(path):
    """Each shipped file (svm, crf, margin, simlens) reads, builds as its policy for the model named
    in it, reads the signals it lists, and is the never-exit point (min_layer = L: consults nothing)
    exactly where its calibration says no point passed the guarantee."""
    kind, meta = read_policy(path)
    assert path.parent.name == meta["model"]["name"] and path.stem == meta["kind"]
    policy = build_policy(str(path), {})
    assert list(policy.features) == meta["features"]
    if meta["kind"] == "simlens":
        assert policy.exit_readout == "continuation" and meta["features"] == ["continuation_margin"]
    point = meta["operating_point"]
    L = meta["model"]["num_layers"]
    assert (meta["min_layer"] == L) == (point["criterion"] == "guarantee" and not point["passed"])
    if point["criterion"] == "guarantee":
        assert point["max_changed"] == 0.01 and point["calibration_docs"] > 0
        rate = point["calibration_changed"] / point["calibration_docs"]
        assert rate <= point["changed_upper_bound"] and point["passed"] == (point["changed_upper_bound"] <= 0.01)


@pytest.mark.parametrize("folder", sorted(p for p in policy_files.policies_dir().iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_a_models_shipped_files_come_from_one_collection(folder):
    """svm/crf/margin and the later simlens file of a model were fitted on the same token rows
    (the simlens files re-collected them: the collection is reproducible, policies/README.md)."""
    hashes = {path.name: read_policy(path)[1]["training"]["data_sha256"] for path in folder.glob("*.json")}
    assert len(hashes) >= 3 and len(set(hashes.values())) == 1, hashes
