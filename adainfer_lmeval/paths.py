"""Where the folders the package ships live: ``policies/`` (learned exit policies) and ``tasks/``
(lm-eval task configs), and the task folder made ready for lm-eval (:func:`tasks_dir`).

Both stay at the repository's top level. A wheel carries them as package data under
``adainfer_lmeval/_policies`` and ``adainfer_lmeval/_tasks`` (``setup.py`` maps the top-level
folders there), so one lookup finds them in an installed copy and in a checkout (editable or
not): the package's own copy first, else the folder beside the package.

Standard library only: the startup hook imports nothing heavier.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from adainfer_lmeval.cache import cache_path
from adainfer_lmeval.errors import AdaInferError

_PACKAGE = Path(__file__).resolve().parent
SHIPPED = {"policies": "_policies", "tasks": "_tasks"}  # top-level folder -> its name in a wheel
LM_EVAL_LINK = "_lm_eval_tasks"  # inside tasks/: a link to the installed lm_eval/tasks folder


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


def lm_eval_tasks_folder() -> Path:
    """The installed ``lm_eval/tasks`` folder (found without importing lm-eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise AdaInferError("lm-eval is not installed; install the project (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def tasks_dir() -> Path:
    """The shipped ``tasks/`` folder, ready to give lm-eval as include_path.

    Also makes sure ``tasks/_lm_eval_tasks`` links to the installed ``lm_eval/tasks`` folder:
    the YAMLs in ``tasks/`` include lm-eval's own YAMLs through it, because lm-eval resolves
    ``include:`` relative to the including file and the installed location differs between
    machines. The link is recreated when it is missing or points elsewhere. Where the shipped
    folder cannot hold the link (a read-only install), a copy in the cache serves instead.
    """
    folder = shipped_dir("tasks")
    if not os.access(folder, os.W_OK):
        folder = _writable_copy(folder)
    _ensure_lm_eval_link(folder)
    return folder


def _writable_copy(folder: Path) -> Path:
    """A copy of the task configs in the cache, keyed by their names, sizes and times."""
    import hashlib  # only read-only installs get here: the module itself stays cheap to import
    import shutil

    files = sorted(p for p in folder.rglob("*") if p.is_file() and LM_EVAL_LINK not in p.parts)
    key = hashlib.sha256(repr([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                               for p in files]).encode()).hexdigest()[:16]
    copy = cache_path("tasks", key)
    if not copy.is_dir():
        partial = copy.with_name(f".{key}.{os.getpid()}")
        shutil.copytree(folder, partial, ignore=shutil.ignore_patterns(LM_EVAL_LINK, "__pycache__"))
        try:
            os.replace(partial, copy)
        except OSError:  # another process got there first
            shutil.rmtree(partial, ignore_errors=True)
    return copy


def _ensure_lm_eval_link(folder: Path) -> None:
    target = lm_eval_tasks_folder()
    link = folder / LM_EVAL_LINK
    try:
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
    except OSError:
        pass
    temporary = folder / f".{LM_EVAL_LINK}.{os.getpid()}"
    try:
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        temporary.symlink_to(target, target_is_directory=True)
        os.replace(temporary, link)  # atomic, also when another process races us
    except OSError as error:
        if temporary.is_symlink():
            temporary.unlink()
        if not (link.is_symlink() and link.resolve() == target.resolve()):
            raise AdaInferError(f"cannot create the link {link} -> {target}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m adainfer_lmeval.paths [tasks|policies]``: print the folder (default: the task
    include path to give plain ``lm_eval --include_path``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else "tasks"
    try:
        print(tasks_dir() if name == "tasks" else shipped_dir(name))
    except AdaInferError as error:
        print(f"adainfer_lmeval.paths: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
