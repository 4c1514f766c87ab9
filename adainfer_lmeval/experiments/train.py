"""Train AdaInfer's stop classifiers (SVM, CRF) from collected per-layer features.

    python -m adainfer_lmeval.experiments.train --model smollm2-135m --docs 12 --shots 0,3 --out policies/smollm2-135m

collects features (:mod:`adainfer_lmeval.experiments.collect`) over the training tasks unless
``--features FILE`` gives a collection, builds labels, fits both classifiers, picks each
one's operating point and writes ``svm.json``, ``crf.json`` + ``crf.crfsuite``.

Labels (per document and layer l = 1..L-1; layer L is never a decision):

* ``--label gold`` (paper v1): layer l is a stop point when its prediction is the gold answer;
* ``--label final`` (paper v3): when its prediction equals the full-depth prediction.

"Prediction" (``--prediction``) is ``option`` (the answer option with the highest summed
loglikelihood at that layer, i.e. what lm-eval's ``acc`` scores if the request exits there),
``token`` (the full-vocabulary top-1 token at the decision position; target: the gold
option's first token, or the full-depth top-1 token), or ``both``. The shipped policies use
``option``: an exit changes the score only through the option it picks. The script prints
the effect of every choice.

Operating point: a policy stops at the first layer l >= ``min_layer`` whose score (SVM
decision value; CRF marginal P(stop at l | layers 1..l)) reaches ``threshold``. The pair is
chosen on *held-out* training documents (cross-fitted scores: each document scored by a
classifier fitted without it) as the one with the fewest layers run whose accuracy stays
within ``--tolerance`` (1 point) of full depth on those documents; each consultation is
charged ``--check-cost`` layers (0.05: the issue's budget for one exit decision), so that a
policy consults only from the layer where it starts to exit. Reported validation
figures are cross-validated: each document's exit comes from a policy (classifier and
operating point) fitted on the other folds only.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.paths import shipped_dir
from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.offline.pypi import package_versions
from adainfer_lmeval.policies.learned import LearnedKind, learned_kind
from adainfer_lmeval.policies.files import FORMAT, FORMAT_VERSION, write_policy_files

DEFAULT_TASKS = (
    "arc_easy_train", "arc_challenge_train", "boolq_train", "commonsense_qa_train",
    "openbookqa_train", "piqa_train", "mmlu_dev_val",
)
LABEL_MODES = ("gold", "final")
PREDICTIONS = ("option", "token", "both")


@dataclass
class Data:
    feats: np.ndarray  # [N, L, F] layers 1..L, FEATURE_NAMES order
    top1: np.ndarray  # [N, L]
    choice: np.ndarray  # [N, L]
    gold: np.ndarray  # [N]
    gold_token: np.ndarray  # [N] first token of the gold option
    keys: list[str]  # task:doc_id (a document's folds ignore shots)
    source: list[str]
    shots: np.ndarray
    n_options: np.ndarray
    meta: dict

    @property
    def num_layers(self) -> int:
        return self.feats.shape[1]

    def subset(self, idx) -> "Data":
        idx = np.asarray(idx)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return Data(self.feats[idx], self.top1[idx], self.choice[idx], self.gold[idx], self.gold_token[idx],
                    pick(self.keys), pick(self.source), self.shots[idx], self.n_options[idx], self.meta)


def load_data(path: Path) -> Data:
    from adainfer_lmeval.experiments.collect import read_collection

    meta, cols = read_collection(path)
    if list(meta.get("feature_names", [])) != list(FEATURE_NAMES):
        raise AdaInferError(f"{path}: features {meta.get('feature_names')} differ from {list(FEATURE_NAMES)}")
    feats = np.array(cols["features"], dtype=np.float64)
    return Data(
        feats=feats, top1=np.array(cols["top1"]), choice=np.array(cols["option_choice"]),
        gold=np.array(cols["gold"]), gold_token=np.array([o[g] for o, g in zip(cols["option_first_token"], cols["gold"])]),
        keys=[f"{t}:{d}" for t, d in zip(cols["task"], cols["doc_id"])], source=list(cols["source"]),
        shots=np.array(cols["num_fewshot"]), n_options=np.array(cols["n_options"]), meta=meta,
    )


# ---- labels ----------------------------------------------------------------------------------


def make_labels(data: Data, mode: str, prediction: str) -> np.ndarray:
    """Bool [N, L-1]: is layer l (1..L-1) a stop point."""
    L = data.num_layers
    if mode not in LABEL_MODES or prediction not in PREDICTIONS:
        raise AdaInferError(f"label mode must be one of {LABEL_MODES} and prediction one of {PREDICTIONS}")
    target_option = data.gold if mode == "gold" else data.choice[:, L - 1]
    target_token = data.gold_token if mode == "gold" else data.top1[:, L - 1]
    by_option = data.choice[:, : L - 1] == target_option[:, None]
    by_token = data.top1[:, : L - 1] == target_token[:, None]
    return {"option": by_option, "token": by_token, "both": by_option & by_token}[prediction]


def fold_of(keys: list[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold 0..k-1 of each document, from a hash of its key (all shots of a doc together)."""
    return np.array([int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % k for key in keys])


