"""Where the folders the package ships live: ``policies/`` (learned exit policies) and ``tasks/``
(lm-eval task configs).

Both stay at the repository's top level. A wheel carries them as package data under
``adainfer_lmeval/_policies`` and ``adainfer_lmeval/_tasks`` (``setup.py`` maps the top-level
folders there), so one lookup finds them in an installed copy and in a checkout (editable or
not): the package's own copy first, else the folder beside the package.

Standard library only: the startup hook imports nothing heavier.
"""

from __future__ import annotations

import sys
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError

_PACKAGE = Path(__file__).resolve().parent
SHIPPED = {"policies": "_policies", "tasks": "_tasks"}  # top-level folder -> its name in a wheel


def shipped_dir(name: str) -> Path:
    """The shipped folder ``name`` (``"policies"`` or ``"tasks"``) of this copy of the package."""
    if name not in SHIPPED:
        raise AdaInferError(f"no shipped folder {name!r}; there are: {', '.join(SHIPPED)}")
    candidates = (_PACKAGE / SHIPPED[name], _PACKAGE.parent / name)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise AdaInferError(
        f"the shipped {name}/ folder is missing (looked in {', '.join(map(str, candidates))}); "
        "reinstall adainfer-lmeval (pip install adainfer-lmeval, or pip install -e . in a checkout)"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m adainfer_lmeval.paths [tasks|policies]``: print the folder (default: the task
    include path to give plain ``lm_eval --include_path``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else "tasks"
    try:
        if name == "tasks":
            from adainfer_lmeval.offline.data import tasks_dir  # also links lm-eval's own task folder into it

            print(tasks_dir())
        else:
            print(shipped_dir(name))
    except AdaInferError as error:
        print(f"adainfer_lmeval.paths: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
