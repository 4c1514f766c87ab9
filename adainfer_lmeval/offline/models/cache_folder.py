"""A converted model's folder in the cache: where it is, whether it is complete, and whether
its files are still the ones converted (checksums written at conversion, checked at each load)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from adainfer_lmeval.cache import cache_path
from adainfer_lmeval.offline.models.table import FetchError, get_spec, log
from adainfer_lmeval.offline.pypi import sha256_file

MARKER_FILE = "adainfer_model.json"  # written inside the folder before it is renamed into place
MANIFEST_FILE = "adainfer_manifest.json"  # checksums recorded at first load, for folders fetched without them
STAMP_FILE = ".adainfer_verified.json"  # per file: (size, mtime, ctime, inode) when its sha256 last matched


def model_dir(name: str) -> Path:
    return cache_path("models", get_spec(name).name)


def is_fetched(name: str) -> bool:
    return (model_dir(name) / MARKER_FILE).is_file()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _model_files(folder: Path) -> list[str]:
    skip = {MARKER_FILE, MANIFEST_FILE, STAMP_FILE}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in skip)


def manifest(folder: Path) -> tuple[dict, dict]:
    """({file: {size, sha256}}, {file: stat key}) of every file of the folder."""
    files, stamps = {}, {}
    for rel in _model_files(folder):
        stamps[rel] = _stat_key(folder / rel)
        files[rel] = {"size": stamps[rel][0], "sha256": sha256_file(folder / rel)}
    return files, stamps


def _write_json_atomic(path: Path, data: dict) -> bool:
    """False where the folder is not writable (a read-only shared cache): then nothing is cached."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


@dataclass
class CacheCheck:
    state: str  # "ok", "damaged", "recorded" (checksums recorded now, folder from before they existed), "unverified"
    detail: str = ""


def _expected_files(folder: Path) -> tuple[dict | None, str]:
    """The checksums a folder must match and when they were taken ("conversion", "first load"; None: never)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError) as error:
        raise _Damaged(f"{MARKER_FILE} unreadable ({error})") from None
    if not isinstance(marker, dict):
        raise _Damaged(f"{MARKER_FILE} is not a JSON object")
    if "files" in marker:
        return marker["files"], "conversion"
    if (folder / MANIFEST_FILE).is_file():
        try:
            return json.loads((folder / MANIFEST_FILE).read_text())["files"], "first load"
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _Damaged(f"{MANIFEST_FILE} unreadable ({error})") from None
    return None, ""


class _Damaged(Exception):
    pass


def check_cache(name: str, full: bool = False, record: bool = True) -> CacheCheck:
    """Check a fetched model's files against the checksums written when it was converted.

    ``full`` hashes every file; otherwise only files whose stat changed since their hash last
    matched. ``record``: for a folder converted before checksums existed, hash it now and keep
    the result (trust on first use)."""
    folder = model_dir(name)
    try:
        expected, source = _expected_files(folder)
        if expected is None:
            if not record:
                return CacheCheck("unverified", "fetched before checksums were kept; recorded at its next load")
            files, stamps = manifest(folder)
            note = {"files": files, "recorded": "first load", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if not _write_json_atomic(folder / MANIFEST_FILE, note):
                return CacheCheck("unverified", "fetched before checksums were kept, and the folder is read-only")
            _write_json_atomic(folder / STAMP_FILE, {"stamps": stamps})
            return CacheCheck("recorded", "fetched before checksums were kept; recorded them now")
        if not isinstance(expected, dict) or not expected:
            raise _Damaged("its checksum list is empty or malformed")
        try:
            stamps = json.loads((folder / STAMP_FILE).read_text()).get("stamps", {})
        except (OSError, ValueError, AttributeError):
            stamps = {}
        fresh = {}
        for rel, want in sorted(expected.items()):
            path = folder / rel
            if not isinstance(want, dict) or not {"size", "sha256"} <= set(want):
                raise _Damaged(f"its checksum entry for {rel} is malformed")
            try:
                key = _stat_key(path)
            except OSError:
                raise _Damaged(f"{rel} is missing") from None
            if key[0] != want["size"]:
                raise _Damaged(f"{rel} is {key[0]} bytes, was {want['size']} at {source}: truncated or altered")
            if full or stamps.get(rel) != key:
                if sha256_file(path) != want["sha256"]:
                    raise _Damaged(f"{rel} differs from its sha256 recorded at {source}: altered")
                fresh[rel] = key
        if fresh:
            _write_json_atomic(folder / STAMP_FILE, {"stamps": {**stamps, **fresh}})
        return CacheCheck("ok", f"checksums from {source}")
    except _Damaged as damage:
        return CacheCheck("damaged", str(damage))


def verify_cached(name: str, full: bool = False) -> None:
    """Refuse (one line) a damaged cached model; a note where checksums were recorded just now."""
    spec = get_spec(name)
    result = check_cache(spec.name, full=full)
    if result.state == "damaged":
        raise FetchError(f"{spec.name}: the cached model in {model_dir(spec.name)} is damaged ({result.detail}); "
                         f"re-fetch it with: adainfer-eval models fetch {spec.name} --force")
    if result.state in ("recorded", "unverified"):
        log(f"{spec.name}: {result.detail} (adainfer-eval models fetch {spec.name} --force re-converts it)")