# ---- classifiers -----------------------------------------------------------------------------


def layer_features(data: Data, cols: list[int]) -> np.ndarray:
    """The features a classifier reads: layers 1..L-1 (layer L is never a decision), columns ``cols``."""
    return data.feats[:, : data.num_layers - 1, :][:, :, cols]


def fit_classifier(kind: str, data: Data, y: np.ndarray, cols: list[int], **options) -> LearnedKind:
    """A classifier of ``kind`` (:data:`adainfer_lmeval.policies.learned.LEARNED_KINDS`) fitted on layers 1..L-1."""
    return learned_kind(kind)().fit(layer_features(data, cols), y, **options)


def classifier_scores(estimator: LearnedKind, data: Data, cols: list[int]) -> np.ndarray:
    """Scores [N, L-1] by the function the policy runs: SVM decision value, CRF prefix marginal
    P(stop at l | layers 1..l) (never reading later layers)."""
    x = torch.from_numpy(np.ascontiguousarray(layer_features(data, cols), dtype=np.float64))
    return estimator.decision_function(x).numpy()


# ---- exits, accuracy and the operating point ---------------------------------------------------


def exit_layers(scores: np.ndarray, threshold: float, min_layer: int) -> np.ndarray:
    """First layer l (1-based, >= min_layer, < L) with score >= threshold; L when none."""
    n, m = scores.shape  # m = L - 1
    stop = scores >= threshold
    stop[:, : max(0, min_layer - 1)] = False
    first = np.where(stop.any(1), stop.argmax(1) + 1, m + 1)
    return first


def evaluate(data: Data, exits: np.ndarray) -> dict:
    correct = data.choice[np.arange(len(exits)), exits - 1] == data.gold
    L = data.num_layers
    return {
        "n_docs": int(len(exits)),
        "chance_acc": float((1.0 / data.n_options).mean()),
        "full_acc": float((data.choice[:, L - 1] == data.gold).mean()),
        "policy_acc": float(correct.mean()),
        "mean_exit_layer": float(exits.mean()),
        "layers_saved": float(1 - exits.mean() / L),
        "agreement_with_full": float((data.choice[np.arange(len(exits)), exits - 1] == data.choice[:, L - 1]).mean()),
    }


DEFAULT_CHECK_COST = 0.05  # one consultation, in decoder layers (the target of reports/benchmark/)


