"""Do the savings show up on the clock? Wall-clock of early exit against the ideal, in one process.

``python -m adainfer_lmeval.experiments.benchmark`` (``adainfer-eval benchmark``) loads each model once
and, on the SAME loglikelihood requests (N SST-2 and N MMLU documents built by lm-eval from
the real tasks, 0-shot), times lm-eval's ``hf`` backend (``HFLM._loglikelihood_tokens``),
``adainfer`` with ``policy=full``, with a threshold policy and, where a policy file is shipped
for the model, ``policy=svm``, at each batch size. All variants share one copy of the
weights; runs are interleaved (the order rotates every repeat) and medians are reported.

Per (model, batch size, variant) it reports: mean layers, the *ideal* speedup (full-depth
FLOPs over the FLOPs actually executed, exit-head checks included, from the ``ExitRecord``
each response carries), the *measured* speedup against ``policy=full``, their ratio, and the
time relative to ``hf``. Per model it also measures, with torch timers, one exit decision
(final norm + head + p1/gap features at one position) against one decoder layer over a
synthetic 128-token sequence (batch 1), and an instrumented pass attributes the engine's time
to layers, exit checks, the emitted heads and the rest.

Timing on a shared CPU: OpenMP threads spin badly when the cores are oversubscribed, so the
benchmark first waits (up to ``--wait_quiet`` minutes) for the 1-minute load average to drop
below ``--max_load`` and records the load throughout; numbers taken under load are marked.

``--study_cell TASK@SHOTS`` times the study's calibrated rules instead, on the study's test
documents of that cell (:mod:`.bench.study_cell`), and checks every exit against the study's;
with ``--study_readouts simlens,filled --study_results reports/study/readouts/<model>_<cell>.json``
the SimLens rules at the points calibrated with each read-out (filled: ``carry=filled``).

This module is the command line; the parts are in :mod:`.bench`: ``variants`` (what is compared),
``requests``, ``runs`` (the interleaved passes), ``decision`` (decision cost, picker recall),
``timing`` and ``machine`` (shared with the GPU check), ``report``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.bench.machine import OTHERS_QUIET, loadavg, run_environment, wait_until_quiet
from adainfer_lmeval.experiments.bench.report import format_tables, write_report
from adainfer_lmeval.experiments.bench.requests import build_requests
from adainfer_lmeval.experiments.bench.runs import benchmark_model
from adainfer_lmeval.experiments.bench.variants import (DEFAULT_CHECK_CLUSTERS, DEFAULT_CHECK_VOCAB, DEFAULT_THRESHOLDS,
                                                        Variant, make_backend, variants_for)

DEFAULT_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
DEFAULT_MMLU_TASKS = ("mmlu_marketing", "mmlu_high_school_psychology", "mmlu_miscellaneous", "mmlu_high_school_biology")


def environment(argv: list[str]) -> dict:
    return {**run_environment("adainfer_lmeval.experiments.benchmark", argv, python=Path(sys.executable).name),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="adainfer-eval benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--n", default="8",
                        help="documents per task: N SST-2 and N MMLU (spread over --mmlu_tasks); one number, or one per model")
    parser.add_argument("--mmlu_tasks", default=",".join(DEFAULT_MMLU_TASKS))
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", action="append", default=[],
                        help="MODEL:gap=0.6,min_layer=20 (overrides the default operating point for MODEL)")
    parser.add_argument("--no_svm", action="store_true")
    parser.add_argument("--check_vocab", type=int, default=DEFAULT_CHECK_VOCAB,
                        help="K of the variants with pruned-vocabulary checks (0: no such variants)")
    parser.add_argument("--check_clusters", type=int, default=None,
                        help="C of the variants whose first check picks its K candidates from C head clusters "
                             f"(default per model: {DEFAULT_CHECK_CLUSTERS}; 0: no such variants)")
    parser.add_argument("--no_profile", action="store_true", help="skip the instrumented breakdown pass")
    parser.add_argument("--decision_tokens", type=int, default=128)
    parser.add_argument("--wait_quiet", type=float, default=20.0, help="minutes to wait for a quiet machine")
    parser.add_argument("--max_load", type=float, default=1.0)
    parser.add_argument("--threads", default="auto",
                        help="torch threads; 'auto': torch's default on a quiet machine, 1 if it never got quiet "
                             "(oversubscribed OpenMP threads spin: a 2-thread pass can run 30x slower)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--study_cell", default=None,
                        help="task@shots of a study cell (e.g. sst2@4): time the study's calibrated rules on its test "
                             "documents instead of the fixed points on SST-2 0-shot and MMLU (bench/study_cell.py)")
    parser.add_argument("--study_results", default="reports/study/results.json")
    parser.add_argument("--study_collections", default="out/study/collect",
                        help="where the study's collections are: the run checks its documents and exits against them")
    parser.add_argument("--study_readouts", default=None,
                        help="with --study_cell: time the SimLens rules at the points that filled_continuation --json "
                             "calibrated for these read-outs (simlens, filled: carry=filled), read from --study_results FILE")
    parser.add_argument("--study_setting", default="intra")
    parser.add_argument("--study_criterion", default="agreement")
    parser.add_argument("--docs", type=int, default=None,
                        help="with --study_cell: the first DOCS of the cell's test documents (default: all of them)")
    parser.add_argument("--output_dir", default="reports/benchmark")
    a = parser.parse_args(argv)
    try:
        return run(a, parser, argv)
    except AdaInferError as error:
        print(f"benchmark: error: {error}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """The benchmark of the parsed command line ``a``."""
    import transformers

    from adainfer_lmeval.offline.models.fetch import resolve_pretrained
    from adainfer_lmeval.offline.data.availability import check_tasks_available
    from adainfer_lmeval.offline.environment import configure_offline_environment

    if a.threads != "auto":
        torch.set_num_threads(int(a.threads))
    default_threads = torch.get_num_threads()
    configure_offline_environment()
    thresholds = {}
    for spec in a.threshold:
        name, _, args = spec.partition(":")
        thresholds[name] = {k: (int(v) if k == "min_layer" else float(v))
                            for k, v in (kv.split("=") for kv in args.split(",") if kv)}
    models = [m for m in a.models.split(",") if m]
    mmlu = [t for t in a.mmlu_tasks.split(",") if t]
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    ns = [int(x) for x in str(a.n).split(",")]
    ns = ns * len(models) if len(ns) == 1 else ns
    if len(ns) != len(models):
        parser.error(f"--n has {len(ns)} values for {len(models)} models; give one, or one per model")

    def limits_for(n: int) -> dict:
        # N MMLU documents, spread over the subjects (the first ones get the remainder).
        per_subject = {t: n // len(mmlu) + (1 if i < n % len(mmlu) else 0) for i, t in enumerate(mmlu)}
        return {"sst2": n, **{t: k for t, k in per_subject.items() if k > 0}}

    task_limits = {name: limits_for(n) for name, n in zip(models, ns)}
    if a.study_cell:
        from adainfer_lmeval.experiments.bench import study_cell

        if a.study_readouts:
            if len(models) != 1:
                parser.error("--study_readouts reads one model's filled_continuation result (--study_results FILE): "
                             "give one model in --models")
            cell_rows = {models[0]: [row for readout in a.study_readouts.split(",") for row in study_cell.readout_points(
                Path(a.study_results), models[0], a.study_cell, a.study_criterion, readout.strip())]}
        else:
            cell_rows = {name: study_cell.study_points(Path(a.study_results), name, a.study_cell, a.study_setting,
                                                       a.study_criterion) for name in models}
        for name, rows in cell_rows.items():
            if not rows:
                raise AdaInferError(f"no rule of the study exits on {name} {a.study_cell} at {a.study_setting} "
                                    f"{a.study_criterion} (every point is the never-exit one): nothing to time; "
                                    "try another --study_criterion or cell")
    else:
        check_tasks_available(sorted({t for limits in task_limits.values() for t in limits}))
    from adainfer_lmeval.adapter.harness import task_manager

    manager = None if a.study_cell else task_manager()  # a study cell's tasks load through task_documents
    results, counts, waits = [], {}, {}
    started = time.time()
    for name in models:
        # Wait for a quiet machine before each model (out of one --wait_quiet budget in all).
        left = max(0.0, a.wait_quiet - (time.time() - started) / 60)
        waits[name] = state = wait_until_quiet(a.max_load, left)
        if a.threads == "auto":
            torch.set_num_threads(default_threads if state["quiet"] else 1)
        state["torch_threads"] = torch.get_num_threads()
        print(f"[benchmark] load {state['load_at_start']:.2f} ({'quiet' if state['quiet'] else 'NOT quiet'}); "
              f"torch threads {torch.get_num_threads()}", flush=True)
        folder = resolve_pretrained(name)
        print(f"[benchmark] loading {name} from {folder}", flush=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).to(a.device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        tokenizing_lm = make_backend(Variant("hf"), model, tokenizer, 1, a.device)
        if a.study_cell:
            variants = [Variant("hf"), Variant("full")] + [study_cell.variant_of(r) for r in cell_rows[name]]
            n_test = max(r["n_test"] for r in cell_rows[name])
            requests, doc_ids = study_cell.cell_requests(tokenizing_lm, a.study_cell, n_test)
            sampled = sorted(set(doc_ids), key=study_cell.document_order)
            if a.docs is not None:  # the first DOCS documents of the study's, by task and row
                keep = set(sampled[: a.docs])
                requests, doc_ids = map(list, zip(*[(r, d) for r, d in zip(requests, doc_ids) if d in keep]))
            counts[name] = {a.study_cell: {"documents": len(set(doc_ids)), "requests": len(requests)}}
        else:
            variants = variants_for(name, thresholds.get(name), svm=not a.no_svm, check_vocab=a.check_vocab or None,
                                    check_clusters=a.check_clusters)
            requests, counts[name] = build_requests(tokenizing_lm, task_limits[name], manager)
        print(f"[benchmark] {name}: {len(requests)} requests; variants {[v.label for v in variants]}", flush=True)
        res = benchmark_model(name, model, tokenizer, requests, variants, batch_sizes, a.repeats, a.device,
                              profile=not a.no_profile, decision_tokens=a.decision_tokens,
                              check_vocab=a.check_vocab or None)
        if a.study_cell:
            collection = Path(a.study_collections) / name / f"{a.study_cell}-test.parquet"
            res["study_cell"] = {
                "cell": a.study_cell, "setting": a.study_setting, "criterion": a.study_criterion,
                "results_file": a.study_results, "batch_sizes": batch_sizes, "doc_ids": sorted(set(doc_ids), key=study_cell.document_order),
                "rows": [{"variant": study_cell.variant_of(r).label, "readout": r.get("readout", "study"), **{k: r[k] for k in (
                    "policy", "threshold", "min_layer", "layers_saved", "delta_points", "mean_exit_layer", "n_test")}}
                    for r in cell_rows[name]],
                "check": study_cell.check_against_study(collection, sampled, doc_ids, cell_rows[name], res["rows"]),
            }
        results.append(res)
        print(format_tables([res]), flush=True)
        del model
    state = {"quiet": all(w["quiet"] for w in waits.values()),
             "waited_s": sum(w["waited_s"] for w in waits.values()),
             "load_at_start": max(w["load_at_start"] for w in waits.values()), "max_load": a.max_load,
             "per_model": waits, "load_at_end": loadavg()}
    state["quiet_throughout"] = state["quiet"] and all(
        r["load_during"]["others_cores_median"] < OTHERS_QUIET for r in results)
    payload = {"environment": {**environment(argv), "torch_threads": {n: w["torch_threads"] for n, w in waits.items()}},
               "machine_state": state, "task_limits": task_limits,
               "requests_per_task": counts, "batch_sizes": batch_sizes, "repeats": a.repeats,
               "thresholds": {n: thresholds.get(n, DEFAULT_THRESHOLDS.get(n)) for n in models},
               "elapsed_s": round(time.time() - started, 1), "results": results}
    print(format_tables(results))
    write_report(Path(a.output_dir), payload)
    print(f"[benchmark] wrote {Path(a.output_dir) / 'benchmark.json'} and {Path(a.output_dir) / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
