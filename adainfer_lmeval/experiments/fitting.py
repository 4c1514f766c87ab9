"""Fitting a learned kind on training data, with held-out scores for its operating point.

The classifier is fitted on all training documents; its operating point is chosen
(:func:`adainfer_lmeval.experiments.calibration.calibrate`) on *held-out* scores of the same
documents (cross-fitted: each document scored by a classifier fitted without it). Validation
figures are cross-validated: each document's exit comes from a policy (classifier and operating
point) fitted on the other folds only.

A kind whose policy answers off the SimLens continuation (``simlens``), or that reads a
continuation signal, is calibrated and scored with what it answers and what its carries cost
(:func:`kind_readout`); every other kind with the lens.
"""

from __future__ import annotations

import numpy as np
import torch

from adainfer_lmeval.core.features import continuation_signals
from adainfer_lmeval.experiments.calibration import Readout, calibrate, evaluate_outcome, exit_layers, first_consulted
from adainfer_lmeval.experiments.training_data import LABEL_MODES, PREDICTIONS, Data, fold_of, layer_features, make_labels
from adainfer_lmeval.policies.learned.base import LearnedKind, learned_kind


def kind_readout(kind: str, reads: list[str]):
    """How the policy of ``kind`` reading the signals ``reads`` answers and what that costs, as a
    function of the data (:class:`~.calibration.Readout`): the lens, or the SimLens
    continuation's answers and/or check carries where the kind answers off it or reads it."""
    answers = learned_kind(kind).policy.exit_readout == "continuation"
    checks = bool(continuation_signals(tuple(reads)))
    if not answers and not checks:
        return Readout.lens
    return lambda data: Readout.carried(data, checks=checks, answers=answers)


def fit_classifier(kind: str, data: Data, y: np.ndarray, cols: list[int], **options) -> LearnedKind:
    """A classifier of ``kind`` (:data:`adainfer_lmeval.policies.learned.base.LEARNED_KINDS`) fitted on layers 1..L-1."""
    return learned_kind(kind)().fit(layer_features(data, cols), y, **options)


def classifier_scores(estimator: LearnedKind, data: Data, cols: list[int]) -> np.ndarray:
    """Scores [N, L-1] by the function the policy runs: SVM decision value, CRF prefix marginal
    P(stop at l | layers 1..l) (never reading later layers), the margin itself."""
    x = torch.from_numpy(np.ascontiguousarray(layer_features(data, cols), dtype=np.float64))
    return estimator.decision_function(x).numpy()


def cross_fitted_scores(data: Data, y: np.ndarray, kind: str, cols: list[int], k: int, seed: int, **kw) -> np.ndarray:
    folds = fold_of(data.keys, k, seed)
    out = np.zeros((len(data.keys), data.num_layers - 1))
    for f in range(k):
        test, train = np.where(folds == f)[0], np.where(folds != f)[0]
        if len(test) == 0 or len(train) == 0:
            continue
        out[test] = classifier_scores(fit_classifier(kind, data.subset(train), y[train], cols, **kw), data.subset(test), cols)
    return out


def fit_policy(data: Data, y: np.ndarray, kind: str, cols: list[int], tolerance: float, k_inner: int, seed: int,
               criterion: str = "accuracy", check_cost: float = 0.0, max_changed: float = 0.01,
               confidence: float = 0.95, readout=Readout.lens, **kw):
    """Fit on all of ``data``; operating point from held-out scores (cross-fitted, unless the kind
    fits nothing: then its scores on ``data`` are held-out already), answered by ``readout(data)``."""
    estimator = learned_kind(kind)
    held_out = (classifier_scores(estimator(), data, cols) if not estimator.fits_parameters
                else cross_fitted_scores(data, y, kind, cols, k_inner, seed + 1, **kw))
    point = calibrate(data, held_out, tolerance, criterion=criterion, check_cost=check_cost,
                      chain_start=estimator.seq_start, max_changed=max_changed, confidence=confidence,
                      max_threshold=estimator.max_threshold, readout=readout(data))
    return fit_classifier(kind, data, y, cols, **kw), point


def cross_validate(data: Data, y: np.ndarray, kind: str, cols: list[int], tolerance: float, k_outer: int, k_inner: int,
                   seed: int, criterion: str = "accuracy", check_cost: float = 0.0, max_changed: float = 0.01,
                   confidence: float = 0.95, readout=Readout.lens, **kw) -> dict:
    """Held-out figures: each document's exit from a policy fitted (and calibrated) without it,
    its answer and read-out cost by ``readout`` from the first layer its fold's point consults."""
    folds = fold_of(data.keys, k_outer, seed)
    outcome = readout(data).outcome(np.full(len(data.keys), data.num_layers), data.num_layers)  # none exits
    for f in range(k_outer):
        test, train = np.where(folds == f)[0], np.where(folds != f)[0]
        if len(test) == 0 or len(train) == 0:
            continue
        params, point = fit_policy(data.subset(train), y[train], kind, cols, tolerance, k_inner, seed, criterion,
                                   check_cost, max_changed, confidence, readout, **kw)
        held = data.subset(test)
        exits = exit_layers(classifier_scores(params, held, cols), point["threshold"], point["min_layer"])
        # counted from the first layer it consults, as calibration counts (a CRF's chain: its start)
        fold = readout(held).outcome(exits, first_consulted(point["min_layer"], data.num_layers, learned_kind(kind).seq_start))
        outcome.exits[test], outcome.answers[test], outcome.extra_layers[test] = fold.exits, fold.answers, fold.extra_layers
    result = evaluate_outcome(data, outcome)
    result["exits"] = outcome.exits
    return result


def label_study(data: Data, cols: list[int], tolerance: float, k_outer: int, k_inner: int, seed: int,
                criterion: str = "accuracy", check_cost: float = 0.0, max_changed: float = 0.01,
                confidence: float = 0.95, readout=Readout.lens) -> list[dict]:
    """SVM held-out figures for every label mode × prediction kind."""
    rows = []
    for mode in LABEL_MODES:
        for prediction in PREDICTIONS:
            y = make_labels(data, mode, prediction)
            cv = cross_validate(data, y, "svm", cols, tolerance, k_outer, k_inner, seed, criterion, check_cost,
                                max_changed, confidence, readout)
            rows.append({"mode": mode, "prediction": prediction, "positive_rate": float(y.mean()),
                         **{k: v for k, v in cv.items() if k != "exits"}})
    return rows
