"""The learned kinds' torch scoring against the old way: crfsuite's own prefix marginals, the SVM from JSON.

The CRF's score at layer l is the forward algorithm's normalised alpha at l, carried from layer
to layer; crfsuite tags the prefix 1..l and reads its marginal at the last position. Both must
agree on the shipped CRFs and on a freshly trained one, and the shipped SVMs and CRFs must make
the same decisions as computed the old way, layer by layer, with stopped rows leaving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycrfsuite
import pytest
import torch

from adainfer_lmeval.paths import shipped_dir
from adainfer_lmeval.policies.learned.base import LearnedPolicy, read_policy
from adainfer_lmeval.policies.learned.crf import CrfKind, crf_item
from adainfer_lmeval.policies import files as policy_files
from adainfer_lmeval.policies import ModelIdentity, build_policy

from conftest import POLICIES_BEFORE_OPTION_SIGNALS

SHIPPED = shipped_dir("policies")
FOLDERS = sorted(p.parent for p in [*SHIPPED.glob("*/crf.json"), *POLICIES_BEFORE_OPTION_SIGNALS.glob("*/crf.json")])
FOLDER_IDS = [f"{f.parent.name}/{f.name}" for f in FOLDERS]


def random_features(meta: dict, rows: int, layers: int, seed: int) -> torch.Tensor:
    """Raw features around the policy's training distribution (scaler mean ± 1.5 scale)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(meta["scaler"]["mean"], dtype=torch.float64)
    scale = torch.tensor(meta["scaler"]["scale"], dtype=torch.float64)
    return (mean + 1.5 * scale * torch.randn(rows, layers, len(mean), generator=g, dtype=torch.float64)).float()


def crfsuite_prefix_marginals(model_bytes: bytes, meta: dict, x: torch.Tensor) -> np.ndarray:
    """P(stop at t | layers 0..t) for every t, by crfsuite tagging each prefix (the old scorer)."""
    tagger = pycrfsuite.Tagger()
    tagger.open_inmemory(model_bytes)
    mean = np.array(meta["scaler"]["mean"])
    scale = np.array(meta["scaler"]["scale"])
    z = (x.double().numpy() - mean) / scale
    out = np.zeros(x.shape[:2])
    for r in range(x.shape[0]):
        for t in range(x.shape[1]):
            tagger.set([crf_item(v) for v in z[r, : t + 1]])
            out[r, t] = tagger.marginal("stop", t)
    tagger.close()
    return out


def old_svm_scores(meta: dict, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(meta["scaler"]["mean"], dtype=torch.float64)
    scale = torch.tensor(meta["scaler"]["scale"], dtype=torch.float64)
    coef = torch.tensor(meta["coef"], dtype=torch.float64)
    return (x.double() - mean) / scale @ coef + float(meta["intercept"])


@pytest.mark.parametrize("folder", FOLDERS, ids=FOLDER_IDS)
def test_forward_marginals_equal_crfsuite_on_shipped_crfs(folder):
    path = folder / "crf.json"
    kind, meta = read_policy(path)
    crf = kind.from_dict(meta, path)
    # 64 rows: a CRF fitted on few examples (Qwen-1.5B's 70) puts most prefixes above 0.5
    x = random_features(meta, rows=64, layers=meta["model"]["num_layers"] - 1, seed=1)
    ours = crf.decision_function(x).numpy()
    theirs = crfsuite_prefix_marginals(crf.model_bytes, meta, x)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-5
    assert theirs.min() < 0.5 < theirs.max()  # the batch exercises both labels


def test_forward_marginals_equal_crfsuite_on_a_fresh_crf():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 9, 3))
    y = (x[:, :, 0] + 0.5 * np.cumsum(x[:, :, 1], 1) > 0.3)
    crf = CrfKind().fit(x, y, max_iterations=50)
    meta = crf.to_dict()
    weights = crf.tensors("cpu")
    assert weights["transitions"].abs().sum() > 0 and weights["emission"].abs().sum() > 0
    probe = torch.tensor(rng.normal(size=(5, 12, 3)) * 2)
    ours = crf.decision_function(probe).numpy()
    theirs = crfsuite_prefix_marginals(crf.model_bytes, meta, probe)
    assert np.abs(ours - theirs).max() < 1e-5


