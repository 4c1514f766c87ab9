"""Exit statistics into lm-eval's results: per task, per group, and per logged sample.

lm-eval has no hook for a backend to add its own per-task or per-sample data, so this module
wraps ``lm_eval.evaluator.evaluate`` (the one function both the CLI and ``simple_evaluate``
go through). After lm-eval has computed its metrics, the wrapper reads the ``exit`` record
each response of an ``adainfer`` run carries and adds:

- ``results["results"][task]``: ``layers_mean``, ``layers_saved_pct``, ``flops_saved_pct``
  (so lm-eval's own table prints them beside the metrics);
- ``results["adainfer"]``: the policy, the model's depth and, per task and group, requests,
  mean layers, % layers and FLOPs saved and the exit-layer histogram;
- each logged sample: ``exit_layers`` (one per request of the document; for a generation,
  the list of its tokens' exit layers).

For generation tasks the figures count generated tokens (token-layers), see
:func:`adainfer_lmeval.core.accounting.summarize`.

Runs of other backends pass through untouched.
"""

from __future__ import annotations

import functools

from adainfer_lmeval.core.accounting import ExitRecord, summarize

TABLE_KEYS = {"layers_mean": "mean_layers", "layers_saved_pct": "layers_saved_pct", "flops_saved_pct": "flops_saved_pct"}


def _exit_of(response) -> ExitRecord | None:
    return getattr(response, "exit", None)


def _backend(lm):
    # --use_cache wraps the model in CachingLM, which keeps the real one as .lm
    return getattr(lm, "lm", lm)


def collect_records(task_dict) -> dict[str, list[ExitRecord]]:
    """This process's exit records, per task, read off the responses of its instances."""
    from lm_eval.evaluator_utils import _handle_back_comp

    # The same unpacking lm-eval's evaluate() does on its task_dict argument.
    tasks = task_dict["tasks"] if "tasks" in task_dict else _handle_back_comp(task_dict)[1]
    return {
        name: [
            record
            for instance in task.instances
            # with several processes, lm-eval pads ranks by repeating a request: count it once
            for record in map(_exit_of, instance.resps[: instance.repeats])
            if record is not None
        ]
        for name, task in tasks.items()
    }


def gather_records(records: dict[str, list[ExitRecord]], backend) -> dict[str, list[ExitRecord]]:
    """All processes' records on rank 0 (every rank must call this, as lm-eval's own gathers)."""
    if backend.world_size <= 1:
        return records
    gathered = backend.gather_object(records, dst=0)
    if backend.rank != 0:
        return {}
    merged: dict[str, list[ExitRecord]] = {}
    for part in gathered:
        for name, found in part.items():
            merged.setdefault(name, []).extend(found)
    return merged


def attach_exit_statistics(results: dict, records: dict[str, list[ExitRecord]], backend, seconds: float = 0.0) -> None:
    per_task = {name: summarize(found) for name, found in records.items() if found}
    # Groups (e.g. mmlu): every request of every subtask below them.
    for group, subtasks in results.get("group_subtasks", {}).items():
        pooled = [r for name in _leaves(group, results["group_subtasks"]) for r in records.get(name, [])]
        if pooled:
            per_task[group] = summarize(pooled)

    for name, summary in per_task.items():
        row = results.get("results", {}).get(name)
        if row is None:
            continue
        for key, source in TABLE_KEYS.items():
            row[f"{key},none"] = summary[source]

    results["adainfer"] = {
        "policy": backend.exit_policy.describe(),
        "num_layers": backend.engine.num_layers,
        "seconds": seconds,  # wall-clock in the model (scoring and generation) during this run
        "tasks": per_task,
    }
    if any(s.get("full_depth_generation") for s in per_task.values()):
        results["adainfer"]["note"] = (
            "some generate_until requests asked for sampling: those ran model.generate at full depth"
        )

    for samples in (results.get("samples") or {}).values():
        for sample in samples:
            layers = [
                [_sample_layers(r) for r in map(_exit_of, resps) if r is not None] for resps in sample.get("resps", [])
            ]
            sample["exit_layers"] = [x[0] if len(x) == 1 else x for x in layers]


def _sample_layers(record: ExitRecord):
    """A sample's exit layers: one per generated token for generations, else the request's."""
    return list(record.token_layers) if record.tokens else record.layers


def _leaves(group: str, tree: dict) -> list[str]:
    out = []
    for child in tree.get(group, []):
        out.extend(_leaves(child, tree) if child in tree else [child])
    return out


def install() -> None:
    """Wrap lm-eval's ``evaluate`` once (idempotent)."""
    from lm_eval import evaluator

    if getattr(evaluator.evaluate, "_adainfer_wrapped", False):
        return
    original = evaluator.evaluate

    @functools.wraps(original)
    def evaluate(lm, task_dict, *args, **kwargs):
        from adainfer_lmeval.adapter.backend import AdaInferLM

        backend = _backend(lm)
        before = getattr(backend, "model_seconds", 0.0)
        results = original(lm, task_dict, *args, **kwargs)
        if isinstance(backend, AdaInferLM):
            records = gather_records(collect_records(task_dict), backend)
            if results is not None:
                attach_exit_statistics(results, records, backend, backend.model_seconds - before)
        return results

    evaluate._adainfer_wrapped = True
    evaluator.evaluate = evaluate
