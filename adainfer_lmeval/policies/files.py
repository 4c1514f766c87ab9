"""Policy files, read safely: size, pickle refusal, JSON fields, numbers; where they live.

Formats are text only; nothing is ever unpickled. A policy file is one JSON document (format,
kind, model, features, operating point, the kind's parameters, training metadata). A CRF's JSON
also names its crfsuite model file, checked by :mod:`.crfsuite_check` before crfsuite opens it.
Every refusal is one line (:class:`AdaInferError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.features import SIGNALS
from adainfer_lmeval.policies import ModelIdentity

log = logging.getLogger(__name__)

FORMAT = "adainfer-exit-policy"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 1_000_000


def policies_dir() -> Path:
    """The shipped policies: ``$ADAINFER_POLICIES`` or the package's ``policies/`` (see :mod:`.paths`)."""
    from adainfer_lmeval.paths import shipped_dir

    explicit = os.environ.get("ADAINFER_POLICIES")
    return Path(explicit) if explicit else shipped_dir("policies")


def shipped_path(model_name: str, kind: str) -> Path:
    return policies_dir() / model_name / f"{kind}.json"


def known_signals() -> tuple[str, ...]:
    """The signal names a policy file may list: those the core computes on request."""
    return tuple(SIGNALS)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- reading files safely ---------------------------------------------------------------------


def looks_like_pickle(data: bytes) -> bool:
    if data[:1] == b"\x80" and len(data) > 1 and data[1:2] in bytes(range(2, 6)):
        return True  # pickle protocol 2..5 header
    if data[:2] == b"PK":  # zip: torch.save / joblib-in-zip archives hold pickles
        return True
    return data[:1] in (b"(", b"]", b"}", b"c") and data.rstrip().endswith(b".")  # protocol 0/1