def run_layers(policy, x: torch.Tensor, num_layers: int) -> tuple[list[int], dict]:
    """Exit layers of rows with layer features x [rows, num_layers - 1, F], consulting as the exit step does:
    the history holds every layer so far, stopped rows leave. Also {layer: stop mask of the rows there}."""
    rows = x.shape[0]
    history = torch.full((rows, num_layers + 1, x.shape[2]), float("nan"))
    alive = torch.arange(rows)
    exits, masks = [num_layers] * rows, {}
    for layer in range(1, num_layers):
        if not policy.consults_at(layer, num_layers):
            continue
        history[alive, layer] = x[alive, layer - 1]
        stop = policy.decide(layer, num_layers, history[alive, : layer + 1])
        masks[layer] = (alive.tolist(), stop.tolist())
        for r in alive[stop].tolist():
            exits[r] = layer
        alive = alive[~stop]
        if alive.numel() == 0:
            break
    return exits, masks


def old_exits(kind: str, meta: dict, path: Path, x: torch.Tensor, num_layers: int) -> list[int]:
    """The first layer >= min_layer whose old-way score reaches the threshold."""
    if kind == "svm":
        scores = old_svm_scores(meta, x).numpy()
    else:
        model_bytes = (path.parent / meta["crfsuite_file"]).read_bytes()
        scores = crfsuite_prefix_marginals(model_bytes, meta, x)
    stop = scores >= meta["threshold"]
    stop[:, : meta["min_layer"] - 1] = False
    return [int(np.argmax(s)) + 1 if s.any() else num_layers for s in stop]


@pytest.mark.parametrize("kind", ["svm", "crf"])
@pytest.mark.parametrize("folder", FOLDERS, ids=FOLDER_IDS)
def test_shipped_policies_decide_as_before(folder, kind):
    """At the stored point, and at a threshold where some rows stop (from the next-to-last layer
    where the stored point is the never-exit one, min_layer = L)."""
    path = folder / f"{kind}.json"
    meta = read_policy(path)[1]
    num_layers = meta["model"]["num_layers"]
    identity = ModelIdentity(**{k: meta["model"][k] for k in ("name", "model_type", "num_layers", "hidden_size",
                                                              "vocab_size")})
    x = random_features(meta, rows=16, layers=num_layers - 1, seed=7)
    min_layer = min(meta["min_layer"], num_layers - 1)
    median = float(np.median(old_scores_at_min_layer(kind, meta, path, x, min_layer)))
    for args in ({}, {"threshold": median, "min_layer": min_layer}):
        policy = build_policy(kind, {"path": str(path), **args})
        policy.bind(identity)
        want_meta = {**meta, "threshold": policy.threshold, "min_layer": policy.min_layer}
        want = old_exits(kind, want_meta, path, x, num_layers)
        got, _ = run_layers(policy, x, num_layers)
        assert got == want
        if policy.min_layer == num_layers:
            assert want == [num_layers] * len(x)  # the never-exit point
    assert len(set(want)) > 1  # at the median threshold some rows stop, others go on


def old_scores_at_min_layer(kind, meta, path, x, layer):
    if kind == "svm":
        return old_svm_scores(meta, x[:, layer - 1]).numpy()
    model_bytes = (path.parent / meta["crfsuite_file"]).read_bytes()
    return crfsuite_prefix_marginals(model_bytes, meta, x[:, :layer])[:, -1]


def test_decide_builds_no_tensors_from_lists(monkeypatch):
    """Scoring tensors are built at the first use on a device, then reused at every layer."""
    for kind in ("svm", "crf"):
        path = FOLDERS[0] / f"{kind}.json"
        meta = read_policy(path)[1]
        policy = build_policy(kind, {"path": str(path), "min_layer": 1})
        num_layers = meta["model"]["num_layers"]
        x = random_features(meta, rows=4, layers=num_layers - 1, seed=3)
        run_layers(policy, x, num_layers)  # builds them
        with monkeypatch.context() as m:
            m.setattr(torch, "tensor", lambda *a, **k: pytest.fail("a tensor built from a list while deciding"))
            m.setattr(torch.Tensor, "tolist", lambda *a, **k: pytest.fail("a host copy while deciding"))
            m.setattr(torch.Tensor, "item", lambda *a, **k: pytest.fail("a host copy while deciding"))
            history = torch.zeros(4, num_layers + 1, x.shape[2])
            history[:, 1:num_layers] = x
            for layer in range(1, num_layers):
                policy.decide(layer, num_layers, history[:, : layer + 1])
        assert list(policy.estimator._tensors) == [torch.device("cpu")]


