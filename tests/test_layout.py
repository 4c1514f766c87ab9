"""The package's layout: which room may import what, and how long a module may grow.

Every module of ``adainfer_lmeval`` is parsed with ``ast`` (every import, also those inside
functions, which is where the heavy ones live) and mapped to its room: a subpackage (core,
policies, adapter, offline, experiments, reporting, cli), a shared top-level module, or the
package face. The rules are the one-way imports of the README's layout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adainfer_lmeval"
ROOMS = {"core", "policies", "adapter", "offline", "experiments", "reporting", "cli"}
#: top-level modules everyone may import: standard library only, and each other
SHARED = {"errors", "arg_values", "cache", "paths"}
#: the package face and ``python -m adainfer_lmeval``, and the rooms each may reach
FACE = {"__init__": {"adapter"}, "__main__": {"cli"}}
#: third-party packages the core is built on (the core knows torch and transformers, nothing of lm-eval)
CORE_THIRD_PARTY = {"torch", "transformers", "safetensors", "numpy"}

#: Modules outside the adapter allowed to import lm-eval directly: none (their lm-eval calls go
#: through adainfer_lmeval.adapter.harness). A file listed here that no longer imports lm-eval
#: fails the test, so the list cannot go stale.
LM_EVAL_OUTSIDE_ADAPTER: set[str] = set()

MAX_LINES = 420
#: modules allowed past MAX_LINES, each with the reason (a table of data, say)
LONG_MODULES: dict[str, str] = {}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _room(parts: list[str]) -> str:
    """The room of ``adainfer_lmeval.<parts...>``: a subpackage, a shared module or the face
    (``adainfer_lmeval`` itself); an unknown name comes back as is and is in no room."""
    return parts[0] if parts else "__init__"


def _imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, its room or its top-level third-party name) for each import."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{_name(path)}:{node.lineno}: relative import; write it absolute"
            if node.module == "adainfer_lmeval":  # `from adainfer_lmeval import errors` names a module
                targets = [f"adainfer_lmeval.{a.name}" if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                           else "adainfer_lmeval" for a in node.names]
            else:
                targets = [node.module]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            where = _room(parts[1:]) if parts[0] == "adainfer_lmeval" else parts[0]
            assert parts[0] != "adainfer_lmeval" or _package_part(where), \
                f"{_name(path)}:{node.lineno}: imports {target}, which is in no room of the layout"
            found.append((node.lineno, target, where))
    return found


def _room_of_file(path: Path) -> str:
    return _room(list(path.relative_to(PACKAGE).with_suffix("").parts))


def _package_part(where: str) -> bool:
    return where in ROOMS or where in SHARED or where in FACE


MODULES = _modules()


def _any_package(name: str) -> bool:
    """For rooms with no rule on the standard library and third-party packages."""
    return True


def _violations(room: str, rooms: set[str], outside=_any_package) -> str:
    """Every import by a module of ``room`` of a room not in ``rooms``, or of a package from outside
    (standard library, third party) that ``outside(name)`` refuses: one ``file:line: imports x`` a line."""
    return "\n".join(f"{_name(path)}:{line}: imports {target}"
                     for path in MODULES if _room_of_file(path) == room
                     for line, target, where in _imports(path)
                     if not (where in rooms if _package_part(where) else outside(where)))


def test_every_module_is_in_a_room():
    homeless = [_name(p) for p in MODULES if not _package_part(_room_of_file(p))]
    assert not homeless, f"in no room of the layout (put them in one, or name a shared module in SHARED): {homeless}"
    assert {_room_of_file(p) for p in MODULES} == ROOMS | SHARED | set(FACE)


def test_core_knows_torch_and_transformers_only():
    bad = _violations("core", {"core"} | SHARED, lambda name: name in sys.stdlib_module_names or name in CORE_THIRD_PARTY)
    assert not bad, f"the core imports only core, shared modules, the standard library and {sorted(CORE_THIRD_PARTY)}:\n{bad}"


def test_policies_know_no_transformers_no_lm_eval():
    bad = _violations("policies", {"core", "policies"} | SHARED, lambda name: name not in ("transformers", "lm_eval"))
    assert not bad, f"policies import only core, policies and shared modules, never transformers or lm_eval:\n{bad}"


def test_only_the_adapter_imports_lm_eval():
    importing = {_name(p) for p in MODULES if _room_of_file(p) != "adapter"
                 and any(where == "lm_eval" for _, _, where in _imports(p))}
    outside = "\n".join(f"{_name(p)}:{line}: imports {target}" for p in MODULES if _name(p) in importing - LM_EVAL_OUTSIDE_ADAPTER
                         for line, target, where in _imports(p) if where == "lm_eval")
    assert not outside, f"only adainfer_lmeval/adapter imports lm-eval; reach it through adapter.harness:\n{outside}"
    stale = sorted(LM_EVAL_OUTSIDE_ADAPTER - importing)
    assert not stale, f"no longer import lm-eval, take them off LM_EVAL_OUTSIDE_ADAPTER: {stale}"


def test_offline_stands_alone():
    bad = _violations("offline", {"offline"} | SHARED)
    assert not bad, f"offline imports only offline and shared modules (no core, policies, adapter, experiments, reporting, cli):\n{bad}"


def test_reporting_reads_results_only():
    bad = _violations("reporting", ROOMS - {"experiments", "adapter", "core", "cli"} | SHARED)
    assert not bad, f"reporting imports no experiments, adapter, core or cli:\n{bad}"


@pytest.mark.parametrize("module", sorted(SHARED))
def test_shared_modules_import_only_each_other(module):
    bad = _violations(module, SHARED)
    assert not bad, f"a shared module imports nothing of the package but the other shared modules:\n{bad}"


@pytest.mark.parametrize("face", sorted(FACE))
def test_package_face_reaches_one_room(face):
    bad = _violations(face, FACE[face])
    assert not bad, f"{face}.py imports only {sorted(FACE[face])} of the package:\n{bad}"


def test_module_size():
    lengths = {_name(p): len(p.read_text().splitlines()) for p in MODULES}
    too_long = sorted(f"{name}: {n} lines" for name, n in lengths.items() if n > MAX_LINES and name not in LONG_MODULES)
    assert not too_long, f"over {MAX_LINES} lines: split them, or list them in LONG_MODULES with the reason: {too_long}"
    stale = sorted(name for name in LONG_MODULES if lengths.get(name, 0) <= MAX_LINES)
    assert not stale, f"short now (or gone), take them off LONG_MODULES: {stale}"


def test_start_up_imports_neither_lm_eval_nor_torch():
    code = ("import sys, adainfer_lmeval, adainfer_lmeval.cli.main, adainfer_lmeval.adapter.harness; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lm_eval', 'torch', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing the package or its command line loaded {out.strip()}"
