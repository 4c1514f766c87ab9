"""Which documents of an lm-eval task, and the loglikelihood instances lm-eval builds for them.

Shared by everything that runs a model over a sample of a task's documents with the prompts the
evaluation uses: the collector (:mod:`.collect`), the oracles, the continuation read-out and the
benchmark on a study cell.
"""

from __future__ import annotations

import random

from adainfer_lmeval.errors import AdaInferError

DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed (lm_eval.defaults)

_MANAGER = None


def load_tasks(task_names: list[str]) -> dict:
    """{leaf task name: task object} from lm-eval with this repository's offline tasks."""
    from adainfer_lmeval.offline.environment import configure_offline_environment

    configure_offline_environment()
    from adainfer_lmeval.adapter.harness import task_manager
    from adainfer_lmeval.offline.data.availability import check_tasks_available

    check_tasks_available(task_names)
    global _MANAGER
    if _MANAGER is None:  # indexing every lm-eval task takes seconds: once per process
        _MANAGER = task_manager()
    manager = _MANAGER
    unknown = [t for t in task_names if t not in manager.all_tasks]
    if unknown:
        raise AdaInferError(f"unknown task(s) {', '.join(unknown)}; see `adainfer-eval data list`")
    loaded = manager.load(task_names)
    tasks = {}
    for name, task in loaded["tasks"].items():
        if task.get_config("output_type") != "multiple_choice":
            raise AdaInferError(f"task {name} is not multiple_choice; stop classifiers are trained on multiple-choice tasks")
        tasks[getattr(task.config, "task", name)] = task
    return tasks


def _doc_ids(task) -> list[int]:
    return list(range(len(task.eval_docs)))


def sample_docs(tasks: dict, spec: str, n_docs: int | None, shots: int, seed: int,
                doc_filter=None) -> dict[str, list[int]]:
    """``n_docs`` documents drawn at random from all leaf tasks of ``spec`` together.

    ``doc_filter(task_name, doc_id)``, if given, restricts the pool (e.g. one half of a split).
    """
    pool = [(name, i) for name, task in sorted(tasks.items()) for i in _doc_ids(task)
            if doc_filter is None or doc_filter(name, i)]
    rng = random.Random(f"{seed}:{spec}:{shots}")
    chosen = pool if n_docs is None or n_docs >= len(pool) else rng.sample(pool, n_docs)
    out: dict[str, list[int]] = {}
    for name, i in chosen:
        out.setdefault(name, []).append(i)
    return {k: sorted(v) for k, v in out.items()}


def task_instances(lm, task, doc_ids: list[int], shots: int, fewshot_seed: int) -> dict[int, list]:
    """{doc id: its loglikelihood instances, one per answer option, in option order}: what lm-eval
    builds for ``doc_ids`` at ``shots`` few-shot examples (drawn with ``fewshot_seed``)."""
    if not hasattr(task, "_adainfer_default_shots"):  # the YAML's own value, before we set ours
        task._adainfer_default_shots = task.get_config("num_fewshot")
    default = task._adainfer_default_shots
    if shots:
        # Cap at what the few-shot pool holds (MMLU dev: 5 rows, the evaluated one left out).
        pool = len(task.fewshot_docs() or []) if task.fewshot_docs() is not None else None
        if pool is not None and task.config.fewshot_split == task.config.test_split:
            pool -= 1
        if pool is not None:
            shots = min(shots, pool)
    if default != 0 or shots == 0:  # as simple_evaluate: a task pinned to 0 shots stays at 0
        task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=fewshot_seed)
    task.build_all_requests(samples=doc_ids, rank=0, world_size=1, tokenizer_name=getattr(lm, "tokenizer_name", ""))
    # lm-eval numbers the documents of ``samples`` 0, 1, ... in dataset order (its
    # doc_iterator enumerates the selected rows), not by their index: map back to the index.
    ordered = sorted(set(doc_ids))
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(ordered[inst.doc_id], []).append(inst)
    out = {}
    for doc_id, insts in sorted(by_doc.items()):
        insts.sort(key=lambda x: x.idx)
        out[doc_id] = insts[: len(task.doc_to_choice(insts[0].doc))]  # not acc_mutual_info's unconditional rows
    return out
