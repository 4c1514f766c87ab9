"""Running a suite: what is missing runs, each model loaded once for every run of it.

Unknown tasks and bad policies are refused before any model loads. One model serves all its
runs, so full depth and early exit are timed in the same process on the same weights. Each run
is written as soon as it finishes (:mod:`.run_files`), so an interrupted suite resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

from adainfer_lmeval.experiments.run_files import plan_suite, write_run_file
from adainfer_lmeval.experiments.suite_file import Suite, SuiteTask
from adainfer_lmeval.offline.pypi import package_versions
from adainfer_lmeval.reporting.comparison import FULL, ORACLE


def _compact_samples(samples: dict) -> dict:
    """What the report needs of each logged sample: target, log-probs or generation, exit layers."""
    def compact(s: dict) -> dict:
        row = {"doc_id": s["doc_id"], "target": s["target"], "exit_layers": s.get("exit_layers", [])}
        first = s["resps"][0][0] if s["resps"] else None
        if isinstance(first, str):  # generate_until: the text before lm-eval's filters
            row["generation"] = first
            row["exit_layers"] = row["exit_layers"][0] if row["exit_layers"] else []  # per token
        else:
            row["loglikelihoods"] = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in s["resps"]]
        row.update({k: v for k, v in s.items() if k in ("acc", "acc_norm", "exact_match")})
        return row

    return {task: [compact(s) for s in rows] for task, rows in samples.items()}


def _is_generative(manager, task_name: str) -> bool:
    """Whether a task (or every task of a group) is lm-eval generate_until."""
    from adainfer_lmeval.adapter.harness import task_dict

    def leaves(tree):
        for value in tree.values():
            yield from (leaves(value) if isinstance(value, dict) else [value])

    return all(t.OUTPUT_TYPE == "generate_until" for t in leaves(task_dict([task_name], manager)))


def _preflight(suite: Suite) -> None:
    """Refuse unknown tasks and bad policies before any model loads."""
    from adainfer_lmeval.adapter.model_args import split_model_args
    from adainfer_lmeval.offline.data.availability import check_tasks_available
    from adainfer_lmeval.offline.environment import configure_offline_environment

    configure_offline_environment()
    check_tasks_available([t.name for ts in suite.tasks.values() for t in ts])
    for policy in {p for ps in suite.policies.values() for p in ps} - {ORACLE}:
        split_model_args(*suite.policy_args(policy))


def _open_model(suite: Suite, model_name: str, log):
    """Load ``model_name`` once; return run(task, policy) -> the run's record (without settings)."""
    import torch
    import transformers

    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.adapter.harness import evaluate, task_manager
    from adainfer_lmeval.offline.models.fetch import resolve_pretrained

    folder = resolve_pretrained(model_name)
    log(f"[suite] loading {model_name} ({folder})")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, suite.dtype))
    model = model.to(suite.device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    manager = task_manager()
    backends: dict[str, AdaInferLM] = {}

    def backend(policy: str) -> AdaInferLM:
        if policy not in backends:
            name, args = suite.policy_args(policy)
            backends[policy] = AdaInferLM(pretrained=model, tokenizer=tokenizer, policy=name,
                                          device=suite.device, batch_size=suite.batch_size, **args)
        return backends[policy]

    warmed: set[tuple[str, int]] = set()

    def warm_task(task: SuiteTask) -> None:
        # Warm-up (allocator, kernels, the task's own prompt shapes) so that no timed run pays it:
        # with a synthetic 64-token pass at load only, each task's first timed run (full depth, the
        # reference) was the slow one (2026-12-07: never-exit policies, the same layers, 1.1-1.4x
        # "faster"). One untimed batch of the task at full depth takes it.
        if (task.name, task.num_fewshot) not in warmed:
            warmed.add((task.name, task.num_fewshot))
            limit = min(task.limit, suite.batch_size) if task.limit else suite.batch_size  # per subtask of a group
            evaluate(backend(FULL), [task.name], limit=limit, num_fewshot=task.num_fewshot,
                     task_manager=manager, bootstrap_iters=0)

    def run(task: SuiteTask, policy: str) -> dict:
        if policy != ORACLE:
            warm_task(task)
        if policy == ORACLE and _is_generative(manager, task.name):
            from adainfer_lmeval.experiments.generation_oracle import generation_oracle_run

            record = generation_oracle_run(backend(FULL), task.name, task.limit, task.num_fewshot, manager)
            record["samples"] = _compact_samples(record["samples"])
            return record
        if policy == ORACLE:
            from adainfer_lmeval.experiments.oracle import oracle_run

            return oracle_run(backend(FULL), task.name, task.limit, task.num_fewshot)
        results = evaluate(
            backend(policy), [task.name], limit=task.limit, num_fewshot=task.num_fewshot,
            log_samples=True, task_manager=manager, bootstrap_iters=1000,
        )
        return {
            "results": results["results"],
            "group_subtasks": results.get("group_subtasks", {}),
            "n-shot": results.get("n-shot", {}),
            "adainfer": results["adainfer"],
            "samples": _compact_samples(results.get("samples", {})),
        }

    return run


def run_suite(suite: Suite, out: Path, log=print) -> list[Path]:
    """Run what is missing; return every run file of the suite (done now or before)."""
    plan = plan_suite(suite, out)
    _preflight(suite)
    total = len(plan)
    for model_name in suite.models:
        todo = []
        for run in (r for r in plan if r.model == model_name):
            if run.done:
                log(f"[suite] {run.index}/{total} {model_name} {run.task.name} {run.policy}: done before, kept")
            else:
                if run.status == "legacy":
                    log(f"[suite] {run.index}/{total} {model_name} {run.task.name} {run.policy}: stored run predates "
                        "device/dtype/model_args/policy hash in its settings; running again (--migrate keeps it)")
                elif run.status != "new":
                    log(f"[suite] {run.index}/{total} {model_name} {run.task.name} {run.policy}: "
                        f"stored run has other settings ({run.status.removeprefix('changed: ')}); running again")
                todo.append(run)
        if not todo:
            continue
        execute = _open_model(suite, model_name, log)
        for run in todo:
            log(f"[suite] {run.index}/{total} {model_name} {run.task.name} {run.policy}: running")
            started = time.time()
            record = execute(run.task, run.policy)
            record.update(settings=run.settings, versions=package_versions(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
            write_run_file(run.path, record)
            log(f"[suite] {run.index}/{total} {model_name} {run.task.name} {run.policy}: "
                f"{time.time() - started:.0f} s -> {run.path}")
    return [run.path for run in plan]
