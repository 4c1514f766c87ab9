"""The study's offline evaluation checked against the real backend, on a slice of test documents.

Each fitted policy is run through ``lm_eval.simple_evaluate(model="adainfer", ...)`` as the
policy the backend knows (SVM/CRF as policy files, the rules as ``policy=threshold``,
``margin``, ``static``, ``simlens``; ``margin_simlens`` and ``simlens_static`` as the margin and
static rules with ``readout=continuation``), and its exit layers and answers are compared with
the offline evaluation of the same documents' collected features (and, for the policies that
answer off the continuation, their collected read-out: :func:`~.study_policies.document_outcomes`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adainfer_lmeval.experiments.study_policies import (CLASSIFIERS, CONTINUATION_POLICIES, LABEL, STUDY_POLICIES,
                                                        document_outcomes)
from adainfer_lmeval.experiments.study_tasks import StudyTask

BACKEND_POLICIES = STUDY_POLICIES  # every study policy has a backend twin (backend_policy)


def backend_policy(policy: str, fit: dict, train, out_dir: Path, criterion: str = "accuracy") -> str:
    """The model-args ``policy=...`` value that runs ``fit`` at its ``criterion`` point (SVM/CRF:
    a policy file written into ``out_dir``)."""
    from adainfer_lmeval.experiments.train import policy_meta, write_policy

    point = fit["points"][criterion]
    threshold, min_layer = point["threshold"], point["min_layer"]
    if policy in CLASSIFIERS:
        kind, signals = CLASSIFIERS[policy]
        meta = policy_meta(kind, train, fit["params"], point, list(signals), LABEL, {},
                           {"tolerance": None, "tasks": fit["train_tasks"], "note": "adainfer_lmeval.experiments.study fit"})
        return f"file,path={write_policy(out_dir / policy, kind, meta, fit['params'])[0]}"
    return rule_policy(policy, threshold, min_layer, train.num_layers)


def rule_policy(policy: str, threshold: float, min_layer: int, num_layers: int, carry: str = "simlens") -> str:
    """The model-args ``policy=...`` value of a study rule (every policy but the classifiers) at
    its point (``threshold``, ``min_layer``) on a model of ``num_layers`` layers; ``carry``: how
    the SimLens rules' continuation carries (filled: ``carry=filled``)."""
    if policy == "threshold":
        return f"threshold,gap={threshold!r},min_layer={min_layer}"
    if min_layer >= num_layers:  # the never-exit point consults nothing: full depth
        return "full"
    carried = "" if carry == "simlens" else f",carry={carry}"
    if policy in ("margin", "simlens"):
        return f"{policy},margin={threshold!r},min_layer={min_layer}" + (carried if policy == "simlens" else "")
    if policy == "margin_simlens":  # the lens margin decides, the continuation answers
        return f"margin,margin={threshold!r},min_layer={min_layer},readout=continuation" + carried
    if policy == "simlens_static":
        return f"static,layer={min_layer},readout=continuation" + carried
    return f"static,layer={min_layer}"


def backend_check(model: str, task: StudyTask, n_docs: int, fitted: dict, train, workdir: Path, batch_size: int = 8,
                  criterion: str = "accuracy") -> dict:
    """Run each fitted policy ({policy: fit}) through lm-eval (``adainfer`` backend) on the first
    ``n_docs`` test documents and compare with the offline evaluation of the same documents'
    collected features.

    Returns per policy: the offline and backend exit layers and accuracies, and whether they agree.
    """
    from adainfer_lmeval.adapter.harness import evaluate, task_manager
    from adainfer_lmeval.experiments.collect import collect
    from adainfer_lmeval.experiments.training_data import load_data, with_continuation
    from adainfer_lmeval.offline.environment import configure_offline_environment

    path = workdir / f"check-{task.label}.parquet"
    collect(model, [task.name], [task.shots], None, path, doc_filter=lambda _n, i: i < n_docs, quiet=True)
    data = load_data(path)
    if any(policy in CONTINUATION_POLICIES for policy in fitted):
        from adainfer_lmeval.adapter.backend import AdaInferLM
        from adainfer_lmeval.experiments.collect_continuation import collect_continuation

        collect_continuation(AdaInferLM(pretrained=model, policy="full", batch_size=1, device="cpu"), path)
        data = with_continuation(data, path)
    data = data.subset(np.argsort([int(k.split(":")[-1]) for k in data.keys]))  # by doc id, as lm-eval's samples
    configure_offline_environment()
    manager = task_manager()
    report = {}
    for policy, fit in fitted.items():
        point = fit["points"][criterion]
        outcome = document_outcomes(policy, fit["params"], data, point)
        offline, offline_correct = outcome.exits, outcome.answers == data.gold
        spec = backend_policy(policy, fit, train, workdir / "policies", criterion)
        result = evaluate(
            model="adainfer", model_args=f"pretrained={model},policy={spec}", tasks=[task.name], num_fewshot=task.shots,
            limit=n_docs, device="cpu", batch_size=batch_size, log_samples=True, task_manager=manager, bootstrap_iters=0,
        )
        samples = sorted(result["samples"][task.name], key=lambda s: s["doc_id"])
        backend = np.array([s["exit_layers"][0] for s in samples])
        per_request_same = all(len(set(s["exit_layers"])) == 1 for s in samples)
        backend_correct = np.array([s["acc"] for s in samples], dtype=bool)
        report[policy] = {
            "policy": spec, "docs": len(samples),
            "offline_exits": offline.tolist(), "backend_exits": backend.tolist(),
            "offline_acc": float(offline_correct.mean()), "backend_acc": float(backend_correct.mean()),
            "exits_equal": bool(per_request_same and len(backend) == len(offline) and (backend == offline).all()),
            "answers_equal": bool(len(backend) == len(offline) and (backend_correct == offline_correct).all()),
        }
    return report