def calibrate(data: Data, scores: np.ndarray, tolerance: float = 0.01, n_thresholds: int = 80,
              criterion: str = "accuracy", check_cost: float = 0.0, chain_start: int | None = None) -> dict:
    """The (threshold, min_layer) with the fewest layers whose accuracy >= full - tolerance.

    ``criterion="agreement"`` is stricter: at most ``tolerance`` of the documents may change
    their answer at all (which bounds the accuracy drop by ``tolerance`` too).

    ``check_cost``: what one consultation (exit head + features + classifier) costs in
    decoder layers. The point minimises layers run + check_cost × checks made, so that of two
    points that exit alike the one that consults from a later layer wins: a policy consults
    only in the band of layers where it exits. A CRF reads every layer of its chain from
    ``chain_start`` on whatever ``min_layer`` is, so its consultations are counted from there.
    """
    L = data.num_layers
    full = float((data.choice[:, L - 1] == data.gold).mean())
    final = data.choice[:, L - 1]
    qs = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, n_thresholds)))
    best = {"threshold": float(np.max(scores) + 1.0), "min_layer": L - 1, "mean_exit_layer": float(L), "acc": full,
            "mean_checks": float(L - 1 - (L - 1 if chain_start is None else min(chain_start, L - 1)) + 1)}
    cost = lambda point: point["mean_exit_layer"] + check_cost * point["mean_checks"]  # noqa: E731
    rows = np.arange(len(scores))
    for threshold in qs:
        # first_from[:, m-1]: the first layer >= m whose score reaches the threshold (L if none),
        # i.e. exit_layers(scores, threshold, m) for every m at once
        stop = scores >= threshold
        first_from = np.full((len(scores), L), L)
        for layer in range(L - 1, 0, -1):
            first_from[:, layer - 1] = np.where(stop[:, layer - 1], layer, first_from[:, layer])
        for min_layer in range(1, L):
            exits = first_from[:, min_layer - 1]
            picked = data.choice[rows, exits - 1]
            acc = float((picked == data.gold).mean())
            mean_exit = float(exits.mean())
            ok = acc >= full - tolerance - 1e-12 if criterion == "accuracy" else float((picked != final).mean()) <= tolerance + 1e-12
            # consulted at min_layer .. exit (.. L-1 for rows that never stop)
            first_check = min_layer if chain_start is None else min(chain_start, min_layer)
            point = {"threshold": float(threshold), "min_layer": int(min_layer), "mean_exit_layer": mean_exit, "acc": acc,
                     "mean_checks": float((np.minimum(exits, L - 1) - first_check + 1).mean())}
            if ok and (cost(point), -acc) < (cost(best), -best["acc"]):
                best = point
    best["full_acc"] = full
    best["check_cost"] = check_cost
    return best


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
               criterion: str = "accuracy", check_cost: float = 0.0, **kw):
    """Fit on all of ``data``; operating point from cross-fitted (held-out) scores."""
    held_out = cross_fitted_scores(data, y, kind, cols, k_inner, seed + 1, **kw)
    point = calibrate(data, held_out, tolerance, criterion=criterion, check_cost=check_cost,
                      chain_start=learned_kind(kind).seq_start)
    point["criterion"] = criterion
    return fit_classifier(kind, data, y, cols, **kw), point


def cross_validate(data: Data, y: np.ndarray, kind: str, cols: list[int], tolerance: float, k_outer: int, k_inner: int,
                   seed: int, criterion: str = "accuracy", check_cost: float = 0.0, **kw) -> dict:
    """Held-out figures: each document's exit from a policy fitted (and calibrated) without it."""
    folds = fold_of(data.keys, k_outer, seed)
    exits = np.full(len(data.keys), data.num_layers)
    for f in range(k_outer):
        test, train = np.where(folds == f)[0], np.where(folds != f)[0]
        if len(test) == 0 or len(train) == 0:
            continue
        params, point = fit_policy(data.subset(train), y[train], kind, cols, tolerance, k_inner, seed, criterion,
                                   check_cost, **kw)
        exits[test] = exit_layers(classifier_scores(params, data.subset(test), cols), point["threshold"], point["min_layer"])
    result = evaluate(data, exits)
    result["exits"] = exits
    return result


def best_static_layer(data: Data, tolerance: float) -> dict:
    """The shallowest fixed exit layer within ``tolerance`` of full depth (a baseline)."""
    L = data.num_layers
    full = float((data.choice[:, L - 1] == data.gold).mean())
    for layer in range(1, L + 1):
        acc = float((data.choice[:, layer - 1] == data.gold).mean())
        if acc >= full - tolerance - 1e-12:
            return {"layer": layer, "acc": acc, "full_acc": full}
    return {"layer": L, "acc": full, "full_acc": full}


# ---- writing policy files --------------------------------------------------------------------


