"""The study's calibrated rules on the clock: one study cell's test documents, the study's points.

The default benchmark times fixed operating points on SST-2 0-shot and MMLU requests, where the
rules exit little. ``--study_cell sst2@4`` instead times, for each model, the rules at the points
the study calibrated (``reports/study/results.json``: per policy, setting and criterion) on the
very test documents the study evaluated them on, so that each row's layers saved is the study's
and its seconds say what that saving is worth on this machine. Only the rules run (threshold,
margin, static and the SimLens ones): the classifiers' fitted parameters are not in the results
file. Points that never exit (``min_layer`` = L) are full depth and are left out.

Where the study's collection of the cell is on disk, the benchmark checks itself against it:
the documents it built must be the collection's, and every request's exit layer must equal the
offline exit of its document at the same point (:func:`offline_exits`).

``--study_readouts simlens,filled`` times the SimLens rules at the points
:mod:`adainfer_lmeval.experiments.filled_continuation` calibrated for each read-out (its ``--json``
file, passed as ``--study_results``: :func:`readout_points`), the filled ones with
``carry=filled``, and checks each exit against that read-out of the collection (the filled one:
``<cell>-test-filled.parquet`` beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.experiments.bench.variants import Variant
from adainfer_lmeval.experiments.study_policies import CLASSIFIERS, STUDY_POLICIES, document_outcomes

ROW_FIELDS = ("policy", "threshold", "min_layer", "layers", "n_test", "layers_saved", "delta_points", "mean_exit_layer")


#: the study's policies that run from model args alone (every one but the fitted classifiers)
RULES = tuple(p for p in STUDY_POLICIES if p not in CLASSIFIERS)


def study_points(results_file: Path, model: str, cell: str, setting: str = "intra",
                 criterion: str = "agreement") -> list[dict]:
    """The study's rows of ``model`` on ``cell`` (``task@shots``) for the rules that exit at all:
    each with its policy, point (threshold, min_layer), layers saved, Δ and mean exit layer."""
    from adainfer_lmeval.experiments.study_tasks import StudyTask

    task = StudyTask.parse(cell)
    try:
        rows = [r for r in json.loads(Path(results_file).read_text())["rows"] if isinstance(r, dict)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdaInferError(f"cannot read the study's results from {results_file} ({type(exc).__name__}: {exc}); "
                            "run the study first (reports/study/README.md) or pass --study_results FILE") from None
    found = [r for r in rows if r.get("model") == model and r.get("task") == task.name and r.get("shots") == task.shots
             and r.get("setting") == setting and r.get("criterion") == criterion and r.get("policy") in RULES]
    broken = [r.get("policy") for r in found if any(k not in r for k in ROW_FIELDS)]
    if broken:
        raise AdaInferError(f"{results_file}: the rows of {', '.join(map(str, broken))} lack some of {', '.join(ROW_FIELDS)}; "
                            "write the file again with the study command (reports/study/README.md)")
    if not found:
        raise AdaInferError(f"{results_file} has no {setting} {criterion} rows of {model} on {cell}; "
                            "study cells there: " + ", ".join(sorted({f"{r.get('model')}:{r.get('task')}@{r.get('shots')}"
                                                                       for r in rows})))
    return [r for r in found if r["min_layer"] < r["layers"]]


def readout_points(readouts_file: Path, model: str, cell: str, criterion: str = "agreement",
                   readout: str = "filled") -> list[dict]:
    """The rows of ``readout`` in a filled-continuation result (``filled_continuation --json``) of
    ``model`` on ``cell`` that exit at all, shaped as :func:`study_points`'s (with the read-out and
    the layer its carries start from)."""
    try:
        found = json.loads(Path(readouts_file).read_text())
        rows, layers, from_layer = found["rows"], int(found["num_layers"]), int(found["from_layer"])
        if found.get("model") != model or found.get("task") != cell:
            raise AdaInferError(f"{readouts_file} is the read-out of {found.get('model')} on {found.get('task')}, not of "
                                f"{model} on {cell}; pass the file of this model and cell (reports/study/readouts/)")
        picked = [{**r, "layers": layers, "from_layer": from_layer} for r in rows
                  if isinstance(r, dict) and r.get("readout") == readout and r.get("criterion") == criterion]
        broken = [r.get("policy") for r in picked if any(k not in r for k in ROW_FIELDS)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdaInferError(f"cannot read a filled-continuation result from {readouts_file} ({type(exc).__name__}: {exc}); "
                            "write it with python -m adainfer_lmeval.experiments.filled_continuation ... --json FILE") from None
    if broken or not picked:
        raise AdaInferError(f"{readouts_file} has no complete {criterion} rows of the {readout} read-out; "
                            "write it again with python -m adainfer_lmeval.experiments.filled_continuation ... --json FILE")
    return [r for r in picked if r["min_layer"] < r["layers"]]


def variant_of(row: dict) -> Variant:
    """The backend variant that runs a study row's rule at its point (the study's backend check's spec)."""
    from adainfer_lmeval.adapter.model_args import parse_model_args
    from adainfer_lmeval.experiments.study_backend import rule_policy

    carry = "filled" if row.get("readout") == "filled" else "simlens"
    args = parse_model_args("policy=" + rule_policy(row["policy"], row["threshold"], row["min_layer"], row["layers"], carry))
    return Variant(str(args.pop("policy")), args)


