"""Train AdaInfer's stop policies (SVM, CRF, a calibrated option margin) from collected signals.

    python -m adainfer_lmeval.experiments.train --model smollm2-135m --docs 12 --shots 0,3 --out policies/smollm2-135m

collects signals (:mod:`adainfer_lmeval.experiments.collect`) over the training tasks unless
``--features FILE`` gives a collection, builds labels
(:mod:`adainfer_lmeval.experiments.training_data`), fits each kind of ``--kinds`` and picks its
operating point (:mod:`adainfer_lmeval.experiments.fitting`), and writes ``svm.json``,
``crf.json`` + ``crf.crfsuite``, ``margin.json``, ``simlens.json``.

The classifiers read the signals of ``--use-features``: the paper's (p1, gap, entropy, cosine,
depth) and the answer-option ones (margin, option_change, option_kl), derived from the
collection's option logits, and ``continuation_margin`` (the option margin read off the SimLens
continuation). ``margin`` and ``simlens`` fit nothing: their files hold the operating point of
the ``policy=margin`` / ``policy=simlens`` rule; ``simlens`` is calibrated on the answers it
gives, the continuation's, with its carries counted. Kinds or features that need the
continuation read it from beside the collection (:mod:`.collect_continuation`), collecting it
first where it is missing or stale. ``--carry filled`` calibrates ``simlens`` on the filled
read-out instead (:mod:`.filled_continuation`, carries from ``--carry-from-layer`` up, written
beside the collection first where it is missing), and its file runs with ``carry=filled``.

Operating point (:mod:`adainfer_lmeval.experiments.calibration`): a policy stops at the first
layer l >= ``min_layer`` whose score (SVM decision value; CRF marginal P(stop at l | layers
1..l); the margin) reaches ``threshold``. The pair is chosen on *held-out* training documents
(cross-fitted scores: each document scored by a classifier fitted without it). By default
(``--criterion guarantee``) it is the cheapest point whose 95% (``--confidence``) upper bound
on the rate of answers changed against full depth is at most ``--max-changed`` (0.01); the
empirical criteria ``agreement`` (at most ``--tolerance`` changed) and ``accuracy`` (within
``--tolerance`` of full depth) remain. Each consultation is charged ``--check-cost`` layers
(0.05: the issue's budget for one exit decision), so that a policy consults only from the
layer where it starts to exit. Reported validation figures are cross-validated: each
document's exit comes from a policy (classifier and operating point) fitted on the other folds.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from pathlib import Path

from adainfer_lmeval.core.exit_policy import CONTINUATION_CARRIES
from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.calibration import CRITERIA, DEFAULT_CHECK_COST, best_static_layer
from adainfer_lmeval.experiments.fitting import cross_validate, fit_policy, kind_readout, label_study
from adainfer_lmeval.experiments.training_data import (CONTINUATION_SIGNALS, LABEL_MODES, OPTION_SIGNALS, PREDICTIONS, Data,
                                                       load_data, make_labels)
from adainfer_lmeval.offline.pypi import package_versions
from adainfer_lmeval.paths import shipped_dir
from adainfer_lmeval.policies.files import FORMAT, FORMAT_VERSION, GUARANTEE_FIELDS, write_policy_files
from adainfer_lmeval.policies.learned.base import LearnedKind, learned_kind

#: the training splits the shipped policies are fitted on
TRAINING_TASKS = (
    "arc_easy_train", "arc_challenge_train", "boolq_train", "commonsense_qa_train",
    "openbookqa_train", "piqa_train", "mmlu_dev_val",
)


# ---- writing policy files --------------------------------------------------------------------


def policy_meta(kind: str, data: Data, params: LearnedKind, point: dict, features: list[str], label: dict,
                validation: dict, training: dict) -> dict:
    """The policy file's JSON for the fitted ``params`` (of ``kind``) at ``point`` (from
    :func:`~adainfer_lmeval.experiments.calibration.calibrate`)."""
    if params.kind != kind:
        raise AdaInferError(f"a {params.kind} classifier cannot be written as a {kind} policy")
    model = data.meta["model"]
    payload = params.to_dict()
    criterion = point.get("criterion", "accuracy")
    chosen_by = ({key: point[key] for key in GUARANTEE_FIELDS + ("passed",)} if criterion == "guarantee"
                 else {"tolerance": point.get("tolerance", training.get("tolerance"))})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "model": {k: model[k] for k in ("name", "model_type", "num_layers", "hidden_size", "vocab_size")},
        "features": features,
        **({"scaler": payload.pop("scaler")} if params.scaled else {}),
        "threshold": point["threshold"],
        "min_layer": point["min_layer"],
        "operating_point": {
            "rule": f"stop at the first layer l >= min_layer with score >= threshold (score: {params.score_meaning})",
            "chosen_on": ("the training documents' scores (nothing is fitted)" if not params.fits_parameters
                          else "cross-fitted held-out scores of the training documents"),
            "criterion": criterion, **chosen_by,
            "calibration_acc": point["acc"], "calibration_full_acc": point["full_acc"],
            "calibration_mean_exit_layer": point["mean_exit_layer"],
            "calibration_mean_checks": point["mean_checks"], "check_cost_in_layers": point["check_cost"],
            # the SimLens carries (checks reading the continuation, answers read off it), in layers
            **({"calibration_continuation_layers": point["continuation_layers"]} if point.get("continuation_layers") else {}),
        },
        **({"label": label} if params.fits_parameters else {}),
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


def _with_continuation(data: Data, collection: Path, model: str, carry: str = "simlens", from_layer: int = 1) -> Data:
    """``data`` with the continuation read-out of ``collection`` (SimLens's, or with ``carry``
    "filled" the filled one from ``from_layer``) and its signal, collecting the read-out first
    (with ``model``) where it is missing or stale."""
    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.experiments.collect_continuation import collect_continuation, continuation_is_current, continuation_path
    from adainfer_lmeval.experiments.filled_continuation import read_filled, write_filled
    from adainfer_lmeval.experiments.training_data import with_continuation, with_continuation_signals

    def backend():
        return AdaInferLM(pretrained=model, policy="full", batch_size=1, device="cpu")

    if carry == "filled":
        filled = read_filled(data, collection, from_layer)
        if filled is None:
            print(f"collecting the filled read-out of {collection} from layer {from_layer} ...", flush=True)
            write_filled(backend(), collection, from_layer, [None], log=lambda m: print(m, flush=True))
            filled = read_filled(data, collection, from_layer)
        return with_continuation_signals(filled)
    if not continuation_is_current(continuation_path(collection), data.meta):
        print(f"collecting the continuation read-out of {collection} ...", flush=True)
        written = collect_continuation(backend(), collection, quiet=False)
        print(f"  {written['docs']} documents in {written['seconds']:.0f}s -> {continuation_path(collection)}")
    return with_continuation_signals(with_continuation(data, collection))


def _pct(v: float) -> str:
    return f"{100 * v:5.1f}"


def _operating_point_line(kind: str, point: dict) -> str:
    """One line: where the policy runs, and on what evidence (the guarantee's, if it is one)."""
    where = f"threshold={point['threshold']:.4g} min_layer={point['min_layer']}"
    if point["criterion"] != "guarantee":
        return f"operating point {where} ({point['criterion']}, tolerance {point['tolerance']:g})"
    evidence = (f"{point['calibration_changed']} of {point['calibration_docs']} calibration documents changed, "
                f"{100 * point['confidence']:g}% upper bound {100 * point['changed_upper_bound']:.2f}% "
                f"(each min_layer tested at {100 * point['path_confidence']:.3g}%)")
    if not point["passed"]:
        return (f"no operating point keeps the changed answers <= {100 * point['max_changed']:g}% at "
                f"{100 * point['confidence']:g}% confidence ({evidence} even at full depth): {kind} never exits ({where})")
    return f"operating point {where}: {evidence} <= {100 * point['max_changed']:g}%"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--features", type=Path, help="train on this collection (parquet from adainfer_lmeval.experiments.collect); default: collect now into out/collect/<model>.parquet")
    parser.add_argument("--tasks", default=",".join(TRAINING_TASKS))
    parser.add_argument("--shots", default="0,3")
    parser.add_argument("--docs", type=int, default=12, help="documents per task and shot setting (when collecting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", choices=LABEL_MODES, default="final")
    parser.add_argument("--prediction", choices=PREDICTIONS, default="option")
    parser.add_argument("--use-features", default=",".join(FEATURE_NAMES),
                        help=f"signals the SVM/CRF read, of {', '.join(FEATURE_NAMES + OPTION_SIGNALS + CONTINUATION_SIGNALS)}")
    parser.add_argument("--criterion", choices=CRITERIA, default="guarantee",
                        help="operating point: at most --max-changed answers changed at --confidence (guarantee), "
                             "at most --tolerance changed on the calibration documents (agreement), or accuracy "
                             "within --tolerance of full depth (accuracy)")
    parser.add_argument("--max-changed", type=float, default=0.01, help="δ of the guarantee: rate of answers changed")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the guarantee's binomial bound")
    parser.add_argument("--tolerance", type=float, default=0.01, help="what the empirical criteria allow")
    parser.add_argument("--check-cost", type=float, default=DEFAULT_CHECK_COST,
                        help="cost of one consultation in decoder layers, charged when choosing the operating point "
                             "(of points that exit alike, the one consulting fewer layers wins)")
    parser.add_argument("--folds", type=int, default=5, help="outer folds for the validation figures")
    parser.add_argument("--inner-folds", type=int, default=4, help="folds for the held-out calibration scores")
    parser.add_argument("--kinds", default="svm,crf",
                        help="of svm, crf, margin, simlens (margin/simlens: the rule's operating point)")
    parser.add_argument("--carry", choices=CONTINUATION_CARRIES, default="simlens",
                        help="the continuation simlens is calibrated on and runs with: simlens, or filled (the carried "
                             "positions attending to the whole prompt; only --kinds simlens)")
    parser.add_argument("--carry-from-layer", type=int, default=1,
                        help="with --carry filled: the first layer a filled carry starts from (no exit below it)")
    parser.add_argument("--no-study", action="store_true", help="skip the label-mode study")
    parser.add_argument("--threads", type=int, help="torch threads while collecting (1 is faster on a shared machine)")
    parser.add_argument("--out", type=Path, help="folder for the policy files (default: policies/<model>)")
    args = parser.parse_args(argv)
    if not 0 < args.max_changed < 1 or not 0 < args.confidence < 1:
        parser.error("--max-changed and --confidence must be between 0 and 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.time()
    choose = {"criterion": args.criterion, "check_cost": args.check_cost, "max_changed": args.max_changed,
              "confidence": args.confidence}
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
        kinds = [k for k in args.kinds.split(",") if k]
        reads = {kind: use if learned_kind(kind).fits_parameters else list(learned_kind(kind).policy.features) for kind in kinds}
        if args.carry != "simlens" and any(learned_kind(kind).fits_parameters and set(reads[kind]) & set(CONTINUATION_SIGNALS)
                                           for kind in kinds):
            raise AdaInferError(f"--carry {args.carry} is for --kinds simlens; the classifiers read the SimLens continuation: "
                                "drop continuation_margin from --use-features or train them without --carry")
        if any(name in CONTINUATION_SIGNALS for kind_reads in reads.values() for name in kind_reads):
            data = _with_continuation(data, features_path, args.model, args.carry, args.carry_from_layer)
        cols = data.columns(use)
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
            study = label_study(data, cols, args.tolerance, args.folds, args.inner_folds, args.seed,
                                readout=kind_readout("svm", use), **choose)
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
        for kind in kinds:
            kind_cols, readout = data.columns(reads[kind]), kind_readout(kind, reads[kind])
            cv = cross_validate(data, y, kind, kind_cols, args.tolerance, args.folds, args.inner_folds, args.seed,
                                readout=readout, **choose)
            params, point = fit_policy(data, y, kind, kind_cols, args.tolerance, args.inner_folds, args.seed,
                                       readout=readout, **choose)
            meta = policy_meta(kind, data, params, point, reads[kind], label, cv, training)
            if args.carry != "simlens" and kind == "simlens":  # the file runs as policy=simlens,carry=filled
                from adainfer_lmeval.experiments.filled_continuation import filled_path

                read_out = filled_path(features_path)
                meta["continuation_carry"] = args.carry
                meta["training"] = {**training, "continuation": {
                    "carry": args.carry, "from_layer": args.carry_from_layer, "file": read_out.name,
                    "file_sha256": hashlib.sha256(read_out.read_bytes()).hexdigest()}}
            paths = write_policy(out_dir, kind, meta, params)
            print(f"{kind}: validation (cross-validated, {cv['n_docs']} examples): full {_pct(cv['full_acc'])}%  "
                  f"{kind} {_pct(cv['policy_acc'])}%  mean exit {cv['mean_exit_layer']:.2f}/{L}  "
                  f"layers saved {_pct(cv['layers_saved'])}%; {point['mean_checks']:.1f} consultations per example "
                  f"(held-out calibration acc {_pct(point['acc'])}% vs full {_pct(point['full_acc'])}%, "
                  f"mean exit {point['mean_exit_layer']:.2f})")
            print("   " + _operating_point_line(kind, point))
            print("   wrote " + ", ".join(f"{p} ({p.stat().st_size} B)" for p in paths))
        print(f"done in {time.time() - started:.0f}s")
        return 0
    except AdaInferError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
