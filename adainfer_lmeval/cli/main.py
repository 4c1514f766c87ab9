"""``adainfer-eval``: lm-eval's command line with ``adainfer`` registered, plus our commands.

``adainfer-eval models|data ...`` manage the offline cache; ``suite``, ``compare``,
``report`` and ``check`` run and judge early exit beside full depth, ``study`` runs the paper's
intra-task / inter-task / inter-model study (see SUBCOMMANDS); every
other invocation is handed to lm-eval's own CLI unchanged (``run`` flags, ``ls tasks``,
``validate``), with this repository's ``tasks/`` folder on the include path so the offline
task configs are found. (Plain ``lm_eval --model adainfer`` works too, through the start-up
hook in :mod:`adainfer_lmeval.adapter.startup_hook`; this wrapper adds our subcommands and early one-line checks.)
"""

from __future__ import annotations

import importlib
import sys

from adainfer_lmeval.errors import AdaInferError

LM_EVAL_TASK_COMMANDS = {"run", "ls", "validate"}
# our subcommands -> the module whose main(argv) runs them
SUBCOMMANDS = {  # subcommand -> the module whose main(argv) runs it
    "models": "offline.models.cli",
    "data": "offline.data.cli",
    "compare": "experiments.compare",
    "suite": "experiments.suite",
    "report": "reporting.report",
    "check": "reporting.regression_check",
    "policy": "cli.policy",
    "benchmark": "experiments.benchmark",
    "study": "experiments.study",
}


def _with_task_folder(argv: list[str]) -> list[str]:
    from adainfer_lmeval.paths import tasks_dir

    if "--include_path" in argv or any(a.startswith("--include_path=") for a in argv):
        return argv
    command = argv[0] if argv and not argv[0].startswith("-") else None
    if command is not None and command not in LM_EVAL_TASK_COMMANDS:
        return argv
    if command == "ls" and len(argv) == 1:
        return argv
    return [*argv, "--include_path", str(tasks_dir())]


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name X`` or ``--name=X`` in argv, if given."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _model_args(argv: list[str]) -> str | dict:
    """``--model_args`` as given: lm-eval takes ``k=v,k2=v2``, several ``k=v`` words, or JSON."""
    import json

    words: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("--model_args", "-a"):
            for word in argv[i + 1:]:
                if word.startswith("-"):
                    break
                words.append(word)
        elif arg.startswith("--model_args="):
            words.append(arg.split("=", 1)[1])
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        try:
            found = json.loads(words[0])
        except json.JSONDecodeError:
            raise AdaInferError(f"--model_args {words[0]!r} is not valid JSON") from None
        if isinstance(found, dict):
            return found
    return ",".join(words)


def _preflight(argv: list[str]) -> None:
    """Cheap checks that would otherwise fail only after lm-eval indexed every task (~12 s), or
    after the weights loaded."""
    from adainfer_lmeval.offline.data.availability import check_tasks_available

    if _flag(argv, "--model") == "adainfer":
        from adainfer_lmeval.adapter.model_args import check_device, check_model_args

        check_model_args(_model_args(argv))
        check_device(_flag(argv, "--device"))
    tasks = _flag(argv, "--tasks")
    if tasks:
        check_tasks_available(tasks)
        _check_hub_only_tasks(tasks)


def _check_hub_only_tasks(tasks: str) -> None:
    """Refuse, before a model loads, a built-in lm-eval task whose dataset would come from the
    Hub when the Hub is off and the dataset is not in the local datasets cache (``datasets``
    would fail with a traceback after the model loaded). Looks only at the task folder named like
    the task in lm-eval (``lm_eval/tasks/winogrande/*.yaml``); names it does not find there are
    left to lm-eval."""
    import os
    import re
    from pathlib import Path

    from adainfer_lmeval.offline.data.catalogue import find_task
    from adainfer_lmeval.offline.environment import hf_datasets_cache
    from adainfer_lmeval.paths import tasks_dir

    if os.environ.get("HF_DATASETS_OFFLINE", "").upper() not in ("1", "ON", "YES", "TRUE"):
        return
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return
    builtin = Path(list(spec.submodule_search_locations)[0]) / "tasks"
    ours = "\n".join(p.read_text(errors="replace") for p in tasks_dir().rglob("*.yaml"))
    for name in (n.strip() for n in tasks.split(",")):
        if not name or find_task(name) is not None or re.search(rf"^\s*-?\s*task:\s*{re.escape(name)}\s*$", ours, re.M):
            continue
        for config in sorted((builtin / name).glob("*.yaml")):
            text = config.read_text(errors="replace")
            if not re.search(rf"^task:\s*{re.escape(name)}\s*$", text, re.M):
                continue
            found = re.search(r"^dataset_path:\s*['\"]?([^'\"\s]+)", text, re.M)
            if not found or os.path.exists(found.group(1)):
                break
            repo = found.group(1)
            folder = repo.replace("/", "___")
            if not (hf_datasets_cache() / folder).exists():
                raise AdaInferError(
                    f"task {name} loads {repo} from the Hugging Face Hub, which is off here, and it is not in the "
                    f"datasets cache ({hf_datasets_cache()}); `adainfer-eval data list` shows the tasks available offline"
                )
            break


def _one_line(error: Exception) -> str | None:
    """lm-eval's errors a user causes, as one line naming the fix (None: not one of those)."""
    text = str(error)
    if isinstance(error, ValueError) and text.startswith("Tasks not found:"):
        return f"unknown task(s) {text.split(':', 1)[1].strip()}; `adainfer-eval ls tasks` lists them"
    if isinstance(error, ConnectionError) and "OfflineModeIsEnabled" in text:
        return (f"{text.splitlines()[0]}: this task's data is not in the offline cache; "
                "`adainfer-eval data list` shows the tasks available offline")
    return None


def _run_lm_eval(argv: list[str]) -> int:
    from adainfer_lmeval.offline.environment import configure_offline_environment

    configure_offline_environment()  # before lm-eval imports datasets
    import adainfer_lmeval  # noqa: F401  (registers the model)
    from adainfer_lmeval.adapter.harness import run_lm_eval_cli

    _preflight(argv)
    try:
        run_lm_eval_cli(_with_task_folder(argv))
    except (ValueError, ConnectionError) as error:
        line = _one_line(error)
        if line is None or isinstance(error, AdaInferError):
            raise
        raise AdaInferError(line) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from adainfer_lmeval.offline.environment import configure_offline_environment

            configure_offline_environment()  # before anything imports datasets
            module = importlib.import_module(f"adainfer_lmeval.{SUBCOMMANDS[argv[0]]}")
            return module.main(argv[1:])
        return _run_lm_eval(argv)
    except AdaInferError as error:
        print(f"adainfer-eval: error: {error}", file=sys.stderr)
        return 2
