"""Where the rest of the package reaches lm-eval: task indexes, evaluation, its argument parser,
its JSON fallback and its command line, each one small named function.

Every function imports lm-eval when it is called, not when this module is imported, so a module
can import this one at its top and still start without lm-eval (``import adainfer_lmeval`` and
``adainfer-eval --help`` must not pay for it). The lm-eval classes a caller needs as classes,
:data:`HFLM` (the ``hf`` backend adainfer is measured and checked against) and :data:`Instance`
(one request), are re-exported the same way: loaded on first access.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

#: lm-eval classes re-exported on access: name -> the lm-eval module that defines it
_CLASSES = {"HFLM": "lm_eval.models.huggingface", "Instance": "lm_eval.api.instance"}


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_manager(include_path: str | Path | None = None):
    """lm-eval's task index, with ``include_path`` added (default: this repository's task folder,
    so its offline tasks are found). Indexing every lm-eval task takes seconds: build one per run."""
    from lm_eval.tasks import TaskManager

    from adainfer_lmeval.paths import tasks_dir

    return TaskManager(include_path=str(tasks_dir() if include_path is None else include_path))


def task_dict(names: list[str], manager) -> dict:
    """lm-eval's tasks by name (``get_task_dict``); a group maps to a dict of its subtasks."""
    from lm_eval.tasks import get_task_dict

    return get_task_dict(names, manager)


def evaluate(model, tasks: list[str], **options) -> dict:
    """``lm_eval.simple_evaluate(model=model, tasks=tasks, **options)``: ``model`` is a built
    backend or a registered model name (then ``model_args`` says how to build it)."""
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=tasks, **options)


def parse_arg_string(text: str) -> dict:
    """``key=value,key=value`` as plain lm-eval parses it (``simple_parse_args_string``: values
    typed, the last of a repeated key kept). The backend's stricter ``--model_args`` parser is
    :func:`adainfer_lmeval.adapter.model_args.parse_model_args`."""
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


def json_default(value):
    """``json.dumps(..., default=json_default)``: what lm-eval writes for values JSON cannot hold
    (``handle_non_serializable``: numpy numbers as numbers, sets as lists, the rest as text)."""
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)


def run_lm_eval_cli(argv: list[str], prog: str = "adainfer-eval") -> None:
    """lm-eval's own command line (``lm_eval ...``) on ``argv``; it reads ``sys.argv``, so that is set."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [prog, *argv]
    cli_evaluate()