def tiny_crf_policy_file(model, rows, tmp_path: Path, quantile: float) -> Path:
    """A CRF fitted on the tiny model's own features of ``rows`` (labels: p1 above its median), its
    threshold at ``quantile`` of its scores, written as a policy file."""
    from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
    from adainfer_lmeval.core.features import FEATURE_NAMES

    engine = EarlyExitEngine(model, build_policy("full", {}))
    ident = engine.stack.identity()
    batch = ExitBatch.from_rows(rows, [len(r) - 1 for r in rows], list(range(len(rows))))
    views = [view.features.double() for view in engine.trace(batch)][: ident.num_layers - 1]
    x = torch.stack(views, 1).numpy()  # [rows, L-1, F]
    p1 = x[:, :, FEATURE_NAMES.index("p1")]
    crf = CrfKind().fit(x, p1 > np.median(p1), max_iterations=50)
    threshold = float(np.quantile(crf.decision_function(torch.from_numpy(x)).numpy(), quantile))
    meta = {"format": policy_files.FORMAT, "format_version": policy_files.FORMAT_VERSION, "kind": "crf",
            "model": {k: getattr(ident, k) for k in ("name", "model_type", "num_layers", "hidden_size", "vocab_size")},
            "features": list(FEATURE_NAMES), "threshold": threshold, "min_layer": 1, **crf.to_dict()}
    return policy_files.write_policy_files(tmp_path, "crf", meta, crf.files())[0]


@pytest.mark.parametrize("quantile", [0.5, 0.7])
def test_the_carried_chain_equals_a_restarted_one_in_the_engine_and_generation(tiny_models, tmp_path, quantile,
                                                                              monkeypatch):
    """Rows leave between layers in the exit step; the state carried for those that stay is theirs."""
    from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
    from adainfer_lmeval.core.generation import EarlyExitGenerator

    model = tiny_models["llama"]
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 7, 4, 6, 8, 3, 5, 6)]
    path = tiny_crf_policy_file(model, rows, tmp_path, quantile)

    def run():
        engine = EarlyExitEngine(model, build_policy(str(path), {}))
        out = engine.run(ExitBatch.from_rows(rows, [len(r) - 1 for r in rows], list(range(len(rows)))))
        ids = torch.tensor([r[:3] for r in rows])
        gen = EarlyExitGenerator(engine).generate(ids, torch.ones_like(ids), 4, pad_token_id=0)
        return list(out.exit_layers), gen.exit_layers, gen.sequences

    decide = LearnedPolicy.decide

    def recording(states):
        def wrapped(self, layer, num_layers, history):
            stop = decide(self, layer, num_layers, history)
            states.append(self._carry[1].clone())  # the chain's state at this layer, of the rows there
            return stop
        return wrapped

    carried_states, restarted_states = [], []
    with monkeypatch.context() as m:
        m.setattr(LearnedPolicy, "decide", recording(carried_states))
        carried = run()
        m.setattr(LearnedPolicy, "decide", recording(restarted_states))
        m.setattr(LearnedPolicy, "_carried", lambda self, layer, rows: None)  # always restart from the history
        restarted = run()
    assert len(set(carried[0])) > 1  # rows leave at different layers
    assert carried[0] == restarted[0] and carried[1] == restarted[1] and torch.equal(carried[2], restarted[2])
    assert len(carried_states) == len(restarted_states)
    for ours, fresh in zip(carried_states, restarted_states):
        assert ours.shape == fresh.shape and torch.allclose(ours, fresh, rtol=0, atol=1e-12)
