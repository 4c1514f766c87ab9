"""The study's offline evaluation: every policy, setting and operating point on the test documents.

The features a policy reads at layer l and every layer's option choice are in the collection
(and, for the SimLens policies, what the continuation reads and answers from every layer, beside
it), so a policy's exit layer, the answer it gives there and what reading it costs follow exactly
from them (:func:`~adainfer_lmeval.experiments.study_policies.document_outcomes`;
``tests/test_study.py`` checks this against the real backend). Per model and test task:
``full``, ``oracle`` (hindsight), and every policy of
:data:`~adainfer_lmeval.experiments.study_policies.STUDY_POLICIES` in three settings:
**intra-task** (calibrated, and for SVM/CRF fitted, on this task's training documents),
**inter-task** (on the training documents of every *other* task) and **inter-model** (each other
model's intra-task policy for the same task, one row per source model, its ``min_layer`` moved
by relative depth).
"""

from __future__ import annotations

import time

import numpy as np

from adainfer_lmeval.experiments.calibration import Outcome, Readout
from adainfer_lmeval.experiments.study_policies import (
    STATIC_RULES, STUDY_POLICIES, CalibrationRules, at_chance, fit_study_policy, has_readout, layer_scores, map_point,
    oracle_exits, policy_readout,
)
from adainfer_lmeval.experiments.study_tasks import StudyModel, training_sets


def standard_errors(data, outcome: Outcome) -> dict:
    """Standard errors over the test documents: of the accuracy, of the change against full
    depth (paired: per document, correct at the exit minus correct at full depth; points) and of
    the layers saved (the read-out's cost counted)."""
    n, L = len(outcome.exits), data.num_layers
    correct = outcome.answers == data.gold
    full_correct = data.choice[:, L - 1] == data.gold
    sem = lambda x: float(np.std(x, ddof=1) / np.sqrt(n)) if n > 1 else 0.0  # noqa: E731
    return {"acc_se": sem(correct.astype(float)), "delta_se_points": 100 * sem(correct.astype(float) - full_correct),
            "layers_saved_se": sem(1 - outcome.layers_run / L)}


def _fit_all(collections, plan, rules, policies, log) -> dict:
    fitted = {}
    for (model, task, setting), train in training_sets(collections, plan, rules.seed).items():
        for policy in [p for p in policies if has_readout(p, train)]:
            t0 = time.time()
            fitted[(model, task, setting, policy)] = fit_study_policy(train, policy, rules)
            log(f"  fitted {policy:9s} {model} {task} {setting} on {len(train.keys)} docs in {time.time() - t0:.1f}s")
    return fitted


def _guarantee_fields(point: dict) -> dict:
    return {"calibration_docs": point["calibration_docs"], "calibration_changed": point["calibration_changed"],
            "changed_upper_bound": point["changed_upper_bound"], "passed": point.get("passed"),
            "path_confidence": point.get("path_confidence")}


def run_study(collections: dict, plan: list[StudyModel], rules: CalibrationRules = CalibrationRules(),
              policies=STUDY_POLICIES, log=print, fitted_out: dict | None = None) -> dict:
    """Every row of the study (and the sweep curves for the plot), from the collections.

    ``fitted_out``, if given, receives every fit: {(model, task label, setting, policy): fit}.
    """
    from adainfer_lmeval.experiments.calibration import calibrate, evaluate, exit_layers

    fitted = _fit_all(collections, plan, rules, policies, log)
    if fitted_out is not None:
        fitted_out.update(fitted)
    rows, curves, hindsight = [], [], []
    for study_model in plan:
        model = study_model.name
        for task in study_model.tasks:
            test = collections[(model, task.label, "test")]
            L, n = test.num_layers, len(test.keys)
            full = evaluate(test, np.full(n, L))
            base = {"model": model, "task": task.name, "shots": task.shots, "layers": L, "n_test": n,
                    "chance": full["chance_acc"], "full_acc": full["full_acc"],
                    "at_chance": at_chance(full["full_acc"], full["chance_acc"], n)}

            def row(policy, setting, criterion, exits, readout=None, first_check=1, **extra):
                readout = Readout.lens(test) if readout is None else readout
                result = evaluate(test, exits, readout, first_check)
                outcome = readout.outcome(exits, first_check)
                continuation = float(outcome.extra_layers.mean())
                rows.append({**base, "policy": policy, "setting": setting, "criterion": criterion,
                             "acc": result["policy_acc"], "delta_points": 100 * (result["policy_acc"] - full["full_acc"]),
                             "mean_exit_layer": result["mean_exit_layer"], "layers_saved": result["layers_saved"],
                             "continuation_layers": continuation, "continuation_share": continuation / L,
                             "agreement": result["agreement_with_full"], **standard_errors(test, outcome), **extra})

            row("full", "-", "-", np.full(n, L))
            row("oracle", "-", "-", oracle_exits(test))
            for policy in [p for p in policies if has_readout(p, test)]:
                readout = policy_readout(policy, test)
                sources = [(s, fitted.get((model, task.label, s, policy)), model) for s in ("intra", "inter-task")]
                sources += [("inter-model", fitted.get((other, task.label, "intra", policy)), other)
                            for other in (m.name for m in plan) if other != model]
                for setting, fit, trained_model in sources:
                    if fit is None:
                        continue
                    scores = layer_scores(policy, fit["params"], test)
                    for criterion, point in fit["points"].items():
                        moved = map_point(point, fit["layers"], L)
                        row(policy, setting, criterion, exit_layers(scores, moved["threshold"], moved["min_layer"]),
                            readout, moved["min_layer"], trained_model=trained_model, trained_on=",".join(fit["train_tasks"]),
                            n_train=fit["n_train"], threshold=moved["threshold"], min_layer=moved["min_layer"],
                            **_guarantee_fields(point))
                    if setting == "intra":  # the whole trade-off on the test documents (hindsight)
                        best = calibrate(test, scores, rules.tolerance, criterion="accuracy", readout=readout)
                        r = evaluate(test, exit_layers(scores, best["threshold"], best["min_layer"]), readout, best["min_layer"])
                        hindsight.append({"model": model, "task": task.label, "policy": policy, "acc": r["policy_acc"],
                                          "layers_saved": r["layers_saved"], "agreement": r["agreement_with_full"],
                                          "threshold": best["threshold"], "min_layer": best["min_layer"]})
                        min_layer = fit["points"]["accuracy"]["min_layer"]
                        # static depth's one parameter is its layer; the others' is the threshold
                        sweep = ([(1.0, layer) for layer in range(1, L)] if policy in STATIC_RULES else
                                 [(t, min_layer) for t in np.unique(np.quantile(scores[np.isfinite(scores)], np.linspace(0, 1, 41)))])
                        pts = []
                        for threshold, first in sweep:
                            r = evaluate(test, exit_layers(scores, threshold, first), readout, first)
                            pts.append([r["layers_saved"], r["policy_acc"]])
                        curves.append({"model": model, "task": task.label, "policy": policy, "min_layer": min_layer,
                                       "points": pts})
    return {"rows": rows, "curves": curves, "hindsight": hindsight}
