"""Run a suite: models × tasks × policies, the full-depth baseline always beside them.

A suite file (JSON or YAML) names what to run::

    models: [smollm2-135m]
    policies: ["threshold,gap=0.6,min_layer=20", "threshold,gap=0.8,min_layer=20"]
    # or per model: policies: {smollm2-135m: [...], qwen2.5-coder-0.5b: [...]}, and tasks likewise
    tasks:
      - {name: sst2, limit: 200}
      - {name: mmlu, limit: 1, num_fewshot: 0}
    batch_size: 8
    # optional: device (cpu), dtype (float32), model_args ("" : args for every run)

A malformed suite (unknown key, wrong type, a plain string where a list belongs, duplicates) is
refused in one line that names the key.

Each (model, task, policy) run is written to ``<out>/runs/<model>/<task>/<policy>.json`` as
soon as it finishes (atomically: a killed run never leaves a file that looks complete): lm-eval's
results, the ``adainfer`` statistics, and compact samples (log-probs, target and exit layers per
document). A killed or interrupted suite resumes: a run whose file holds the same settings is not
run again. The settings are everything that changes a result: model, task, shots, limit,
policy, batch size, device, dtype, the suite's model args and the sha256 of the policy file a
learned policy reads (``svm`` resolves to the shipped file of the model), so editing any of
them runs that run again. Names that would slug to the same file (``a_b/svm.json`` and
``a/b/svm.json``) get a short hash of the exact name, so no run overwrites another.
``--dry_run`` lists what would run without loading anything; ``--migrate`` upgrades run files
written before the settings carried device, dtype, model args and the policy hash.
Each model is loaded once and serves every run of it, so full depth and early exit are timed in
the same process on the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.pypi import package_versions
from adainfer_lmeval.reporting.report import FULL

ORACLE = "oracle"  # not a policy: the earliest layer after which each answer never changes (hindsight)
KEY_VERSION = 2  # settings that carry device, dtype, model_args and policy_sha256
LEGACY_FIELDS = ("model", "task", "policy", "limit", "num_fewshot", "batch_size")
DTYPES = ("float32", "bfloat16", "float16")
TOP_KEYS = ("models", "policies", "tasks", "batch_size", "device", "dtype", "model_args")
TASK_KEYS = ("name", "limit", "num_fewshot")
# Suite keys that AdaInferLM would also take as model args: one place to set each.
RESERVED_MODEL_ARGS = {"pretrained": "models", "policy": "policies", "batch_size": "batch_size",
                       "device": "device", "dtype": "dtype"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    limit: float | None = None
    num_fewshot: int | None = None


def _fail(message: str):
    raise AdaInferError(f"suite: {message}")


def _names(value, key: str) -> list[str]:
    """A list of non-empty strings, without duplicates (``key`` names the place in errors)."""
    if isinstance(value, str):
        _fail(f"{key} must be a list, not the string {value!r}; write {key}: [{value}]")
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        _fail(f"{key} must be a list of names, got {value!r}")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        _fail(f"{key} lists {', '.join(twice)} more than once")
    return list(value)


def _task(item, key: str) -> TaskSpec:
    if isinstance(item, str) and item.strip():
        return TaskSpec(item)
    if not isinstance(item, dict):
        _fail(f"{key}: a task is a name or a mapping {{name, limit, num_fewshot}}, got {item!r}")
    stray = sorted(set(map(str, item)) - set(TASK_KEYS))
    if stray:
        _fail(f"{key}: unknown task key(s) {', '.join(stray)}; known: {', '.join(TASK_KEYS)}")
    name, limit, shots = item.get("name"), item.get("limit"), item.get("num_fewshot")
    if not isinstance(name, str) or not name.strip():
        _fail(f"{key}: a task needs name: <lm-eval task>, got {item!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0
                              or (isinstance(limit, float) and limit > 1 and not limit.is_integer())):
        _fail(f"{key}.{name}.limit must be a number of documents (or a fraction <= 1), got {limit!r}")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        _fail(f"{key}.{name}.num_fewshot must be an integer >= 0, got {shots!r}")
    return TaskSpec(name, limit, shots)


def _per_model(value, key: str, models: list[str]) -> dict:
    """``[...]`` for every model, or ``{model: [...]}``; a model key not among ``models`` is refused."""
    if isinstance(value, dict):
        stray = sorted(set(map(str, value)) - set(models))
        if stray:
            _fail(f"{key} names {', '.join(stray)}, which is not among models ({', '.join(models)})")
        return {m: value.get(m, []) for m in models}
    return {m: value for m in models}


@dataclass
class Suite:
    models: list[str]
    policies: dict[str, list[str]]  # model -> policies (besides full depth, which always runs)
    tasks: dict[str, list[TaskSpec]]  # model -> tasks
    batch_size: int = 8
    device: str = "cpu"
    extra_model_args: dict = field(default_factory=dict)
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, spec) -> "Suite":
        if not isinstance(spec, dict):
            _fail(f"a suite is a mapping of {', '.join(TOP_KEYS)}; got {type(spec).__name__}")
        stray = sorted(set(map(str, spec)) - set(TOP_KEYS))
        if stray:
            _fail(f"unknown key(s) {', '.join(stray)}; known: {', '.join(TOP_KEYS)}")
        if not spec.get("models"):
            _fail("needs models: [<model>, ...]")
        models = _names(spec["models"], "models")
        tasks = {}
        for model, items in _per_model(spec.get("tasks", []), "tasks", models).items():
            key = "tasks" if not isinstance(spec.get("tasks"), dict) else f"tasks.{model}"
            if isinstance(items, (str, dict)):
                _fail(f"{key} must be a list of tasks, e.g. {key}: [{{name: sst2, limit: 100}}]")
            if not isinstance(items, list) or not items:
                _fail(f"needs tasks for every model; {key} has none")
            specs = [_task(t, key) for t in items]
            twice = sorted({t.name for t in specs if specs.count(t) > 1})
            if twice:
                _fail(f"{key} lists {', '.join(twice)} twice with the same limit and shots")
            tasks[model] = specs
        policies = {}
        for model, items in _per_model(spec.get("policies", []), "policies", models).items():
            key = "policies" if not isinstance(spec.get("policies"), dict) else f"policies.{model}"
            policies[model] = [p for p in _names(items, key) if p != FULL]
        batch_size = spec.get("batch_size", 8)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            _fail(f"batch_size must be an integer >= 1, got {batch_size!r}")
        device = spec.get("device", "cpu")
        if not isinstance(device, str) or not device.strip():
            _fail(f"device must be a device name such as cpu or cuda, got {device!r}")
        dtype = spec.get("dtype", "float32")
        if dtype not in DTYPES:
            _fail(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return cls(models=models, policies=policies, tasks=tasks, batch_size=batch_size, device=device,
                   extra_model_args=_model_args(spec.get("model_args", "")), dtype=dtype)

    @classmethod
    def load(cls, path: str | Path) -> "Suite":
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise AdaInferError(f"suite {path}: cannot read it ({error.strerror or error})") from None
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as error:
                where = getattr(error, "problem_mark", None)
                at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
                raise AdaInferError(f"suite {path}: not valid YAML{at} ({getattr(error, 'problem', None) or error})") from None
        else:
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as error:
                raise AdaInferError(f"suite {path}: not valid JSON ({error})") from None
        return cls.from_dict(spec)


def _model_args(value) -> dict:
    from lm_eval.utils import simple_parse_args_string

    if isinstance(value, dict):
        args = dict(value)
    elif isinstance(value, str):
        try:
            args = simple_parse_args_string(value)
        except ValueError as error:
            _fail(f"model_args {value!r} is not key=value,key=value ({error})")
    else:
        _fail(f"model_args must be a string key=value,... or a mapping, got {value!r}")
    for key in sorted(set(args) & set(RESERVED_MODEL_ARGS)):
        _fail(f"model_args sets {key}; set it with the suite's {RESERVED_MODEL_ARGS[key]} key instead")
    return args


# ---- run files: where each run lives and what identifies it ---------------------------------------

_CLEAN_POLICY = re.compile(r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+=[A-Za-z0-9_.]+)*")
_CLEAN_MODEL = re.compile(r"[A-Za-z0-9_.-]+")


def policy_slug(policy: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", policy).strip("_") or FULL


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _component(text: str, clean: bool) -> str:
    """A file-name part: the slug, plus a hash of the exact text where the slug may lose it
    (paths: ``a_b/svm.json`` and ``a/b/svm.json`` slug alike)."""
    return policy_slug(text) if clean else f"{policy_slug(text)}-{_short_hash(text)}"


def run_path(out: Path, model: str, task: TaskSpec, policy: str, exact: bool = False) -> Path:
    """``exact``: hash both names even where the slug is clean (two runs of a suite collided)."""
    shots = "default" if task.num_fewshot is None else task.num_fewshot
    limit = "all" if task.limit is None else f"{task.limit:g}"
    model_part = _component(model, not exact and bool(_CLEAN_MODEL.fullmatch(model)))
    policy_part = _component(policy, not exact and bool(_CLEAN_POLICY.fullmatch(policy)))
    return out / "runs" / model_part / f"{task.name}-{shots}shot-limit{limit}" / f"{policy_part}.json"


def _policy_args(suite: Suite, policy: str) -> tuple[str, dict]:
    """``"threshold,gap=0.6"`` -> ("threshold", {"gap": 0.6, **the suite's model_args})."""
    from lm_eval.utils import simple_parse_args_string

    name, _, rest = policy.partition(",")
    return name, {**suite.extra_model_args, **simple_parse_args_string(rest)}


def model_short_name(model: str) -> str:
    """The name a learned policy is looked up by (ModelIdentity.name: the folder's last part)."""
    from adainfer_lmeval.offline.model_zoo import lookup

    spec = lookup(model)
    return spec.name if spec is not None and not os.path.isdir(model) else model.rstrip("/").split("/")[-1]


def policy_file(model: str, name: str, args: dict) -> Path | None:
    """The policy file a run reads (``svm`` -> the model's shipped svm.json); None for rule policies."""
    from adainfer_lmeval.policies.learned import LearnedPolicy
    from adainfer_lmeval.policies.files import shipped_path
    from adainfer_lmeval.policies import registered_policies

    if name in (FULL, ORACLE):
        return None
    if args.get("path"):
        return Path(str(args["path"]))
    cls = registered_policies().get(name)
    if cls is None and ("/" in name or os.sep in name or name.lower().endswith(".json")):
        return Path(name)
    if isinstance(cls, type) and issubclass(cls, LearnedPolicy) and cls.kind:
        return shipped_path(model_short_name(model), cls.kind)
    return None


def policy_file_sha256(path: Path | None) -> str | None:
    """sha256 of a policy file's bytes (and of the crfsuite model a CRF file names)."""
    from adainfer_lmeval.policies.files import MAX_FILE_BYTES

    if path is None:
        return None
    try:  # only what the policy loader would read: a regular file of policy size (a FIFO would block)
        data = path.read_bytes() if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES else None
    except OSError:
        data = None
    if data is None:
        return "unreadable"  # the run refuses the file itself; the key must still differ from a good one
    digest = hashlib.sha256(data)
    try:
        crf = json.loads(data).get("crfsuite_file")
    except (ValueError, AttributeError):
        crf = None
    if isinstance(crf, str) and "/" not in crf:
        model = path.parent / crf
        try:
            ok = model.is_file() and model.stat().st_size <= MAX_FILE_BYTES
            digest.update(model.read_bytes() if ok else b"unreadable")
        except OSError:
            digest.update(b"unreadable")
    return digest.hexdigest()


def run_settings(suite: Suite, model: str, task: TaskSpec, policy: str) -> dict:
    """Everything that changes a run's result: equal settings are the same run."""
    name, args = _policy_args(suite, policy)
    settings = {
        "model": model, "task": task.name, "policy": policy, "limit": task.limit, "num_fewshot": task.num_fewshot,
        "batch_size": suite.batch_size, "device": suite.device, "dtype": suite.dtype,
        "model_args": suite.extra_model_args, "policy_sha256": policy_file_sha256(policy_file(model, name, args)),
        "key_version": KEY_VERSION,
    }
    return json.loads(json.dumps(settings))  # as it reads back from a file


@dataclass
class PlannedRun:
    model: str
    task: TaskSpec
    policy: str
    path: Path
    settings: dict
    status: str  # "done", "new", "changed: <fields>", "legacy" (written before KEY_VERSION)
    index: int = 0  # 1-based, for progress lines

    @property
    def done(self) -> bool:
        return self.status == "done"


def _stored_settings(path: Path) -> dict | None:
    try:
        settings = json.loads(path.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: run again (the atomic write means it was never ours complete)
    return settings if isinstance(settings, dict) else None


def _status(stored: dict | None, settings: dict) -> str:
    if stored is None:
        return "new"
    if stored == settings:
        return "done"
    if "key_version" not in stored:
        return "legacy"
    changed = [k for k in settings if stored.get(k) != settings[k]]
    return f"changed: {', '.join(changed)}"


def plan_suite(suite: Suite, out: Path) -> list[PlannedRun]:
    """Every run of the suite, its file and whether it is done; loads no model."""
    wanted = [(m, t, p) for m in suite.models for t in suite.tasks[m] for p in [FULL, *suite.policies[m]]]
    paths = {w: run_path(out, *w) for w in wanted}
    by_path: dict[Path, list] = {}
    for w, p in paths.items():
        by_path.setdefault(p, []).append(w)
    plan = []
    for model, task, policy in wanted:
        path = paths[(model, task, policy)]
        settings = run_settings(suite, model, task, policy)
        stored = _stored_settings(path) if path.exists() else None
        foreign = stored is not None and (stored.get("model"), stored.get("policy")) != (model, policy)
        if len(by_path[path]) > 1 or foreign:  # another run's slug: keep both, under exact names
            path = run_path(out, model, task, policy, exact=True)
            stored = _stored_settings(path) if path.exists() else None
        plan.append(PlannedRun(model, task, policy, path, settings, _status(stored, settings), len(plan) + 1))
    return plan


def write_run_file(path: Path, record: dict) -> None:
    """Write atomically: a temporary file beside it, renamed over it; never a half-written run file."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # not *.json: never read as a run
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(record, indent=1, default=handle_non_serializable))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def migrate_legacy_runs(suite: Suite, out: Path, log=print) -> tuple[int, int]:
    """Upgrade run files written before the settings carried device, dtype, model args and policy hash.

    A legacy file is taken as this suite's run when its stored fields (model, task, policy, limit,
    shots, batch size) equal the suite's and, for a learned policy, the policy it describes (trained
    for, training data hash, label, operating point) is the file the suite would read now; device,
    dtype and model args are the suite's as it stands (older suites had no way to set the latter
    two: loads were float32, model_args were not stored). Returns (migrated, left to run again).
    """
    from adainfer_lmeval.policies.files import read_policy_json

    migrated = left = 0
    for run in plan_suite(suite, out):
        if run.status != "legacy":
            continue
        record = json.loads(run.path.read_text())
        stored = record["settings"]
        reasons = [k for k in LEGACY_FIELDS if stored.get(k) != run.settings[k]]
        name, args = _policy_args(suite, run.policy)
        source = policy_file(run.model, name, args)
        if source is not None and not reasons:
            described = (record.get("adainfer") or {}).get("policy") or {}
            try:
                meta = read_policy_json(source)
            except AdaInferError as error:
                reasons.append(f"policy file unreadable ({error})")
            else:
                now = {"trained_for": meta["model"]["name"], "label": meta.get("label"),
                       "data_sha256": (meta.get("training") or {}).get("data_sha256"),
                       "threshold": float(args.get("threshold", meta["threshold"])),
                       "min_layer": int(args.get("min_layer", meta["min_layer"]))}
                reasons += [f"policy {k}" for k, v in now.items() if described.get(k) != v]
        if reasons:
            left += 1
            log(f"[suite] not migrated (runs again): {run.path} ({', '.join(reasons)} differ)")
            continue
        record["settings"] = run.settings
        write_run_file(run.path, record)
        migrated += 1
    return migrated, left


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


def _preflight(suite: Suite) -> None:
    """Refuse unknown tasks and bad policies before any model loads."""
    from adainfer_lmeval.adapter.backend import split_model_args
    from adainfer_lmeval.offline.data import check_tasks_available, configure_offline_environment

    configure_offline_environment()
    check_tasks_available([t.name for ts in suite.tasks.values() for t in ts])
    for policy in {p for ps in suite.policies.values() for p in ps} - {ORACLE}:
        split_model_args(*_policy_args(suite, policy))


def _open_model(suite: Suite, model_name: str, log):
    """Load ``model_name`` once; return run(task, policy) -> the run's record (without settings)."""
    import lm_eval
    import torch
    import transformers
    from lm_eval.tasks import TaskManager

    from adainfer_lmeval.core.engine import ExitBatch
    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.offline.model_zoo import resolve_pretrained
    from adainfer_lmeval.offline.data import tasks_dir

    folder = resolve_pretrained(model_name)
    log(f"[suite] loading {model_name} ({folder})")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, suite.dtype))
    model = model.to(suite.device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    manager = TaskManager(include_path=str(tasks_dir()))
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

    def run(task: TaskSpec, policy: str) -> dict:
        if policy == ORACLE and _is_generative(manager, task.name):
            from adainfer_lmeval.experiments.generation_oracle import generation_oracle_run

            record = generation_oracle_run(backend(FULL), task.name, task.limit, task.num_fewshot, manager)
            record["samples"] = _compact_samples(record["samples"])
            return record
        if policy == ORACLE:
            from adainfer_lmeval.experiments.oracle import oracle_run

            return oracle_run(backend(FULL), task.name, task.limit, task.num_fewshot)
        results = lm_eval.simple_evaluate(
            model=backend(policy), tasks=[task.name], limit=task.limit, num_fewshot=task.num_fewshot,
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


def main(argv: list[str]) -> int:
    import argparse

    from adainfer_lmeval.reporting.report import compare_rows, leaderboard_markdown, load_runs, write_report

    parser = argparse.ArgumentParser(prog="adainfer-eval suite", description="Run a suite file, then report.")
    parser.add_argument("suite", help="suite file (YAML or JSON): models, policies, tasks, batch_size")
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--dry_run", action="store_true", help="list which runs are done and which would run; load nothing")
    parser.add_argument("--migrate", action="store_true",
                        help="first upgrade run files written before settings carried device, dtype, model_args and "
                             "the policy file's sha256 (only where they match this suite as it is now)")
    a = parser.parse_args(argv)
    out = Path(a.output_path)
    suite = Suite.load(a.suite)
    if a.migrate:
        migrated, left = migrate_legacy_runs(suite, out)
        print(f"[suite] migrated {migrated} run file(s); {left} left to run again")
    if a.dry_run:
        plan = plan_suite(suite, out)
        for run in plan:
            print(f"{'kept' if run.done else 'RUN ':4}  {run.model} {run.task.name} {run.policy}  "
                  f"({run.status}) {run.path}")
        pending = sum(not r.done for r in plan)
        legacy = sum(r.status == "legacy" for r in plan)
        print(f"[suite] {pending} of {len(plan)} runs would run" + (
            f" ({legacy} written under the old settings; --migrate keeps them if this suite has not changed)"
            if legacy else ""))
        return 0
    try:
        files = run_suite(suite, out)
    except KeyboardInterrupt:
        kept = sum(r.done for r in plan_suite(suite, out))
        print(f"[suite] interrupted: {kept} finished run(s) kept under {out / 'runs'}; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    rows = compare_rows(load_runs(files))
    versions = package_versions()
    preamble = (f"Suite `{a.suite}`; regenerate with `adainfer-eval suite {a.suite} --output_path {out}`. "
                f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}. Date: {time.strftime('%Y-%m-%d')}.")
    write_report(rows, out, title=f"adainfer-lmeval: {Path(a.suite).stem}", preamble=preamble)
    print(leaderboard_markdown(rows))
    print(f"[suite] report: {out / 'report.md'} (also .csv, .html, plots)")
    return 0
