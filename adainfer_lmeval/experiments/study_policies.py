"""The study's stop policies: how each is fitted, scores a layer and gets its operating point.

Every policy stops at the first layer l >= ``min_layer`` whose score reaches ``threshold``
(:func:`~adainfer_lmeval.experiments.calibration.exit_layers`); they differ in the score:

* ``svm``, ``crf``: AdaInfer's classifiers over the paper's features (p1, gap, entropy, cosine,
  depth), fitted as :mod:`adainfer_lmeval.experiments.fitting` fits the shipped ones (labels
  ``final``/``option``), scored cross-fitted for their operating point;
* ``svm_options``: the same SVM over the paper's features and the answer-option signals
  (margin, option_change, option_kl), the eight signals the shipped ``svm.json`` files read;
* ``threshold``: the gap p1 - p2 of the layer's full-vocabulary distribution (the paper's rule);
* ``margin``: the answer options' margin (:mod:`adainfer_lmeval.core.options`: top minus second
  probability of a softmax over the options' logits where they first differ), ``policy=margin``;
* ``static``: a score of 1 everywhere, so every input exits at ``min_layer``: plain layer pruning.

The SimLens policies answer with the continuation (:mod:`adainfer_lmeval.core.continuation`: the
rows' scored positions carried from the exit layer through the rest alone) instead of the lens,
and pay for it (:func:`policy_readout`): they need the collection's continuation read-out
(:mod:`.collect_continuation`) and are left out where it was not collected.

* ``simlens``: the score is ``continuation_margin`` (the option margin read at the continuation's
  last layer), ``policy=simlens``; every consulted layer's check carries the speaker's tokens;
* ``simlens_static``: every input exits at ``min_layer`` with the continuation's answer (SimLens
  as plain layer pruning, one parameter);
* ``margin_simlens``: the lens ``margin`` decides, the continuation answers (the cheap check, the
  better read-out).

Nothing but the classifiers (:data:`CLASSIFIERS`) is fitted; every policy's (threshold, min_layer) is calibrated on
the training documents under each criterion of
:data:`~adainfer_lmeval.experiments.calibration.CRITERIA`.

Layer mapping across models: every feature is per layer and model-free (p1, gap, entropy,
cosine of consecutive hidden states, *relative* depth l/L, the option margins), so a score
applies to another model's layers unchanged; only ``min_layer`` is a layer count: it is scaled
by relative depth (:func:`map_point`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.calibration import Outcome, Readout, exit_layers
from adainfer_lmeval.experiments.training_data import OPTION_SIGNALS

STUDY_POLICIES = ("svm", "crf", "svm_options", "threshold", "margin", "static", "simlens", "simlens_static",
                  "margin_simlens")
#: the fitted policies (the others are only calibrated): their learned kind and the signals they read
CLASSIFIERS = {"svm": ("svm", FEATURE_NAMES), "crf": ("crf", FEATURE_NAMES),
               "svm_options": ("svm", FEATURE_NAMES + OPTION_SIGNALS)}
SIGNAL_RULES = {"threshold": "gap", "margin": "margin", "margin_simlens": "margin"}  # policy -> the one signal it thresholds
STATIC_RULES = ("static", "simlens_static")  # a score of 1 everywhere: exit at min_layer
CONTINUATION_POLICIES = ("simlens", "simlens_static", "margin_simlens")  # they answer with the continuation
TRAINING_SETTINGS = ("intra", "inter-task", "inter-model")
LABEL = {"mode": "final", "prediction": "option"}


@dataclass(frozen=True)
class CalibrationRules:
    """How operating points are chosen: the empirical ``tolerance`` (1 point / 1% of answers),
    the guarantee's δ (``max_changed``) and ``confidence``, the folds of the held-out scores."""

    tolerance: float = 0.01
    max_changed: float = 0.01
    confidence: float = 0.95
    inner_folds: int = 4
    seed: int = 0


def oracle_exits(data) -> np.ndarray:
    """Per document: the earliest layer after which its answer never changes (hindsight)."""
    from adainfer_lmeval.experiments.oracle import oracle_layer

    return np.array([oracle_layer(row.tolist()) for row in data.choice])