def policy_meta(kind: str, data: Data, params: LearnedKind, point: dict, features: list[str], label: dict,
                validation: dict, training: dict) -> dict:
    """The policy file's JSON for the fitted classifier ``params`` (of ``kind``) at ``point``."""
    if params.kind != kind:
        raise AdaInferError(f"a {params.kind} classifier cannot be written as a {kind} policy")
    model = data.meta["model"]
    payload = params.to_dict()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "model": {k: model[k] for k in ("name", "model_type", "num_layers", "hidden_size", "vocab_size")},
        "features": features,
        "scaler": payload.pop("scaler"),
        "threshold": point["threshold"],
        "min_layer": point["min_layer"],
        "operating_point": {
            "rule": f"stop at the first layer l >= min_layer with score >= threshold (score: {params.score_meaning})",
            "chosen_on": "cross-fitted held-out scores of the training documents",
            "tolerance": training["tolerance"], "criterion": point.get("criterion", "accuracy"),
            "calibration_acc": point["acc"], "calibration_full_acc": point["full_acc"],
            "calibration_mean_exit_layer": point["mean_exit_layer"],
            "calibration_mean_checks": point["mean_checks"], "check_cost_in_layers": point["check_cost"],
        },
        "label": label,
        "training": training,
        "validation": {k: v for k, v in validation.items() if k != "exits"},
        "packages": package_versions(),
    }
    meta.update(payload)
    return meta


def write_policy(out_dir: Path, kind: str, meta: dict, params: LearnedKind) -> list[Path]:
    """``<kind>.json`` and the classifier's files in ``out_dir`` (the JSON first)."""
    return write_policy_files(out_dir, kind, meta, params.files())


# ---- the command -----------------------------------------------------------------------------


def _pct(v: float) -> str:
    return f"{100 * v:5.1f}"


