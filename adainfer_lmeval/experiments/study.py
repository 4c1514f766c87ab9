"""The paper's study: full depth vs SVM vs CRF vs threshold vs the oracle, per model and task.

    python -m adainfer_lmeval.experiments.study --out reports/study \\
        --models smollm2-135m:80,qwen2.5-coder-0.5b:40 \\
        --tasks sst2:x2.5,sst2@4:x2.5,arc_easy,boolq,piqa,openbookqa,commonsense_qa --threads 1

Two steps, both resumable:

1. **Collect** (:mod:`adainfer_lmeval.experiments.collect`, lm-eval's own prompts): per model and task,
   ``N`` training documents from the task's *train split* (``arc_easy_train``, ...) and ``N``
   test documents from the split lm-eval evaluates (``arc_easy``: test, ``boolq``: validation,
   ...). SST-2 has no train split offline: its validation set is split once into two halves by
   a seeded hash of the document id (:func:`sst2_half`); training documents come from one half,
   test documents from the other, and nothing is reported on the training half. Feature files
   go to ``--collect-dir`` (``out/study/collect/<model>/<task>@<shots>-<role>.parquet``).
2. **Evaluate offline.** The features a policy reads at layer l and every layer's option choice
   are in the collection, so a policy's exit layer and the answer it gives there follow exactly
   from the features (``tests/test_study.py`` checks this against the real backend). Per model
   and test task:

   * ``full``: every layer; ``oracle``: the earliest layer after which the answer never changes
     (:func:`adainfer_lmeval.experiments.oracle.oracle_layer`, hindsight);
   * ``svm``, ``crf``, ``threshold`` (the gap p1 - p2 with a minimum layer), each in three settings:
     **intra-task** (trained and calibrated on this task's training documents), **inter-task**
     (on the training documents of every *other* task, this task's never), **inter-model**
     (the intra-task policy of the other model, run on this model; see :func:`map_point`).

   Classifiers are fitted as :mod:`adainfer_lmeval.experiments.train` fits the shipped ones (labels
   ``final``/``option``, the same SVM and CRF, the operating point from cross-fitted held-out
   scores of the training documents). Two operating points are reported: ``agreement`` (at most
   1% of the training answers change: the shipped policies' criterion) and ``accuracy`` (training
   accuracy within 1 point of full depth: the paper's "<1 point lost").

Layer mapping across models: every feature is per layer and model-free (p1, gap, entropy,
cosine of consecutive hidden states, and *relative* depth l/L), so a classifier's scores apply to
another model's layers unchanged; only ``min_layer`` is a layer count: it is scaled by relative
depth, ``round(min_layer * L_target / L_source)``, clamped to 1..L_target-1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.pypi import package_versions

# lm-eval task evaluated -> the task that runs the same prompts on its train split
TRAIN_TASKS = {
    "arc_easy": "arc_easy_train", "arc_challenge": "arc_challenge_train", "boolq": "boolq_train",
    "commonsense_qa": "commonsense_qa_train", "openbookqa": "openbookqa_train", "piqa": "piqa_train",
    "hellaswag": "hellaswag_train",
}
SPLIT_ON_VALIDATION = ("sst2",)  # no train split offline: split the evaluated set in two halves
ROLES = ("train", "test")
KINDS = ("svm", "crf", "threshold")
SETTINGS = ("intra", "inter-task", "inter-model")
CRITERIA = ("agreement", "accuracy")
DEFAULT_TASKS = "sst2:x2.5,sst2@4:x2.5,arc_easy,boolq,piqa,openbookqa,commonsense_qa"
DEFAULT_MODELS = "smollm2-135m:80,qwen2.5-coder-0.5b:40"


@dataclass(frozen=True)
class TaskSpec:
    """``name[@shots][:docs]``: an lm-eval task evaluated with ``shots`` few-shot examples.

    ``docs`` overrides the model's documents per role for this task: a count (``:200``) or a
    factor of the model's count (``:x2.5``); cheap tasks can have more.
    """

    name: str
    shots: int = 0
    docs: int | None = None
    docs_factor: float | None = None

    def n_docs(self, model_docs: int) -> int:
        if self.docs is not None:
            return self.docs
        return int(round(model_docs * self.docs_factor)) if self.docs_factor is not None else model_docs

    @classmethod
    def parse(cls, text: str) -> "TaskSpec":
        head, _, docs = text.strip().partition(":")
        name, _, shots = head.partition("@")
        if name not in TRAIN_TASKS and name not in SPLIT_ON_VALIDATION:
            known = ", ".join(sorted([*TRAIN_TASKS, *SPLIT_ON_VALIDATION]))
            raise AdaInferError(f"task {name!r} has no training documents offline; study tasks: {known}")
        try:
            factor = float(docs[1:]) if docs.startswith("x") else None
            return cls(name, int(shots) if shots else 0, int(docs) if docs and factor is None else None, factor)
        except ValueError:
            raise AdaInferError(f"bad task spec {text!r}: use name[@shots][:docs], e.g. sst2@4:200") from None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.shots}"

    def source(self, role: str) -> str:
        """The lm-eval task whose documents serve ``role`` (train / test)."""
        if role == "train" and self.name in TRAIN_TASKS:
            return TRAIN_TASKS[self.name]
        return self.name


def sst2_half(doc_id: int, seed: int = 0) -> str:
    """``train`` or ``test``: a fixed, seeded split of a validation set without a train split."""
    return "train" if int(hashlib.sha256(f"study-split:{seed}:{doc_id}".encode()).hexdigest()[:8], 16) % 2 == 0 else "test"


def doc_filter_for(spec: TaskSpec, role: str, seed: int = 0):
    """The documents ``role`` may draw from: one half for split tasks, all otherwise."""
    if spec.name not in SPLIT_ON_VALIDATION:
        return None
    return lambda _name, doc_id: sst2_half(doc_id, seed) == role


def parse_models(text: str) -> dict[str, int]:
    out = {}
    for item in [t for t in text.split(",") if t]:
        name, _, docs = item.partition(":")
        try:
            out[name] = int(docs) if docs else 60
        except ValueError:
            raise AdaInferError(f"bad model spec {item!r}: use name or name:docs, e.g. smollm2-135m:80") from None
    return out


def collection_path(root: Path, model: str, spec: TaskSpec, role: str) -> Path:
    return root / model / f"{spec.label}-{role}.parquet"


def collect_all(models: dict[str, int], specs: list[TaskSpec], root: Path, seed: int = 0, log=print) -> None:
    """Collect every (model, task, role) file that is missing (one model load per model)."""
    from adainfer_lmeval.experiments.collect import collect, read_collection
    from adainfer_lmeval.adapter.backend import AdaInferLM

    for model, model_docs in models.items():
        todo = []
        for spec in specs:
            n_docs = spec.n_docs(model_docs)
            for role in ROLES:
                path = collection_path(root, model, spec, role)
                if path.exists():
                    meta, _ = read_collection(path)
                    study = meta.get("study", {})
                    if study.get("docs") == n_docs and study.get("seed") == seed:
                        continue
                    log(f"  {path}: collected with other settings ({study}); collecting again")
                todo.append((spec, role, path, n_docs))
        if not todo:
            continue
        lm = AdaInferLM(pretrained=model, policy="full", batch_size=1, device="cpu")
        for spec, role, path, n_docs in todo:
            t0 = time.time()
            meta = collect(
                model, [spec.source(role)], [spec.shots], n_docs, path, seed=seed, lm=lm,
                doc_filter=doc_filter_for(spec, role, seed), quiet=True,
                extra_meta={"study": {"task": spec.label, "role": role, "docs": n_docs, "seed": seed,
                                      "split": "seeded half of validation (sst2_half)" if spec.name in SPLIT_ON_VALIDATION else
                                      ("train split" if role == "train" else "lm-eval's evaluation split")}},
            )
            log(f"  collected {model} {spec.label} {role}: {sum(p['docs'] for p in meta['parts'])} docs "
                f"from {spec.source(role)} in {time.time() - t0:.0f}s -> {path}")
        del lm



# ---- offline evaluation ----------------------------------------------------------------------


def load_collections(root: Path, models: list[str], specs: list[TaskSpec]) -> dict:
    """{(model, task label, role): train.Data} for every collected file."""
    from adainfer_lmeval.experiments.train import load_data

    out = {}
    for model in models:
        for spec in specs:
            for role in ROLES:
                path = collection_path(root, model, spec, role)
                if not path.exists():
                    raise AdaInferError(f"{path} is missing: run the study without --skip-collect (or with --collect-only) first")
                out[(model, spec.label, role)] = load_data(path)
    return out


def oracle_exits(data) -> np.ndarray:
    """Per document: the earliest layer after which its answer never changes (hindsight)."""
    from adainfer_lmeval.experiments.oracle import oracle_layer

    return np.array([oracle_layer(row.tolist()) for row in data.choice])


def at_chance(full_acc: float, chance: float, n: int) -> bool:
    """Full depth within two binomial standard errors of chance (the reports' rule, one place)."""
    from adainfer_lmeval.reporting.report import at_chance as within_two_stderr, binomial_stderr

    return within_two_stderr(full_acc, chance, binomial_stderr(full_acc, n))


def map_point(point: dict, source_layers: int, target_layers: int) -> dict:
    """An operating point moved to a model of another depth: ``min_layer`` by relative depth.

    The threshold applies to the classifier's score, whose features are all per layer and
    model-free (depth is l/L already), so it carries over unchanged.
    """
    min_layer = int(round(point["min_layer"] * target_layers / source_layers))
    return {**point, "min_layer": max(1, min(target_layers - 1, min_layer))}


def layer_scores(kind: str, params, data, cols: list[int]) -> np.ndarray:
    """Scores [N, L-1] of layers 1..L-1 (higher = stop): SVM value, CRF prefix marginal or gap."""
    from adainfer_lmeval.core.features import FEATURE_NAMES
    from adainfer_lmeval.experiments.train import classifier_scores

    if kind == "threshold":
        return data.feats[:, : data.num_layers - 1, FEATURE_NAMES.index("gap")]
    return classifier_scores(params, data, cols)


def fit_kind(train, kind: str, cols: list[int], tolerance: float, k_inner: int, seed: int) -> dict:
    """A policy fitted on ``train``: classifier (as train.fit_policy) and both operating points.

    The operating point comes from held-out scores (cross-fitted for SVM/CRF; the threshold
    rule has nothing to fit, so its gap scores are already out-of-sample).
    """
    from adainfer_lmeval.experiments.train import calibrate, cross_fitted_scores, fit_classifier, make_labels

    if kind == "threshold":
        params, held_out = None, layer_scores(kind, None, train, cols)
    else:
        y = make_labels(train, "final", "option")
        held_out = cross_fitted_scores(train, y, kind, cols, k_inner, seed + 1)
        params = fit_classifier(kind, train, y, cols)
    points = {c: calibrate(train, held_out, tolerance, criterion=c) for c in CRITERIA}
    return {"params": params, "points": points, "layers": train.num_layers, "n_train": len(train.keys),
            "train_tasks": sorted(set(train.source))}


def concat_data(datas: list):
    """One train.Data of several collections of the same model."""
    from adainfer_lmeval.experiments.train import Data

    first = datas[0]
    if len({d.num_layers for d in datas}) != 1:
        raise AdaInferError("cannot pool collections of models with different depths")
    cat = lambda name: np.concatenate([getattr(d, name) for d in datas])  # noqa: E731
    return Data(cat("feats"), cat("top1"), cat("choice"), cat("gold"), cat("gold_token"),
                [k for d in datas for k in d.keys], [s for d in datas for s in d.source],
                cat("shots"), cat("n_options"), first.meta)


def training_sets(collections: dict, models: list[str], specs: list[TaskSpec], seed: int = 0) -> dict:
    """{(model, task label, setting): Data} for intra-task and inter-task training.

    Inter-task pools the training documents of every task with another name (``sst2@0`` and
    ``sst2@4`` are one task: neither trains the other's inter-task policy), the same number from
    each (the smallest task's count, a seeded sample), so that no task dominates the pool.
    """
    out = {}
    for model in models:
        trains = {spec.label: collections[(model, spec.label, "train")] for spec in specs}
        cap = min(len(d.keys) for d in trains.values())
        rng = np.random.default_rng(seed)
        capped = {label: d if len(d.keys) == cap else d.subset(np.sort(rng.choice(len(d.keys), cap, replace=False)))
                  for label, d in trains.items()}
        for spec in specs:
            out[(model, spec.label, "intra")] = trains[spec.label]
            others = [capped[o.label] for o in specs if o.name != spec.name]
            if others:
                out[(model, spec.label, "inter-task")] = concat_data(others)
    return out


def run_study(collections: dict, models: list[str], specs: list[TaskSpec], tolerance: float = 0.01,
              k_inner: int = 4, seed: int = 0, kinds=KINDS, log=print, fitted_out: dict | None = None) -> dict:
    """Every row of the study (and the sweep curves for the plot), from the collections.

    ``fitted_out``, if given, receives every fit: {(model, task label, setting, kind): fit}.
    """
    from adainfer_lmeval.core.features import FEATURE_NAMES
    from adainfer_lmeval.experiments.train import calibrate, evaluate, exit_layers

    cols = list(range(len(FEATURE_NAMES)))
    fitted = {}
    for (model, task, setting), train in training_sets(collections, models, specs, seed).items():
        for kind in kinds:
            t0 = time.time()
            fitted[(model, task, setting, kind)] = fit_kind(train, kind, cols, tolerance, k_inner, seed)
            log(f"  fitted {kind:9s} {model} {task} {setting} on {len(train.keys)} docs in {time.time() - t0:.1f}s")
    if fitted_out is not None:
        fitted_out.update(fitted)
    rows, curves, hindsight = [], [], []
    for model in models:
        for spec in specs:
            test = collections[(model, spec.label, "test")]
            L, n = test.num_layers, len(test.keys)
            full = evaluate(test, np.full(n, L))
            base = {"model": model, "task": spec.name, "shots": spec.shots, "layers": L, "n_test": n,
                    "chance": full["chance_acc"], "full_acc": full["full_acc"],
                    "at_chance": at_chance(full["full_acc"], full["chance_acc"], n)}

            def row(policy, setting, criterion, result, **extra):
                rows.append({**base, "policy": policy, "setting": setting, "criterion": criterion,
                             "acc": result["policy_acc"], "delta_points": 100 * (result["policy_acc"] - full["full_acc"]),
                             "mean_exit_layer": result["mean_exit_layer"], "layers_saved": result["layers_saved"],
                             "agreement": result["agreement_with_full"], **extra})

            row("full", "-", "-", full)
            row("oracle", "-", "-", evaluate(test, oracle_exits(test)))
            for kind in kinds:
                sources = [(s, fitted.get((model, spec.label, s, kind)), model) for s in ("intra", "inter-task")]
                sources += [("inter-model", fitted.get((other, spec.label, "intra", kind)), other) for other in models if other != model]
                for setting, policy, trained_model in sources:
                    if policy is None:
                        continue
                    scores = layer_scores(kind, policy["params"], test, cols)
                    for criterion, point in policy["points"].items():
                        point = map_point(point, policy["layers"], L)
                        exits = exit_layers(scores, point["threshold"], point["min_layer"])
                        row(kind, setting, criterion, evaluate(test, exits), trained_model=trained_model,
                            trained_on=",".join(policy["train_tasks"]), n_train=policy["n_train"],
                            threshold=point["threshold"], min_layer=point["min_layer"])
                    if setting == "intra":  # the whole trade-off on the test documents (hindsight)
                        best = calibrate(test, scores, tolerance, criterion="accuracy")
                        r = evaluate(test, exit_layers(scores, best["threshold"], best["min_layer"]))
                        hindsight.append({"model": model, "task": spec.label, "policy": kind, "acc": r["policy_acc"],
                                          "layers_saved": r["layers_saved"], "agreement": r["agreement_with_full"],
                                          "threshold": best["threshold"], "min_layer": best["min_layer"]})
                        min_layer = policy["points"]["accuracy"]["min_layer"]
                        pts = []
                        for threshold in np.unique(np.quantile(scores, np.linspace(0, 1, 41))):
                            r = evaluate(test, exit_layers(scores, threshold, min_layer))
                            pts.append([r["layers_saved"], r["policy_acc"]])
                        curves.append({"model": model, "task": spec.label, "policy": kind, "min_layer": min_layer, "points": pts})
    return {"rows": rows, "curves": curves, "hindsight": hindsight}



# ---- the offline evaluation against the real backend ---------------------------------------


def policy_files(fitted: dict, train, out_dir: Path, criterion: str = "accuracy") -> dict[str, str]:
    """Write an SVM/CRF fit as policy files (train.write_policy); {kind: model-args policy string}.

    A threshold fit becomes ``threshold,gap=τ,min_layer=M``.
    """
    from adainfer_lmeval.core.features import FEATURE_NAMES
    from adainfer_lmeval.experiments.train import policy_meta, write_policy

    out = {}
    for kind, fit in fitted.items():
        point = fit["points"][criterion]
        if kind == "threshold":
            out[kind] = f"threshold,gap={point['threshold']!r},min_layer={point['min_layer']}"
            continue
        meta = policy_meta(kind, train, fit["params"], point, list(FEATURE_NAMES), {"mode": "final", "prediction": "option"},
                           {}, {"tolerance": None, "tasks": fit["train_tasks"], "note": "adainfer_lmeval.experiments.study fit"})
        path = write_policy(out_dir / kind, kind, meta, fit["params"])[0]
        out[kind] = f"file,path={path}"
    return out


def backend_check(model: str, spec: TaskSpec, n_docs: int, fitted: dict, train, workdir: Path, batch_size: int = 8) -> dict:
    """Run each fitted policy through lm-eval (``adainfer`` backend) on the first ``n_docs`` test
    documents and compare with the offline evaluation of the same documents' collected features.

    Returns per kind: the offline and backend exit layers and accuracies, and whether they agree.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from adainfer_lmeval.experiments.collect import collect
    from adainfer_lmeval.offline.data import configure_offline_environment, tasks_dir
    from adainfer_lmeval.experiments.train import exit_layers, load_data

    path = workdir / f"check-{spec.label}.parquet"
    collect(model, [spec.name], [spec.shots], None, path, doc_filter=lambda _n, i: i < n_docs, quiet=True)
    data = load_data(path)
    data = data.subset(np.argsort([int(k.split(":")[-1]) for k in data.keys]))  # by doc id, as lm-eval's samples
    configure_offline_environment()
    manager = TaskManager(include_path=str(tasks_dir()))
    from adainfer_lmeval.core.features import FEATURE_NAMES

    cols = list(range(len(FEATURE_NAMES)))
    report = {}
    for kind, policy in policy_files(fitted, train, workdir / "policies").items():
        point = fitted[kind]["points"]["accuracy"]
        offline = exit_layers(layer_scores(kind, fitted[kind]["params"], data, cols), point["threshold"], point["min_layer"])
        offline_correct = data.choice[np.arange(len(offline)), offline - 1] == data.gold
        result = lm_eval.simple_evaluate(
            model="adainfer", model_args=f"pretrained={model},policy={policy}", tasks=[spec.name], num_fewshot=spec.shots,
            limit=n_docs, device="cpu", batch_size=batch_size, log_samples=True, task_manager=manager, bootstrap_iters=0,
        )
        samples = sorted(result["samples"][spec.name], key=lambda s: s["doc_id"])
        backend = np.array([s["exit_layers"][0] for s in samples])
        per_request_same = all(len(set(s["exit_layers"])) == 1 for s in samples)
        backend_correct = np.array([s["acc"] for s in samples], dtype=bool)
        report[kind] = {
            "policy": policy, "docs": len(samples),
            "offline_exits": offline.tolist(), "backend_exits": backend.tolist(),
            "offline_acc": float(offline_correct.mean()), "backend_acc": float(backend_correct.mean()),
            "exits_equal": bool(per_request_same and len(backend) == len(offline) and (backend == offline).all()),
            "answers_equal": bool(len(backend) == len(offline) and (backend_correct == offline_correct).all()),
        }
    return report


# ---- the report ------------------------------------------------------------------------------


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def summary_rows(rows: list[dict], criterion: str) -> list[dict]:
    """Per policy and setting: mean layers saved and accuracy change over tasks above chance."""
    out = []
    keys = sorted({(r["policy"], r["setting"]) for r in rows if r["criterion"] in (criterion, "-")},
                  key=lambda k: (["full", "oracle", *KINDS].index(k[0]), k[1]))
    for policy, setting in keys:
        members = [r for r in rows if r["policy"] == policy and r["setting"] == setting
                   and r["criterion"] in (criterion, "-") and not r["at_chance"]]
        if not members:
            continue
        out.append({
            "policy": policy, "setting": setting, "cells": len(members),
            "mean_layers_saved": float(np.mean([r["layers_saved"] for r in members])),
            "mean_delta_points": float(np.mean([r["delta_points"] for r in members])),
            "worst_delta_points": float(np.min([r["delta_points"] for r in members])),
            "cells_within_1pt": int(sum(r["delta_points"] > -1.0 - 1e-9 for r in members)),
            "cells_saving_15pct_within_1pt": int(sum(r["delta_points"] > -1.0 - 1e-9 and r["layers_saved"] >= 0.148 for r in members)),
        })
    return out


def markdown_tables(result: dict) -> str:
    rows = result["rows"]
    lines = []
    for criterion in CRITERIA:
        lines += [f"### Operating point `{criterion}`", "",
                  {"agreement": "At most 1% of the *training* documents' answers may change (the shipped policies' criterion).",
                   "accuracy": "Training accuracy within 1 point of full depth (the paper's \"<1 point lost\")."}[criterion], "",
                  "Per cell: test accuracy % / layers saved %. Δ is in points against full depth. "
                  "`inter-model` runs the other model's intra-task policy here.", ""]
        header = ["model", "task", "shots", "n", "chance", "full", "oracle"] + [f"{k} {s}" for k in KINDS for s in SETTINGS] + ["note"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for (model, task, shots) in sorted({(r["model"], r["task"], r["shots"]) for r in rows}):
            cell = {(r["policy"], r["setting"]): r for r in rows if (r["model"], r["task"], r["shots"]) == (model, task, shots)
                    and r["criterion"] in (criterion, "-")}
            full = cell[("full", "-")]
            fmt = lambda r: "-" if r is None else f"{_pct(r['acc'])} / {_pct(r['layers_saved'])} (Δ{r['delta_points']:+.1f})"  # noqa: E731
            lines.append("| " + " | ".join([
                model, task, str(shots), str(full["n_test"]), _pct(full["chance"]), _pct(full["full_acc"]),
                f"{_pct(cell[('oracle', '-')]['acc'])} / {_pct(cell[('oracle', '-')]['layers_saved'])}",
                *[fmt(cell.get((k, s))) for k in KINDS for s in SETTINGS],
                "AT CHANCE" if full["at_chance"] else "",
            ]) + " |")
        lines += ["", "Mean over the cells *above chance* (a saving at chance proves nothing):", "",
                  "| policy | setting | cells | mean layers saved % | mean Δ points | worst Δ | cells within 1 pt | cells with ≥14.8% saved within 1 pt |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in summary_rows(rows, criterion):
            lines.append(f"| {s['policy']} | {s['setting']} | {s['cells']} | {_pct(s['mean_layers_saved'])} | {s['mean_delta_points']:+.1f} | "
                         f"{s['worst_delta_points']:+.1f} | {s['cells_within_1pt']} | {s['cells_saving_15pct_within_1pt']} |")
        lines.append("")
    lines += ["### In hindsight: the most a threshold could save on the test documents within 1 point", "",
              "Each intra-task policy's score with the operating point (threshold *and* min_layer) picked on the "
              "*test* documents themselves (`train.calibrate` run on them): the most layers saved whose test accuracy "
              "stays within 1 point of full depth. No one could pick this point in advance: it bounds what any "
              "calibration of these classifiers could give; the oracle bounds every policy.", "",
              "Cells: layers saved % (test accuracy %, % of answers equal to full depth's). Where few answers agree, "
              "the accuracy held only because early layers' (mostly one-label) guesses score about as well as the model.", "",
              "| model | task | shots | full % | oracle saved % | " + " | ".join(f"{k} best saved % (acc %, agree %)" for k in KINDS) + " | note |",
              "|" + "---|" * (6 + len(KINDS))]
    for (model, task, shots) in sorted({(r["model"], r["task"], r["shots"]) for r in rows}):
        full = next(r for r in rows if (r["model"], r["task"], r["shots"], r["policy"]) == (model, task, shots, "full"))
        oracle = next(r for r in rows if (r["model"], r["task"], r["shots"], r["policy"]) == (model, task, shots, "oracle"))
        cells = []
        for kind in KINDS:
            best = next((h for h in result.get("hindsight", []) if (h["model"], h["task"], h["policy"]) == (model, f"{task}@{shots}", kind)), None)
            cells.append("-" if best is None else f"{_pct(best['layers_saved'])} ({_pct(best['acc'])}, {_pct(best['agreement'])})")
        lines.append(f"| {model} | {task} | {shots} | {_pct(full['full_acc'])} | {_pct(oracle['layers_saved'])} | " + " | ".join(cells)
                     + f" | {'AT CHANCE' if full['at_chance'] else ''} |")
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cells = sorted({(r["model"], f"{r['task']}@{r['shots']}") for r in rows})
    cols = min(4, len(cells))
    nrows = math.ceil(len(cells) / cols)
    height = 3.4 * nrows + 1.0  # + legend and title
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, height), squeeze=False)
    colors = {"svm": "tab:blue", "crf": "tab:orange", "threshold": "tab:green"}
    markers = {"intra": "o", "inter-task": "s", "inter-model": "^"}
    for ax, (model, task) in zip(axes.flat, cells):
        mine = [r for r in rows if r["model"] == model and f"{r['task']}@{r['shots']}" == task]
        full = next(r for r in mine if r["policy"] == "full")
        for c in result["curves"]:
            if c["model"] == model and c["task"] == task:
                pts = np.array(sorted(c["points"]))
                ax.plot(100 * pts[:, 0], 100 * pts[:, 1], color=colors[c["policy"]], alpha=0.35, linewidth=1)
        for r in mine:
            if r["policy"] in colors:
                ax.scatter(100 * r["layers_saved"], 100 * r["acc"], color=colors[r["policy"]], marker=markers[r["setting"]],
                           facecolors=colors[r["policy"]] if r["criterion"] == "accuracy" else "none", s=28)
        oracle = next(r for r in mine if r["policy"] == "oracle")
        ax.scatter([0], [100 * full["acc"]], color="black", marker="*", s=80)
        ax.scatter([100 * oracle["layers_saved"]], [100 * oracle["acc"]], color="purple", marker="D", s=40)
        ax.axhline(100 * full["chance"], color="grey", linestyle=":")
        ax.set_title(f"{model} {task}" + (" (AT CHANCE)" if full["at_chance"] else ""), fontsize=8)
        ax.set_xlabel("layers saved %", fontsize=8)
        ax.set_ylabel("accuracy %", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    legend = [Line2D([], [], color=c, marker="o", linestyle="-", label=k) for k, c in colors.items()]
    legend += [Line2D([], [], color="grey", marker=m, linestyle="", label=s) for s, m in markers.items()]
    legend += [Line2D([], [], color="black", marker="*", linestyle="", label="full depth"),
               Line2D([], [], color="purple", marker="D", linestyle="", label="oracle"),
               Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="", label="hollow: agreement point"),
               Line2D([], [], color="grey", linestyle=":", label="chance")]
    fig.legend(handles=legend, loc="lower center", ncol=6, fontsize=8)
    fig.suptitle("accuracy vs layers saved on the test documents; markers: calibrated operating points; "
                 "lines: each intra-task policy's threshold swept on the test documents (hindsight)", fontsize=9)
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(result: dict, out: Path, meta: dict) -> list[Path]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    written = []
    def rounded(x):  # 6 significant digits are plenty for a report; keeps the file small
        if isinstance(x, float):
            return float(f"{x:.6g}")
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [rounded(v) for v in x]
        return x

    (out / "results.json").write_text(json.dumps(rounded({"meta": meta, **result}), separators=(",", ":")) + "\n")
    written.append(out / "results.json")
    fields = ["model", "task", "shots", "layers", "n_test", "chance", "at_chance", "full_acc", "policy", "setting", "criterion",
              "acc", "delta_points", "mean_exit_layer", "layers_saved", "agreement", "trained_model", "trained_on", "n_train",
              "threshold", "min_layer"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    written.append(out / "results.csv")
    text = [f"# AdaInfer study: generated tables", "",
            f"Generated by `{meta['command']}` ({meta['seconds']:.0f}s for the offline part); "
            f"read README.md for the method and what the numbers say.", "",
            markdown_tables(result), "![accuracy vs layers saved](accuracy_vs_layers_saved.png)", ""]
    check = meta.get("backend_check")
    if check:
        text += ["### Offline evaluation vs the real backend", "",
                 f"{check['model']}'s intra-task policies for {check['task']} (operating point `{check['criterion']}`) run through "
                 f"`lm_eval.simple_evaluate(model=\"adainfer\", ...)` on the first {check['docs']} documents of the task "
                 "(a mechanics check: these rows may include SST-2's training half), against the offline evaluation of "
                 "the same documents' collected features:", "",
                 "| policy | docs | exit layers equal | answers equal | acc offline % | acc backend % | backend exit layers |", "|---|---|---|---|---|---|---|"]
        for kind, r in check["policies"].items():
            text.append(f"| `{r['policy']}` | {r['docs']} | {r['exits_equal']} | {r['answers_equal']} | {_pct(r['offline_acc'])} | "
                        f"{_pct(r['backend_acc'])} | {' '.join(map(str, r['backend_exits']))} |")
        text.append("")
    (out / "report.md").write_text("\n".join(text))
    written.append(out / "report.md")
    plot(result, out / "accuracy_vs_layers_saved.png")
    written.append(out / "accuracy_vs_layers_saved.png")
    return written

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="model[:docs per task and role], comma-separated")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="task[@shots], comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="document sampling and SST-2 split seed")
    parser.add_argument("--collect-dir", type=Path, default=Path("out/study/collect"))
    parser.add_argument("--collect-only", action="store_true", help="collect the feature files and stop")
    parser.add_argument("--threads", type=int, help="torch threads while collecting (1 on a shared machine)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="the operating points' 1 point / 1% of answers")
    parser.add_argument("--inner-folds", type=int, default=4, help="folds for the held-out calibration scores")
    parser.add_argument("--check-docs", type=int, default=0,
                        help="also run the first model's intra-task policies for the first task through lm-eval on this "
                             "many test documents and compare with the offline evaluation")
    parser.add_argument("--out", type=Path, default=Path("reports/study"))
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.time()
    try:
        models = parse_models(args.models)
        specs = [TaskSpec.parse(t) for t in args.tasks.split(",") if t]
        print(f"collecting into {args.collect_dir} (missing files only) ...", flush=True)
        collect_all(models, specs, args.collect_dir, args.seed, log=lambda m: print(m, flush=True))
        if args.collect_only:
            print(f"collected in {time.time() - started:.0f}s")
            return 0
        t0 = time.time()
        collections = load_collections(args.collect_dir, list(models), specs)
        fitted: dict = {}
        result = run_study(collections, list(models), specs, args.tolerance, args.inner_folds, args.seed,
                           log=lambda m: print(m, flush=True), fitted_out=fitted)
        seconds = time.time() - t0
        check = None
        if args.check_docs:  # the offline evaluation against lm-eval's backend, on a slice
            model, spec = next(iter(models)), specs[0]
            kinds = {k: fitted[(model, spec.label, "intra", k)] for k in KINDS}
            report = backend_check(model, spec, args.check_docs, kinds, collections[(model, spec.label, "train")],
                                   args.collect_dir.parent / "check")
            check = {"model": model, "task": spec.label, "docs": args.check_docs, "criterion": "accuracy", "policies": report}
            for kind, r in report.items():
                print(f"backend check {model} {spec.label} {kind}: {r['docs']} docs, exits equal {r['exits_equal']}, "
                      f"answers equal {r['answers_equal']} (acc offline {_pct(r['offline_acc'])}%, backend {_pct(r['backend_acc'])}%)")
        meta = {
            "command": "python -m adainfer_lmeval.experiments.study " + " ".join(shlex.quote(a) for a in argv),
            "seconds": seconds, "tolerance": args.tolerance, "inner_folds": args.inner_folds, "backend_check": check,
            "label": {"mode": "final", "prediction": "option"},
            "collections": {f"{m}/{t}-{r}": {"data_sha256": d.meta.get("data_sha256"), "docs": len(d.keys),
                                              "source": sorted(set(d.source)), "seconds": d.meta.get("seconds")}
                            for (m, t, r), d in collections.items()},
            "packages": package_versions(),
        }
        for path in write_outputs(result, args.out, meta):
            print(f"wrote {path}")
        print(f"done in {time.time() - started:.0f}s")
        return 0
    except AdaInferError as error:
        print(f"study: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
