"""SVM/CRF stop classifiers: training, safe files, refusals, causality, registry."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import adainfer_lmeval  # noqa: F401
from adainfer_lmeval.policies import learned as lp  # registers svm / crf / file
from adainfer_lmeval.cli import policy as policy_cli
from adainfer_lmeval.policies import files as policy_files
from adainfer_lmeval.experiments import train as tr
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.policies import ModelIdentity, build_policy

L = 6
IDENTITY = ModelIdentity(name="toy", model_type="llama", num_layers=L, hidden_size=32, vocab_size=300)


def synthetic_data(n: int = 60, seed: int = 0) -> tr.Data:
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
    return tr.Data(feats, top1, choice, gold, 100 + gold, [f"t:{i}" for i in range(n)], ["t"] * n,
                   np.zeros(n, dtype=int), np.full(n, 4), meta)


COLS = list(range(len(FEATURE_NAMES)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """svm.json, crf.json + crf.crfsuite trained on synthetic data, in a policies/toy folder."""
    root = tmp_path_factory.mktemp("policies")
    data = synthetic_data()
    y = tr.make_labels(data, "final", "option")
    out = {}
    for kind in ("svm", "crf"):
        params, point = tr.fit_policy(data, y, kind, COLS, 0.01, 3, 0)
        meta = tr.policy_meta(kind, data, params, point, list(FEATURE_NAMES), {"mode": "final", "prediction": "option"},
                              tr.evaluate(data, np.full(len(data.keys), L)), {"tolerance": 0.01, "tasks": ["t"], "shots": [0]})
        out[kind] = tr.write_policy(root / "toy", kind, meta, params)[0]
    return root, out, data


def test_labels_both_modes():
    data = synthetic_data(10)
    for mode in tr.LABEL_MODES:
        for prediction in tr.PREDICTIONS:
            y = tr.make_labels(data, mode, prediction)
            assert y.shape == (10, L - 1) and y.dtype == bool
    final = tr.make_labels(data, "final", "option")
    assert (final == (data.choice[:, :-1] == data.choice[:, -1:])).all()
    both = tr.make_labels(data, "gold", "both")
    assert (both <= tr.make_labels(data, "gold", "token")).all()


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


def test_policy_path_and_file_resolve(trained):
    _, paths, _ = trained
    assert isinstance(build_policy(str(paths["crf"]), {}), lp.CrfKind.policy)  # policy=<path>.json
    assert isinstance(build_policy("file", {"path": str(paths["svm"])}), lp.SvmKind.policy)


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
    learned, meta = lp.read_policy(paths[kind])
    simulated = tr.exit_layers(tr.classifier_scores(learned.from_dict(meta, paths[kind]), data, COLS), policy.threshold, 1)
    assert exits.tolist() == simulated.tolist()


def test_calibration_keeps_accuracy_within_tolerance():
    data = synthetic_data(80, seed=3)
    y = tr.make_labels(data, "final", "option")
    scores = tr.cross_fitted_scores(data, y, "svm", COLS, 4, 0)
    point = tr.calibrate(data, scores, tolerance=0.01)
    exits = tr.exit_layers(scores, point["threshold"], point["min_layer"])
    result = tr.evaluate(data, exits)
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
    free = tr.calibrate(data, scores, tolerance=0.0)
    charged = tr.calibrate(data, scores, tolerance=0.0, check_cost=0.05)
    assert free["min_layer"] == 1 and free["mean_exit_layer"] == band - (band - 2) / 80
    assert charged["min_layer"] == band and charged["mean_exit_layer"] == band and charged["mean_checks"] == 1
    cost = lambda p: p["mean_exit_layer"] + 0.05 * p["mean_checks"]  # noqa: E731
    assert cost(charged) < cost(free)
    for point in (free, charged):  # mean_checks is what the policy consults
        exits = tr.exit_layers(scores, point["threshold"], point["min_layer"])
        assert point["mean_checks"] == float((np.minimum(exits, L - 1) - point["min_layer"] + 1).mean())
    # A CRF's chain starts at layer 1 whatever min_layer is: every layer up to its exit is read.
    chain = tr.calibrate(data, scores, tolerance=0.0, check_cost=0.05, chain_start=1)
    exits = tr.exit_layers(scores, chain["threshold"], chain["min_layer"])
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
    y = tr.make_labels(data, "final", "option")
    for kind in ("svm", "crf"):
        params, point = tr.fit_policy(data, y, kind, COLS, 0.01, 3, 0)
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
    from adainfer_lmeval.experiments.collect import load_tasks
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