def label_study(data: Data, cols: list[int], tolerance: float, k_outer: int, k_inner: int, seed: int,
                criterion: str = "accuracy", check_cost: float = 0.0) -> list[dict]:
    """SVM held-out figures for every label mode × prediction kind."""
    rows = []
    for mode in LABEL_MODES:
        for prediction in PREDICTIONS:
            y = make_labels(data, mode, prediction)
            cv = cross_validate(data, y, "svm", cols, tolerance, k_outer, k_inner, seed, criterion, check_cost)
            rows.append({"mode": mode, "prediction": prediction, "positive_rate": float(y.mean()),
                         **{k: v for k, v in cv.items() if k != "exits"}})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--features", type=Path, help="train on this collection (parquet from adainfer_lmeval.experiments.collect); default: collect now into out/collect/<model>.parquet")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--shots", default="0,3")
    parser.add_argument("--docs", type=int, default=12, help="documents per task and shot setting (when collecting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", choices=LABEL_MODES, default="final")
    parser.add_argument("--prediction", choices=PREDICTIONS, default="option")
    parser.add_argument("--use-features", default=",".join(FEATURE_NAMES), help="features the classifiers read")
    parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy drop allowed at the operating point")
    parser.add_argument("--criterion", choices=("accuracy", "agreement"), default="agreement",
                        help="operating point: accuracy within tolerance of full depth, or at most tolerance answers changed")
    parser.add_argument("--check-cost", type=float, default=DEFAULT_CHECK_COST,
                        help="cost of one consultation in decoder layers, charged when choosing the operating point "
                             "(of points that exit alike, the one consulting fewer layers wins)")
    parser.add_argument("--folds", type=int, default=5, help="outer folds for the validation figures")
    parser.add_argument("--inner-folds", type=int, default=4, help="folds for the held-out calibration scores")
    parser.add_argument("--kinds", default="svm,crf")
    parser.add_argument("--no-study", action="store_true", help="skip the label-mode study")
    parser.add_argument("--threads", type=int, help="torch threads while collecting (1 is faster on a shared machine)")
    parser.add_argument("--out", type=Path, help="folder for the policy files (default: policies/<model>)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.time()
    try:
        features_path = args.features
        if features_path is None:  # from scratch: collect now
            from adainfer_lmeval.experiments.collect import collect

            features_path = Path("out/collect") / f"{Path(args.model).name}.parquet"
            print(f"collecting features into {features_path} ...", flush=True)
            collect(args.model, args.tasks.split(","), [int(s) for s in args.shots.split(",")], args.docs,
                    features_path, seed=args.seed)
        data = load_data(features_path)
        use = [f for f in args.use_features.split(",") if f]
        unknown = [f for f in use if f not in FEATURE_NAMES]
        if unknown:
            raise AdaInferError(f"unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURE_NAMES)}")
        cols = [FEATURE_NAMES.index(f) for f in use]
        L = data.num_layers
        model_name = data.meta["model"]["name"]
        out_dir = args.out or shipped_dir("policies") / model_name
        print(f"model {model_name}: {L} layers; {len(data.keys)} examples ({len(set(data.keys))} documents) "
              f"from {len(set(data.source))} tasks, shots {sorted(set(data.shots.tolist()))}")
        static = best_static_layer(data, args.tolerance)
        print(f"full depth acc {_pct(static['full_acc'])}% (chance {_pct(float((1.0 / data.n_options).mean()))}%); shallowest static layer within {100 * args.tolerance:g} pt "
              f"(in-sample): {static['layer']} ({_pct(static['acc'])}%)")
        study = []
        if not args.no_study:
            study = label_study(data, cols, args.tolerance, args.folds, args.inner_folds, args.seed, args.criterion,
                                args.check_cost)
            print("\nlabel study (SVM, cross-validated held-out documents):")
            print("  label  prediction  stop-rate  full-acc  policy-acc  mean-exit  layers-saved")
            for r in study:
                print(f"  {r['mode']:<5}  {r['prediction']:<10}  {_pct(r['positive_rate'])}%    {_pct(r['full_acc'])}%    "
                      f"{_pct(r['policy_acc'])}%     {r['mean_exit_layer']:5.2f}/{L}   {_pct(r['layers_saved'])}%")
        y = make_labels(data, args.label, args.prediction)
        label = {"mode": args.label, "prediction": args.prediction,
                 "meaning": ("layer's best answer option" if args.prediction == "option" else
                             "layer's full-vocabulary top-1 token" if args.prediction == "token" else
                             "best option and top-1 token both")
                 + (" equals the gold answer (paper v1)" if args.label == "gold" else " equals the full-depth one (paper v3)")}
        parts = data.meta.get("parts", [])
        training = {
            "tasks": sorted(set(data.source)), "shots": sorted(set(data.shots.tolist())),
            "docs": len(data.keys), "documents": len(set(data.keys)),
            "data_sha256": data.meta.get("data_sha256"),
            "collection_file_sha256": hashlib.sha256(features_path.read_bytes()).hexdigest(),
            "parts": parts, "seed": args.seed, "fewshot_seed": data.meta.get("fewshot_seed"),
            "tolerance": args.tolerance, "folds": args.folds, "inner_folds": args.inner_folds,
            "command": "python -m adainfer_lmeval.experiments.train " + " ".join(shlex.quote(a) for a in argv),
            "collection_packages": data.meta.get("packages"),
        }
        if study:
            training["label_study"] = study
        print(f"\nshipping label={args.label} prediction={args.prediction} (stop rate {_pct(float(y.mean()))}%), features {use}")
        for kind in [k for k in args.kinds.split(",") if k]:
            cv = cross_validate(data, y, kind, cols, args.tolerance, args.folds, args.inner_folds, args.seed, args.criterion,
                                args.check_cost)
            params, point = fit_policy(data, y, kind, cols, args.tolerance, args.inner_folds, args.seed, args.criterion,
                                       args.check_cost)
            meta = policy_meta(kind, data, params, point, use, label, cv, training)
            paths = write_policy(out_dir, kind, meta, params)
            print(f"{kind}: validation (cross-validated, {cv['n_docs']} examples): full {_pct(cv['full_acc'])}%  "
                  f"{kind} {_pct(cv['policy_acc'])}%  mean exit {cv['mean_exit_layer']:.2f}/{L}  "
                  f"layers saved {_pct(cv['layers_saved'])}%  | operating point threshold={point['threshold']:.4g} "
                  f"min_layer={point['min_layer']}, {point['mean_checks']:.1f} consultations per example (held-out calibration acc {_pct(point['acc'])}% vs full "
                  f"{_pct(point['full_acc'])}%, mean exit {point['mean_exit_layer']:.2f})")
            print("   wrote " + ", ".join(f"{p} ({p.stat().st_size} B)" for p in paths))
        print(f"done in {time.time() - started:.0f}s")
        return 0
    except AdaInferError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
