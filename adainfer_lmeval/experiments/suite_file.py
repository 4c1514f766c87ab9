"""A suite file (JSON or YAML): which models, tasks and policies to run, read and checked.

::

    models: [smollm2-135m]
    policies: ["threshold,gap=0.6,min_layer=20", "threshold,gap=0.8,min_layer=20"]
    # or per model: policies: {smollm2-135m: [...], qwen2.5-coder-0.5b: [...]}, and tasks likewise
    tasks:
      - {name: sst2, limit: 200}
      - {name: mmlu, limit: 1, num_fewshot: 0}
    batch_size: 8
    # optional: device (cpu), dtype (float32), model_args ("" : args for every run)

A malformed suite (unknown key, wrong type, a plain string where a list belongs, duplicates) is
refused in one line that names the key. The full-depth baseline is not listed: it always runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.reporting.comparison import FULL

DTYPES = ("float32", "bfloat16", "float16")
TOP_KEYS = ("models", "policies", "tasks", "batch_size", "device", "dtype", "model_args")
TASK_KEYS = ("name", "limit", "num_fewshot")
# Suite keys that AdaInferLM would also take as model args: one place to set each.
RESERVED_MODEL_ARGS = {"pretrained": "models", "policy": "policies", "batch_size": "batch_size",
                       "device": "device", "dtype": "dtype"}


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: an lm-eval task, its documents (a count, or a fraction <= 1) and shots;
    None is lm-eval's default (every document, the task's own shots)."""

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


def _task(item, key: str) -> SuiteTask:
    if isinstance(item, str) and item.strip():
        return SuiteTask(item)
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
    return SuiteTask(name, limit, shots)


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
    tasks: dict[str, list[SuiteTask]]  # model -> tasks
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

    def policy_args(self, policy: str) -> tuple[str, dict]:
        """``"threshold,gap=0.6"`` -> ("threshold", {"gap": 0.6, **the suite's model_args})."""
        from adainfer_lmeval.adapter.harness import parse_arg_string

        name, _, rest = policy.partition(",")
        return name, {**self.extra_model_args, **parse_arg_string(rest)}


def _model_args(value) -> dict:
    from adainfer_lmeval.adapter.harness import parse_arg_string

    if isinstance(value, dict):
        args = dict(value)
    elif isinstance(value, str):
        try:
            args = parse_arg_string(value)
        except ValueError as error:
            _fail(f"model_args {value!r} is not key=value,key=value ({error})")
    else:
        _fail(f"model_args must be a string key=value,... or a mapping, got {value!r}")
    for key in sorted(set(args) & set(RESERVED_MODEL_ARGS)):
        _fail(f"model_args sets {key}; set it with the suite's {RESERVED_MODEL_ARGS[key]} key instead")
    return args

