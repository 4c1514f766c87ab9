"""The paper's study: full depth vs SVM, CRF, gap threshold, option margin, static depth and the oracle.

    python -m adainfer_lmeval.experiments.study --out reports/study \\
        --models "smollm2-135m:80,qwen2.5-coder-0.5b:40;qwen2.5-coder-1.5b:150" \\
        --tasks "sst2:x2.5,sst2@4:x2.5,arc_easy,piqa;mmlu,sst2@4:100" --threads 1

(the i-th ``;`` group of models runs the i-th group of tasks).

Two steps, both resumable:

1. **Collect** (:mod:`adainfer_lmeval.experiments.collect`, lm-eval's own prompts) the training
   and test documents of every model and task (:mod:`.study_tasks`) into ``--collect-dir``
   (``out/study/collect/<model>/<task>@<shots>-<role>.parquet``); files that are there, of this
   schema and these settings, are reused; beside each, the SimLens continuation read-out
   (:mod:`adainfer_lmeval.experiments.collect_continuation`, ``...-continuation.parquet``) that
   the SimLens policies answer with, unless ``--no-continuation``.
2. **Evaluate offline** (:mod:`.study_evaluation`): every policy of :mod:`.study_policies`,
   intra-task, inter-task and inter-model, at the three operating points of
   :data:`~adainfer_lmeval.experiments.calibration.CRITERIA`; then the report
   (:mod:`.study_report`) and, with ``--check-docs``, the same policies run through lm-eval's
   backend on a slice (:mod:`.study_backend`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.study_policies import LABEL, CalibrationRules
from adainfer_lmeval.experiments.study_tasks import DEFAULT_STUDY_MODELS, DEFAULT_STUDY_TASKS, parse_plan
from adainfer_lmeval.offline.pypi import package_versions


def _backend_check(args, plan, fitted, collections) -> dict:
    from adainfer_lmeval.experiments.study_backend import BACKEND_POLICIES, backend_check

    model, task = plan[0].name, plan[0].tasks[0]
    keys = {p: (model, task.label, "intra", p) for p in BACKEND_POLICIES}  # SimLens ones only where read out
    policies = {p: fitted[key] for p, key in keys.items() if key in fitted}
    report = backend_check(model, task, args.check_docs, policies, collections[(model, task.label, "train")],
                           args.collect_dir.parent / "check")
    for policy, r in report.items():
        print(f"backend check {model} {task.label} {policy}: {r['docs']} docs, exits equal {r['exits_equal']}, "
              f"answers equal {r['answers_equal']} (acc offline {100 * r['offline_acc']:.1f}%, backend {100 * r['backend_acc']:.1f}%)")
    return {"model": model, "task": task.label, "docs": args.check_docs, "criterion": "accuracy", "policies": report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m adainfer_lmeval.experiments.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_STUDY_MODELS, help="model[:docs per task and role], comma-separated; ';' separates groups")
    parser.add_argument("--tasks", default=DEFAULT_STUDY_TASKS, help="task[@shots][:docs], comma-separated; the i-th ';' group serves the i-th group of --models")
    parser.add_argument("--seed", type=int, default=0, help="document sampling and SST-2 split seed")
    parser.add_argument("--collect-dir", type=Path, default=Path("out/study/collect"))
    parser.add_argument("--collect-only", action="store_true", help="collect the feature files and stop")
    parser.add_argument("--threads", type=int, help="torch threads while collecting (1 on a shared machine)")
    parser.add_argument("--no-continuation", action="store_true",
                        help="collect no continuation read-outs (the SimLens policies are left out where there are none)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="the empirical operating points' 1 point / 1%% of answers")
    parser.add_argument("--max-changed", type=float, default=0.01, help="the guarantee's δ: at most this rate of answers changed")
    parser.add_argument("--confidence", type=float, default=0.95, help="the guarantee's confidence")
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
        from adainfer_lmeval.experiments.study_evaluation import run_study
        from adainfer_lmeval.experiments.study_report import write_outputs
        from adainfer_lmeval.experiments.study_tasks import collect_all, load_collections

        plan = parse_plan(args.models, args.tasks)
        rules = CalibrationRules(args.tolerance, args.max_changed, args.confidence, args.inner_folds, args.seed)
        print(f"collecting into {args.collect_dir} (missing files only) ...", flush=True)
        collect_all(plan, args.collect_dir, args.seed, log=lambda m: print(m, flush=True),
                    continuation=not args.no_continuation)
        if args.collect_only:
            print(f"collected in {time.time() - started:.0f}s")
            return 0
        t0 = time.time()
        collections = load_collections(args.collect_dir, plan)
        fitted: dict = {}
        result = run_study(collections, plan, rules, log=lambda m: print(m, flush=True), fitted_out=fitted)
        seconds = time.time() - t0
        check = _backend_check(args, plan, fitted, collections) if args.check_docs else None
        meta = {
            "command": "python -m adainfer_lmeval.experiments.study " + " ".join(shlex.quote(a) for a in argv),
            "seconds": seconds, "tolerance": args.tolerance, "max_changed": args.max_changed, "confidence": args.confidence,
            "inner_folds": args.inner_folds, "backend_check": check, "label": LABEL,
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