def document_order(key: str) -> tuple[str, int]:
    """Sort key of a ``task:doc_id`` document: by task, then by row number."""
    task, _, doc_id = key.rpartition(":")
    return task, int(doc_id)


def cell_requests(lm, cell: str, n_docs: int, seed: int = 0) -> tuple[list, list[str]]:
    """The loglikelihood requests of the study's ``n_docs`` test documents of ``cell`` (drawn as
    :func:`~adainfer_lmeval.experiments.study_tasks.collect_all` draws them) and, per request, its
    document as a collection names it (``task:doc_id``: MMLU's subjects number their rows alike)."""
    from adainfer_lmeval.adapter.loglikelihood import tokenized_requests
    from adainfer_lmeval.experiments.task_documents import DEFAULT_FEWSHOT_SEED, load_tasks, sample_docs, task_instances
    from adainfer_lmeval.experiments.study_tasks import StudyTask, doc_filter_for

    task = StudyTask.parse(cell)
    source = task.source("test")
    tasks = load_tasks([source])
    chosen = sample_docs(tasks, source, n_docs, task.shots, seed, doc_filter_for(task, "test", seed))
    requests, doc_ids = [], []
    for name, ids in sorted(chosen.items()):
        for doc_id, instances in task_instances(lm, tasks[name], ids, task.shots, DEFAULT_FEWSHOT_SEED).items():
            encoded = tokenized_requests(lm, instances)
            requests.extend(encoded)
            doc_ids.extend([f"{name}:{doc_id}"] * len(encoded))
    return requests, doc_ids


def offline_exits(data, row: dict) -> dict[str, int]:
    """{document (``task:doc_id``): exit layer} of ``row``'s rule at its point on the study's
    collection ``data`` (the study's own offline evaluation:
    :func:`~adainfer_lmeval.experiments.study_policies.document_outcomes`)."""
    point = {"threshold": row["threshold"], "min_layer": row["min_layer"]}
    exits = document_outcomes(row["policy"], None, data, point).exits
    return {key: int(layer) for key, layer in zip(data.keys, exits)}


def check_against_study(collection: Path, sampled: list[str], doc_ids: list[str], rows: list[dict],
                        bench_rows: list[dict]) -> dict:
    """Whether the documents drawn (``sampled``, before ``--docs``) are the study's test documents and
    the benchmark's requests (of documents ``doc_ids``) exited where the study's offline evaluation
    does, per variant (at every batch size it ran; a variant it did not run is not equal); only
    ``present: False`` where no collection is on disk."""
    if not Path(collection).exists():
        return {"collection": str(collection), "present": False}
    from adainfer_lmeval.experiments.filled_continuation import read_filled
    from adainfer_lmeval.experiments.study_tasks import load_collection

    data = load_collection(Path(collection))
    out = {"collection": str(collection), "present": True, "same_documents": set(data.keys) == set(sampled),
           "variants": {}}
    for row in rows:
        label = variant_of(row).label
        answered = data
        if row.get("readout") == "filled":  # the filled read-out of the same collection
            answered = read_filled(data, Path(collection), row["from_layer"])
            if answered is None:
                out["variants"][label] = {"policy": row["policy"], "exits_equal": False,
                                          "missing": "no current filled read-out of the collection from layer "
                                                     f"{row['from_layer']}: run filled_continuation first"}
                continue
        expected = offline_exits(answered, row)
        ran = [r for r in bench_rows if r["variant"] == label]
        out["variants"][label] = {
            "policy": row["policy"],
            "exits_equal": bool(ran) and all(r["exit_layers"] == [expected.get(d) for d in doc_ids] for r in ran),
            "offline_mean_exit": float(np.mean([expected[d] for d in set(doc_ids) if d in expected])),
        }
    return out
