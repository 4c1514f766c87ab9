"""The oracle exit: the earliest layer after which a document's answer never changes.

No policy can do better without changing answers, so it bounds what early exit can save on a
task at full-depth accuracy. It needs hindsight (every layer's answer), so it is computed from a
trace of the same documents and prompts the evaluation used (the first ``limit`` documents, as
lm-eval's ``--limit`` takes them), not by the engine's forward pass. The answer at a layer is
the option with the highest loglikelihood there (lm-eval's ``acc``).
"""

from __future__ import annotations

import math

from adainfer_lmeval.core.accounting import summarize
from adainfer_lmeval.experiments.collect import DEFAULT_FEWSHOT_SEED, build_examples, load_tasks, trace_examples


def oracle_layer(choices_per_layer: list[int]) -> int:
    """1-based layer after which the choice equals the last layer's and never changes again."""
    final = choices_per_layer[-1]
    layer = len(choices_per_layer)
    while layer > 1 and choices_per_layer[layer - 2] == final:
        layer -= 1
    return layer


def oracle_run(backend, task_name: str, limit: float | None, num_fewshot: int | None) -> dict:
    """A run record (like :mod:`.suite` writes) for the oracle on this task's first documents."""
    leaves = load_tasks([task_name])
    results, samples, records_by_task = {}, {}, {}
    every = []
    for name, task in leaves.items():
        total = len(task.eval_docs)
        count = total if limit is None else (math.ceil(total * limit) if limit < 1 else min(int(limit), total))
        shots = num_fewshot if num_fewshot is not None else (task.get_config("num_fewshot") or 0)
        examples = build_examples(backend, task, name, list(range(count)), shots, DEFAULT_FEWSHOT_SEED)
        trace_examples(backend.engine, examples, backend.device)
        records, rows = [], []
        for ex in examples:
            choices = [max(range(len(lls)), key=lls.__getitem__) for lls in ex.option_ll]
            layer = oracle_layer(choices)
            for row, cont in zip(ex.rows, ex.continuations):
                records.append(backend.costs.request(tokens=len(row), exit_layer=layer, scored=len(cont), checks=0))
            rows.append({"doc_id": ex.doc_id, "target": ex.gold, "loglikelihoods": ex.option_ll[layer - 1],
                         "exit_layers": [layer] * len(ex.rows), "acc": float(choices[-1] == ex.gold)})
        accuracy = sum(r["acc"] for r in rows) / max(len(rows), 1)
        results[name] = {"acc,none": accuracy}
        samples[name] = rows
        records_by_task[name] = records
        every.extend(records)
    if task_name not in results:  # a group: pooled over its subtasks
        pooled = [r for rows in samples.values() for r in rows]
        results[task_name] = {"acc,none": sum(r["acc"] for r in pooled) / max(len(pooled), 1)}
    stats = {name: summarize(found) for name, found in records_by_task.items()}
    stats[task_name] = summarize(every)
    return {
        "results": results,
        "adainfer": {"policy": {"name": "oracle"}, "num_layers": backend.engine.num_layers, "seconds": None, "tasks": stats},
        "samples": samples,
    }
