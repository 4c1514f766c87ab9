"""``adainfer-eval``: lm-eval's command line with ``adainfer`` registered, plus our commands.

``adainfer-eval models|data ...`` manage the offline cache; ``suite``, ``compare``,
``report`` and ``check`` run and judge early exit beside full depth, ``study`` runs the paper's
intra-task / inter-task / inter-model study (see SUBCOMMANDS); every
other invocation is handed to lm-eval's own CLI unchanged (``run`` flags, ``ls tasks``,
``validate``), with this repository's ``tasks/`` folder on the include path so the offline
task configs are found. lm-eval reads no entry points, which is why this wrapper exists.
"""

from __future__ import annotations

import importlib
import sys

from .errors import AdaInferError

LM_EVAL_TASK_COMMANDS = {"run", "ls", "validate"}
# our subcommands -> the module whose main(argv) runs them
SUBCOMMANDS = {
    "models": "model_zoo",
    "data": "offline_data",
    "compare": "compare",
    "suite": "suite",
    "report": "report",
    "check": "check",
    "policy": "learned_policies",
    "benchmark": "benchmark",
    "study": "study",
}


def _with_task_folder(argv: list[str]) -> list[str]:
    from .offline_data import tasks_dir

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


def _preflight(argv: list[str]) -> None:
    """Cheap checks that would otherwise fail only after lm-eval indexed every task (~12 s)."""
    from .offline_data import check_tasks_available

    if _flag(argv, "--model") == "adainfer":
        from .lm_backend import check_model_args

        check_model_args(_flag(argv, "--model_args") or "")
    tasks = _flag(argv, "--tasks")
    if tasks:
        check_tasks_available(tasks)


def _run_lm_eval(argv: list[str]) -> int:
    from .offline_data import configure_offline_environment

    configure_offline_environment()  # before lm-eval imports datasets
    import adainfer_lmeval  # noqa: F401  (registers the model)
    from lm_eval.__main__ import cli_evaluate

    _preflight(argv)
    sys.argv = ["adainfer-eval", *_with_task_folder(argv)]
    cli_evaluate()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from .offline_data import configure_offline_environment

            configure_offline_environment()  # before anything imports datasets
            module = importlib.import_module(f"adainfer_lmeval.{SUBCOMMANDS[argv[0]]}")
            return module.main(argv[1:])
        return _run_lm_eval(argv)
    except AdaInferError as error:
        print(f"adainfer-eval: error: {error}", file=sys.stderr)
        return 2
