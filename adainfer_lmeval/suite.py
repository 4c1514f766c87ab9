"""Run a suite: models × tasks × policies, the full-depth baseline always beside them.

A suite file (JSON or YAML) names what to run::

    models: [smollm2-135m]
    policies: ["threshold,gap=0.6,min_layer=20", "threshold,gap=0.8,min_layer=20"]
    # or per model: policies: {smollm2-135m: [...], qwen2.5-coder-0.5b: [...]}, and tasks likewise
    tasks:
      - {name: sst2, limit: 200}
      - {name: mmlu, limit: 1, num_fewshot: 0}
    batch_size: 8

Each (model, task, policy) run is written to ``<out>/runs/<model>/<task>/<policy>.json`` as
soon as it finishes: lm-eval's results, the ``adainfer`` statistics, and compact samples
(log-probs, target and exit layers per document). A killed suite resumes: runs whose file
exists with the same settings are not run again. Each model is loaded once and serves every
run of it, so full depth and early exit are timed in the same process on the same weights.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdaInferError
from .pypi import package_versions
from .report import FULL
ORACLE = "oracle"  # not a policy: the earliest layer after which each answer never changes (hindsight)


@dataclass
class TaskSpec:
    name: str
    limit: float | None = None
    num_fewshot: int | None = None


@dataclass
class Suite:
    models: list[str]
    policies: dict[str, list[str]]  # model -> policies (besides full depth, which always runs)
    tasks: dict[str, list[TaskSpec]]  # model -> tasks
    batch_size: int = 8
    device: str = "cpu"
    extra_model_args: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, spec: dict) -> "Suite":
        known = {"models", "policies", "tasks", "batch_size", "device", "model_args"}
        stray = sorted(set(spec) - known)
        if stray:
            raise AdaInferError(f"suite: unknown key(s) {', '.join(stray)}; known: {', '.join(sorted(known))}")
        def task_list(items):
            return [TaskSpec(**t) if isinstance(t, dict) else TaskSpec(str(t)) for t in items]

        tasks = spec.get("tasks", [])
        if not isinstance(tasks, dict):  # one list for every model
            tasks = {model: tasks for model in spec.get("models", [])}
        tasks = {model: task_list(tasks.get(model, [])) for model in spec.get("models", [])}
        if not spec.get("models") or not all(tasks.values()):
            raise AdaInferError("suite: needs at least one model, and tasks for every model")
        from lm_eval.utils import simple_parse_args_string

        policies = spec.get("policies", [])
        if not isinstance(policies, dict):  # one list for every model
            policies = {model: policies for model in spec["models"]}
        return cls(
            models=list(spec["models"]),
            policies={m: [p for p in policies.get(m, []) if p != FULL] for m in spec["models"]},
            tasks=tasks, batch_size=int(spec.get("batch_size", 8)), device=str(spec.get("device", "cpu")),
            extra_model_args=simple_parse_args_string(spec.get("model_args", "")),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Suite":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            spec = yaml.safe_load(text)
        else:
            spec = json.loads(text)
        return cls.from_dict(spec)


def policy_slug(policy: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", policy).strip("_") or FULL


def run_path(out: Path, model: str, task: TaskSpec, policy: str) -> Path:
    shots = "default" if task.num_fewshot is None else task.num_fewshot
    limit = "all" if task.limit is None else f"{task.limit:g}"
    return out / "runs" / policy_slug(model) / f"{task.name}-{shots}shot-limit{limit}" / f"{policy_slug(policy)}.json"


def _settings(model: str, task: TaskSpec, policy: str, batch_size: int) -> dict:
    return {"model": model, "task": task.name, "policy": policy, "limit": task.limit,
            "num_fewshot": task.num_fewshot, "batch_size": batch_size}


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
    from lm_eval.tasks import get_task_dict

    def leaves(tree):
        for value in tree.values():
            yield from (leaves(value) if isinstance(value, dict) else [value])

    return all(t.OUTPUT_TYPE == "generate_until" for t in leaves(get_task_dict([task_name], manager)))


def _policy_args(suite: Suite, policy: str) -> tuple[str, dict]:
    """``"threshold,gap=0.6"`` -> ("threshold", {"gap": 0.6, **the suite's model_args})."""
    from lm_eval.utils import simple_parse_args_string

    name, _, rest = policy.partition(",")
    return name, {**suite.extra_model_args, **simple_parse_args_string(rest)}


def run_suite(suite: Suite, out: Path, log=print) -> list[Path]:
    """Run what is missing; return every run file of the suite (done now or before)."""
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from .engine import ExitBatch
    from .lm_backend import AdaInferLM, split_model_args
    from .model_zoo import resolve_pretrained
    from .offline_data import check_tasks_available, configure_offline_environment, tasks_dir

    configure_offline_environment()
    check_tasks_available([t.name for ts in suite.tasks.values() for t in ts])
    for policy in {p for ps in suite.policies.values() for p in ps} - {ORACLE}:  # refuse bad ones before loading
        split_model_args(*_policy_args(suite, policy))

    manager = None
    files = []
    total = sum(len(suite.tasks[m]) * (1 + len(suite.policies[m])) for m in suite.models)
    done = 0
    for model_name in suite.models:
        todo = []
        for task in suite.tasks[model_name]:
            for policy in [FULL, *suite.policies[model_name]]:
                path = run_path(out, model_name, task, policy)
                files.append(path)
                settings = _settings(model_name, task, policy, suite.batch_size)
                if path.exists() and json.loads(path.read_text()).get("settings") == settings:
                    done += 1
                    log(f"[suite] {done}/{total} {model_name} {task.name} {policy}: done before, kept")
                    continue
                todo.append((task, policy, path, settings))
        if not todo:
            continue
        folder = resolve_pretrained(model_name)
        log(f"[suite] loading {model_name} ({folder})")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).to(suite.device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        manager = manager or TaskManager(include_path=str(tasks_dir()))
        backends: dict[str, AdaInferLM] = {}

        def backend(policy: str) -> AdaInferLM:
            if policy not in backends:
                name, args = _policy_args(suite, policy)
                backends[policy] = AdaInferLM(pretrained=model, tokenizer=tokenizer, policy=name,
                                              device=suite.device, batch_size=suite.batch_size, **args)
            return backends[policy]

        # Warm-up (allocator, kernels) so that the first timed run is not penalised.
        warm = backend(FULL)
        warm.engine.run(ExitBatch.from_rows([[1] * 64] * suite.batch_size, [63] * suite.batch_size, device=warm.device))
        for task, policy, path, settings in todo:
            done += 1
            log(f"[suite] {done}/{total} {model_name} {task.name} {policy}: running")
            started = time.time()
            if policy == ORACLE and _is_generative(manager, task.name):
                from .generation_oracle import generation_oracle_run

                record = generation_oracle_run(backend(FULL), task.name, task.limit, task.num_fewshot, manager)
                record["samples"] = _compact_samples(record["samples"])
            elif policy == ORACLE:
                from .oracle import oracle_run

                record = oracle_run(backend(FULL), task.name, task.limit, task.num_fewshot)
            else:
                results = lm_eval.simple_evaluate(
                    model=backend(policy), tasks=[task.name], limit=task.limit, num_fewshot=task.num_fewshot,
                    log_samples=True, task_manager=manager, bootstrap_iters=1000,
                )
                record = {
                    "results": results["results"],
                    "group_subtasks": results.get("group_subtasks", {}),
                    "n-shot": results.get("n-shot", {}),
                    "adainfer": results["adainfer"],
                    "samples": _compact_samples(results.get("samples", {})),
                }
            record.update(settings=settings, versions=package_versions(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1, default=handle_non_serializable))
            tmp.replace(path)  # a killed run never leaves a file that looks complete
            log(f"[suite] {done}/{total} {model_name} {task.name} {policy}: {time.time() - started:.0f} s -> {path}")
    return files


def main(argv: list[str]) -> int:
    import argparse

    from .report import compare_rows, load_runs, markdown_table, write_report

    parser = argparse.ArgumentParser(prog="adainfer-eval suite", description="Run a suite file, then report.")
    parser.add_argument("suite", help="suite file (YAML or JSON): models, policies, tasks, batch_size")
    parser.add_argument("--output_path", required=True)
    a = parser.parse_args(argv)
    out = Path(a.output_path)
    files = run_suite(Suite.load(a.suite), out)
    rows = compare_rows(load_runs(files))
    versions = package_versions()
    preamble = (f"Suite `{a.suite}`; regenerate with `adainfer-eval suite {a.suite} --output_path {out}`. "
                f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}. Date: {time.strftime('%Y-%m-%d')}.")
    write_report(rows, out, title=f"adainfer-lmeval: {Path(a.suite).stem}", preamble=preamble)
    print(markdown_table(rows))
    print(f"[suite] report: {out / 'report.md'} (also .csv, .html, plots)")
    return 0