def at_chance(full_acc: float, chance: float, n: int) -> bool:
    """Full depth within two binomial standard errors of chance (the reports' rule, one place)."""
    from adainfer_lmeval.reporting.comparison import at_chance as within_two_stderr, binomial_stderr

    return within_two_stderr(full_acc, chance, binomial_stderr(full_acc, n))


def map_point(point: dict, source_layers: int, target_layers: int) -> dict:
    """An operating point moved to a model of another depth: ``min_layer`` by relative depth.

    The threshold applies to the policy's score, whose features are all per layer and
    model-free (depth is l/L already), so it carries over unchanged. The never-exit point
    (``min_layer`` = L) stays one.
    """
    if point["min_layer"] >= source_layers:
        return {**point, "min_layer": target_layers}
    min_layer = int(round(point["min_layer"] * target_layers / source_layers))
    return {**point, "min_layer": max(1, min(target_layers - 1, min_layer))}


def layer_scores(policy: str, params, data) -> np.ndarray:
    """Scores [N, L-1] of layers 1..L-1 (higher = stop) of ``policy`` (fitted ``params`` for SVM/CRF)."""
    from adainfer_lmeval.experiments.fitting import classifier_scores

    last = data.num_layers - 1
    if policy in CLASSIFIERS:
        return classifier_scores(params, data, data.columns(CLASSIFIERS[policy][1]))
    if policy in STATIC_RULES:
        return np.ones((len(data.keys), last))
    if policy == "simlens":
        return _continuation(data, policy).margin[:, :last]
    return data.feats[:, :last, data.columns([SIGNAL_RULES[policy]])[0]]


def has_readout(policy: str, data) -> bool:
    """Whether ``data`` holds what ``policy`` answers with (the continuation read-out, for those reading it)."""
    return policy not in CONTINUATION_POLICIES or data.continuation is not None


def _continuation(data, policy: str):
    if data.continuation is None:
        raise AdaInferError(f"policy {policy} answers with the continuation: collect its read-out "
                            "(adainfer_lmeval.experiments.collect_continuation) first")
    return data.continuation


def policy_readout(policy: str, data) -> Readout:
    """What ``policy`` answers at each exit layer of ``data``'s documents and what that costs: the
    lens, or for the SimLens policies the continuation (:meth:`Readout.carried`; only
    ``simlens``'s checks carry, the others' checks read the lens)."""
    if policy not in CONTINUATION_POLICIES:
        return Readout.lens(data)
    _continuation(data, policy)  # one line naming what to collect
    return Readout.carried(data, checks=policy == "simlens", answers=True)


def document_outcomes(policy: str, params, data, point: dict) -> Outcome:
    """Per document of ``data``, what ``policy`` (fitted ``params``) does at the operating point
    ``point`` (threshold, min_layer): its exit layer, its answer there and the read-out's cost
    in layer equivalents (the offline side of the backend's ``policy=...``)."""
    exits = exit_layers(layer_scores(policy, params, data), point["threshold"], point["min_layer"])
    return policy_readout(policy, data).outcome(exits, point["min_layer"])


def fit_study_policy(train, policy: str, rules: CalibrationRules) -> dict:
    """``policy`` fitted (SVM/CRF) and calibrated on ``train`` under every criterion.

    The operating point comes from held-out scores: cross-fitted for SVM/CRF; the other rules
    fit nothing, so their scores on the training documents are out-of-sample already.
    """
    from adainfer_lmeval.experiments.calibration import CRITERIA, calibrate
    from adainfer_lmeval.experiments.fitting import cross_fitted_scores, fit_classifier
    from adainfer_lmeval.experiments.training_data import make_labels

    readout = policy_readout(policy, train)
    if policy in CLASSIFIERS:
        kind, signals = CLASSIFIERS[policy]
        cols = train.columns(signals)
        y = make_labels(train, LABEL["mode"], LABEL["prediction"])
        held_out = cross_fitted_scores(train, y, kind, cols, rules.inner_folds, rules.seed + 1)
        params = fit_classifier(kind, train, y, cols)
    else:
        params, held_out = None, layer_scores(policy, None, train)
    points = {c: calibrate(train, held_out, rules.tolerance, criterion=c, max_changed=rules.max_changed,
                           confidence=rules.confidence, readout=readout) for c in CRITERIA}
    return {"params": params, "points": points, "layers": train.num_layers, "n_train": len(train.keys),
            "calibration_docs": len(set(train.keys)), "train_tasks": sorted(set(train.source))}
