"""What pyproject.toml cannot say: the shipped folders as package data, and the start-up hook.

- ``policies/`` and ``tasks/`` stay at the repository's top level and go into the wheel as
  ``adainfer_lmeval/_policies`` and ``adainfer_lmeval/_tasks`` (``adainfer_lmeval.paths`` finds
  them in both places). The link ``tasks/_lm_eval_tasks`` that runs create is left out.
- ``adainfer_lmeval_hook.pth`` goes to the top of site-packages, in a wheel and in an editable
  install alike: Python runs its import line at start-up, which lets lm-eval's own ``lm_eval``
  command find ``--model adainfer`` (see ``adainfer_lmeval/adapter/startup_hook.py``).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

DATA = {"adainfer_lmeval._policies": "policies", "adainfer_lmeval._tasks": "tasks"}
PTH_NAME = "adainfer_lmeval_hook.pth"
PTH_LINE = "import adainfer_lmeval.adapter.startup_hook; adainfer_lmeval.adapter.startup_hook.install()\n"


class build_py_with_hook(build_py):
    """build_py, plus the .pth file at the root of what gets installed.

    A regular wheel packs ``build_lib``. An editable wheel (PEP 660) does not: setuptools writes
    what it installs as-is (data, scripts) into the unpacked wheel, which it hands to the
    ``install`` command as ``install_lib``; the .pth goes there, beside setuptools' own
    ``__editable__`` .pth (which sorts first, so the package is importable when ours runs).
    """

    def run(self):
        super().run()
        root = Path(self.build_lib)
        if self.editable_mode:
            root = Path(self.get_finalized_command("install").install_lib)
        root.mkdir(parents=True, exist_ok=True)
        (root / PTH_NAME).write_text(PTH_LINE, encoding="utf-8")

    def find_data_files(self, package, src_dir):
        """Every file under a shipped folder, found without following links: the link into
        lm-eval's own tasks (thousands of files) stays out, and so do hidden files and caches."""
        if package not in DATA:
            return super().find_data_files(package, src_dir)
        found = []
        for root, dirs, names in os.walk(src_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_lm_eval_tasks")) and d != "__pycache__")
            found += [os.path.join(root, name) for name in sorted(names) if not name.startswith(".")]
        return found


setup(
    packages=[*find_packages(include=["adainfer_lmeval", "adainfer_lmeval.*"]), *DATA],
    package_dir=DATA,
    include_package_data=False,  # the data is what find_data_files lists, not a manifest
    cmdclass={"build_py": build_py_with_hook},
)