def read_policy_json(path: str | Path) -> dict:
    """The policy metadata at ``path``: a small JSON policy file with sound common fields, never unpickled.

    The kind's own fields are checked by its class (:func:`adainfer_lmeval.policies.learned.read_policy`).
    """
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle", ".joblib", ".pt", ".bin", ".sav"):
        raise AdaInferError(f"{path}: refusing a {path.suffix} file (pickles are never loaded); policy files are JSON")
    data = read_small_file(path, "policy file")
    if looks_like_pickle(data):
        raise AdaInferError(f"{path}: this is a pickle/zip archive, not a JSON policy file; refusing to unpickle it")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdaInferError(f"{path}: corrupt policy file (not valid JSON: {str(error).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdaInferError(f"{path}: not an adainfer exit-policy file (missing \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdaInferError(f"{path}: policy format version {meta.get('format_version')!r} is not supported (need {FORMAT_VERSION})")
    if not isinstance(meta.get("kind"), str):
        raise AdaInferError(f"{path}: corrupt policy file (missing \"kind\")")
    _check_common_fields(path, meta)
    return meta


def read_small_file(path: Path, what: str) -> bytes:
    """A regular file's bytes, at most MAX_FILE_BYTES; one-line errors for anything else."""
    try:
        info = path.stat()  # follows symlinks: a loop is an OSError (ELOOP) here
    except FileNotFoundError:
        raise AdaInferError(f"{what} {path} does not exist") from None
    except OSError as error:  # symlink loop, permission, name too long
        raise AdaInferError(f"{what} {path} cannot be read ({error.strerror or error})") from None
    if path.is_dir():
        raise AdaInferError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise AdaInferError(f"{what} {path} is not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise AdaInferError(f"{path}: {info.st_size} bytes is too large for a {what} (limit {MAX_FILE_BYTES})")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise AdaInferError(f"{what} {path} cannot be read ({error.strerror or error})") from None
    if len(data) > MAX_FILE_BYTES:  # grew since stat
        raise AdaInferError(f"{path}: too large for a {what} (limit {MAX_FILE_BYTES})")
    return data


# Far beyond any trained value, small enough that a dot product of a few of them stays finite.
MAX_PARAMETER = 1e12


def finite(v) -> bool:
    """A JSON number that stays finite as a float (an integer of 400 digits does not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= MAX_PARAMETER
    except OverflowError:
        return False


def number(path, meta, key):
    value = meta.get(key)
    if not finite(value):
        raise AdaInferError(f"{path}: corrupt policy file ({key!r} must be a finite number of magnitude "
                            f"<= {MAX_PARAMETER:g}, got {str(value)[:40]})")
    return float(value)


def vector(path, meta, key, n):
    value = meta.get(key)
    if not isinstance(value, list) or len(value) != n or not all(finite(v) for v in value):
        raise AdaInferError(f"{path}: corrupt policy file ({key!r} must be {n} finite numbers of magnitude <= {MAX_PARAMETER:g})")
    return [float(v) for v in value]


def positive_int(path, meta, key, default=None):
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdaInferError(f"{path}: corrupt policy file ({key!r} must be an integer >= 1, got {str(value)[:40]!r})")
    return value


def _check_common_fields(path: Path, meta: dict) -> None:
    model = meta.get("model")
    if not isinstance(model, dict) or not all(k in model for k in ("name", "num_layers", "hidden_size")):
        raise AdaInferError(f"{path}: corrupt policy file (\"model\" must name name, num_layers, hidden_size)")
    known = known_signals()
    feats = meta.get("features")
    if not isinstance(feats, list) or not feats or any(f not in known for f in feats):
        raise AdaInferError(f"{path}: corrupt policy file (\"features\" must be a non-empty subset of {', '.join(known)})")
    number(path, meta, "threshold")
    positive_int(path, meta, "min_layer")
    for key in ("num_layers", "hidden_size"):
        positive_int(path, model, key)
    _check_guarantee(path, meta.get("operating_point"))


def check_scaler(path: Path, meta: dict) -> None:
    """A scaler (mean, positive scale) per feature, for the kinds that standardize their inputs."""
    n = len(meta["features"])
    scaler = meta.get("scaler")
    if not isinstance(scaler, dict):
        raise AdaInferError(f"{path}: corrupt policy file (missing \"scaler\")")
    vector(path, scaler, "mean", n)
    scale = vector(path, scaler, "scale", n)
    if any(s <= 0 for s in scale):
        raise AdaInferError(f"{path}: corrupt policy file (scaler scale must be positive)")


#: what an operating point chosen under a guarantee records (files of the empirical criteria lack them)
GUARANTEE_FIELDS = ("max_changed", "confidence", "path_confidence", "calibration_docs", "calibration_changed",
                    "changed_upper_bound")


def _check_guarantee(path: Path, point) -> None:
    """The guarantee an operating point records must be well formed: δ and confidence in (0, 1),
    a calibration size >= 1, its changed count within it, a bound in [0, 1]. (The bound may
    exceed δ: where no point passes, the file holds the never-exit point and says so.)"""
    if not isinstance(point, dict) or point.get("criterion") != "guarantee":
        return
    if not all(key in point for key in GUARANTEE_FIELDS):
        raise AdaInferError(f"{path}: corrupt policy file (a guarantee operating point must record {', '.join(GUARANTEE_FIELDS)})")
    for key in ("max_changed", "confidence", "path_confidence"):
        if not finite(point[key]) or not 0 < point[key] < 1:
            raise AdaInferError(f"{path}: corrupt policy file (operating_point {key!r} must be between 0 and 1)")
    n = positive_int(path, point, "calibration_docs")
    changed = point["calibration_changed"]
    if isinstance(changed, bool) or not isinstance(changed, int) or not 0 <= changed <= n:
        raise AdaInferError(f"{path}: corrupt policy file (operating_point 'calibration_changed' must be 0..{n})")
    if not 0 <= number(path, point, "changed_upper_bound") <= 1:
        raise AdaInferError(f"{path}: corrupt policy file (operating_point 'changed_upper_bound' must be between 0 and 1)")


def write_policy_files(out_dir: Path, kind: str, meta: dict, files: dict[str, bytes]) -> list[Path]:
    """``<kind>.json`` and the files it names (e.g. a crfsuite model) in ``out_dir``; the JSON first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    path = out_dir / f"{kind}.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return [path, *written]


def check_fits(meta: dict, model: ModelIdentity, source: str) -> None:
    """Refuse (one line) a policy trained for another model; warn if only the name differs."""
    want = meta["model"]
    problems = []
    for key, have in (("num_layers", model.num_layers), ("hidden_size", model.hidden_size),
                      ("vocab_size", model.vocab_size), ("model_type", model.model_type)):
        if key in want and want[key] != have:
            problems.append(f"{key} {want[key]} != {have}")
    if problems:
        raise AdaInferError(
            f"{source} was trained for {want['name']} ({want.get('num_layers')} layers, hidden {want.get('hidden_size')}) "
            f"and does not fit the running model {model.name} ({'; '.join(problems)})"
        )
    if want["name"] != model.name:
        log.warning("%s was trained for %s; running it on %s (same shape)", source, want["name"], model.name)
    if meta["min_layer"] > model.num_layers:  # = num_layers: the never-exit point (no layer is consulted)
        raise AdaInferError(f"{source}: min_layer {meta['min_layer']} is above the model's {model.num_layers} layers; "
                            "retrain the policy for this model")

