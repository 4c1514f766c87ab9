"""Policy files, read safely: size, pickle refusal, JSON fields, numbers, the crfsuite model.

Formats are text only; nothing is ever unpickled. A policy file is one JSON document (format,
kind, model, features, scaler, operating point, the kind's parameters, training metadata). A
CRF's JSON names its crfsuite model file (next to it) and that file's sha256. crfsuite trusts
every size and offset in its file (a bad one is a segfault, not an error), so before it opens
one here the file is checked (size, magic, hash), then parsed in Python (header, feature table,
both string databases, both reference tables: every offset, size, count and index against the
file's real length), and finally opened and tagged once by crfsuite in a child process, whose
crash or hang is a refusal. Every refusal is one line (:class:`AdaInferError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.features import FEATURE_NAMES
from adainfer_lmeval.policies import ModelIdentity

log = logging.getLogger(__name__)

FORMAT = "adainfer-exit-policy"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 1_000_000
CRF_MAGIC = b"lCRF"
STOP, GO = "stop", "go"


def policies_dir() -> Path:
    """The shipped policies: ``$ADAINFER_POLICIES`` or the package's ``policies/`` (see :mod:`.paths`)."""
    from adainfer_lmeval.paths import shipped_dir

    explicit = os.environ.get("ADAINFER_POLICIES")
    return Path(explicit) if explicit else shipped_dir("policies")


def shipped_path(model_name: str, kind: str) -> Path:
    return policies_dir() / model_name / f"{kind}.json"


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
    feats = meta.get("features")
    if not isinstance(feats, list) or not feats or any(f not in FEATURE_NAMES for f in feats):
        raise AdaInferError(f"{path}: corrupt policy file (\"features\" must be a non-empty subset of {', '.join(FEATURE_NAMES)})")
    n = len(feats)
    scaler = meta.get("scaler")
    if not isinstance(scaler, dict):
        raise AdaInferError(f"{path}: corrupt policy file (missing \"scaler\")")
    vector(path, scaler, "mean", n)
    scale = vector(path, scaler, "scale", n)
    if any(s <= 0 for s in scale):
        raise AdaInferError(f"{path}: corrupt policy file (scaler scale must be positive)")
    number(path, meta, "threshold")
    positive_int(path, meta, "min_layer")
    for key in ("num_layers", "hidden_size"):
        positive_int(path, model, key)


def check_crfsuite_fields(path: Path, meta: dict) -> None:
    """The JSON's pointer to its crfsuite model: a plain file name next to it, and its sha256."""
    name = meta.get("crfsuite_file")
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
        raise AdaInferError(f"{path}: corrupt policy file (\"crfsuite_file\" must be a file name next to it)")
    if not isinstance(meta.get("crfsuite_sha256"), str):
        raise AdaInferError(f"{path}: corrupt policy file (missing \"crfsuite_sha256\")")


def read_crfsuite_bytes(json_path: Path, meta: dict, smoke: bool = True) -> bytes:
    """The CRF model bytes, checked (size, magic, sha256, structure; with ``smoke``, a child's tagging)
    before crfsuite may parse them in this process."""
    check_crfsuite_fields(json_path, meta)
    model_path = Path(json_path).parent / meta["crfsuite_file"]
    if not model_path.exists() and not model_path.is_symlink():
        raise AdaInferError(f"{json_path}: its crfsuite model {model_path.name} is missing")
    data = read_small_file(model_path, "crfsuite policy model")
    if looks_like_pickle(data) and not data.startswith(CRF_MAGIC):
        raise AdaInferError(f"{model_path}: this is a pickle/zip archive, not a crfsuite model; refusing to unpickle it")
    if not data.startswith(CRF_MAGIC):
        raise AdaInferError(f"{model_path}: corrupt crfsuite model (bad magic; expected a file written by crfsuite)")
    if sha256_bytes(data) != meta["crfsuite_sha256"]:
        raise AdaInferError(f"{model_path}: corrupt crfsuite model (sha256 differs from {Path(json_path).name})")
    check_crfsuite_structure(data, model_path)
    if smoke:
        smoke_crfsuite_in_child(data, len(meta["features"]), model_path)
    return data


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


# ---- the crfsuite model format (crfsuite's crf1d_model.c and cqdb.c), checked in Python -------

CRF_HEADER = struct.Struct("<4sI4sIIIIIIIII")  # magic, size, type, version, counts, five chunk offsets
CRF_VERSION = 100
CHUNK = struct.Struct("<4sII")  # id, size, count
FEATURE = struct.Struct("<IIId")  # type (0 state, 1 transition), src, dst, weight
CQDB_HEADER = struct.Struct("<4sIIIII")  # id, size, flag, byte order, backward size, backward offset
CQDB_TABLES = 256
CQDB_BYTEORDER = 0x62445371


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _check_cqdb(data: bytes, start: int, expected: int, what: str) -> None:
    """A string database (labels or attributes): ``expected`` NUL-terminated records, ids 0..expected-1,
    hash tables with a free slot each (crfsuite probes until it finds one), a backward array."""
    if start + CQDB_HEADER.size + 8 * CQDB_TABLES > len(data):
        raise ValueError(f"{what} table at offset {start} runs past the end of the file")
    chunk_id, size, _, byteorder, bwd_size, bwd_offset = CQDB_HEADER.unpack_from(data, start)
    if chunk_id != b"CQDB" or byteorder != CQDB_BYTEORDER:
        raise ValueError(f"{what} table at offset {start} is not a crfsuite string table")
    if size < CQDB_HEADER.size + 8 * CQDB_TABLES or start + size > len(data):
        raise ValueError(f"{what} table claims {size} bytes; {len(data) - start} are left in the file")
    chunk = data[start : start + size]

    def record(offset: int) -> int:
        if offset < CQDB_HEADER.size + 8 * CQDB_TABLES or offset + 8 > size:
            raise ValueError(f"{what} table points outside itself (offset {offset})")
        rid, ksize = struct.unpack_from("<II", chunk, offset)
        if ksize < 1 or offset + 8 + ksize > size or chunk.find(b"\0", offset + 8) != offset + 8 + ksize - 1:
            raise ValueError(f"{what} table has a name that runs past its end (offset {offset})")
        if rid >= expected:
            raise ValueError(f"{what} table holds id {rid}; the header counts {expected}")
        return rid

    # crfsuite counts names as the sum of half of each table's slots (its writer fills half of them),
    # empty tables included, and lists names 0..count-1 through the backward array.
    ids, counted = set(), 0
    for t in range(CQDB_TABLES):
        offset, num = struct.unpack_from("<II", chunk, CQDB_HEADER.size + 8 * t)
        if not offset:
            if num:
                raise ValueError(f"{what} table's empty hash table {t} claims {num} slots")
            continue
        if num == 0 or num % 2 or offset + 8 * num > size:
            raise ValueError(f"{what} table's hash table {t} ({num} slots) runs past its end")
        used = [slot_offset for _, slot_offset in (struct.unpack_from("<II", chunk, offset + 8 * k) for k in range(num))
                if slot_offset]
        if len(used) != num // 2:  # also: a free slot remains, so a look-up ends
            raise ValueError(f"{what} table's hash table {t} fills {len(used)} of {num} slots; crfsuite writes half")
        ids.update(record(slot_offset) for slot_offset in used)
        counted += num // 2
    if counted != expected or len(ids) != expected:  # every id is < expected (record() checked)
        raise ValueError(f"{what} table holds {len(ids)} distinct names in {counted} slots; the header counts {expected}")
    if not bwd_offset or bwd_size < expected or bwd_offset + 4 * expected > size:
        raise ValueError(f"{what} table's id -> name array is missing or runs past its end")
    for i in range(expected):
        if record(_u32(chunk, bwd_offset + 4 * i)) != i:
            raise ValueError(f"{what} table's id -> name array maps {i} to another name")


def _check_refs(data: bytes, start: int, chunk_id: bytes, expected: int, num_features: int, what: str) -> None:
    """A feature-reference table: per label (or attribute), an absolute offset to (count, feature ids).

    crfsuite writes two more label slots than labels (unused, offset 0) and reads only the first
    ``expected``."""
    if start + CHUNK.size > len(data):
        raise ValueError(f"{what} references at offset {start} run past the end of the file")
    got_id, size, count = CHUNK.unpack_from(data, start)
    if (got_id != chunk_id or count < expected or size < CHUNK.size + 4 * count or start + size > len(data)):
        raise ValueError(f"{what} references at offset {start} are not a {chunk_id.decode()} table of {expected}")
    for i in range(expected):
        offset = _u32(data, start + CHUNK.size + 4 * i)
        if offset + 4 > len(data):
            raise ValueError(f"{what} {i}'s feature list is past the end of the file")
        n = _u32(data, offset)
        if offset + 4 + 4 * n > len(data):
            raise ValueError(f"{what} {i} claims {n} features; the file ends first")
        bad = [f for f in struct.unpack_from(f"<{n}I", data, offset + 4) if f >= num_features]
        if bad:
            raise ValueError(f"{what} {i} refers to feature {bad[0]}; the file has {num_features}")


def check_crfsuite_structure(data: bytes, source) -> None:
    """Refuse (one line) a crfsuite model whose sizes, offsets, counts or indices do not fit the file."""
    try:
        if len(data) < CRF_HEADER.size:
            raise ValueError(f"{len(data)} bytes is shorter than the {CRF_HEADER.size}-byte header")
        magic, size, kind, version, header_features, labels, attrs, off_feat, off_labels, off_attrs, off_lrefs, off_arefs = (
            CRF_HEADER.unpack_from(data, 0))
        if magic != CRF_MAGIC or kind != b"FOMC" or version != CRF_VERSION:
            raise ValueError(f"not a first-order crfsuite model of version {CRF_VERSION} ({magic!r} {kind!r} {version})")
        if size != len(data):
            raise ValueError(f"the header says {size} bytes but the file has {len(data)} (truncated or altered)")
        if not 2 <= labels <= len(data) // 8 or not 1 <= attrs <= len(data) // 8:  # a name takes >= 9 bytes
            raise ValueError(f"{labels} labels and {attrs} attributes do not fit in {len(data)} bytes "
                             "(a stop/go model has 2 labels)")
        if off_feat + CHUNK.size > len(data):
            raise ValueError(f"the feature table offset {off_feat} is past the end of the file")
        chunk_id, feat_size, num_features = CHUNK.unpack_from(data, off_feat)
        if chunk_id != b"FEAT" or feat_size != CHUNK.size + FEATURE.size * num_features or off_feat + feat_size > len(data):
            raise ValueError(f"the feature table ({num_features} features, {feat_size} bytes) does not fit the file")
        if header_features not in (0, num_features):  # crfsuite's writer leaves it 0
            raise ValueError(f"the header counts {header_features} features; the feature table holds {num_features}")
        for i in range(num_features):
            ftype, src, dst, weight = FEATURE.unpack_from(data, off_feat + CHUNK.size + FEATURE.size * i)
            if ftype not in (0, 1) or dst >= labels or src >= (attrs if ftype == 0 else labels) or not math.isfinite(weight):
                raise ValueError(f"feature {i} (type {ftype}, {src} -> {dst}, weight {weight}) is out of range")
        _check_cqdb(data, off_labels, labels, "label")
        _check_cqdb(data, off_attrs, attrs, "attribute")
        _check_refs(data, off_lrefs, b"LFRF", labels, num_features, "label")
        _check_refs(data, off_arefs, b"AFRF", attrs, num_features, "attribute")
    except (ValueError, struct.error) as error:
        raise AdaInferError(f"{source}: corrupt crfsuite model ({error}); retrain it or restore the shipped file") from None


_SMOKE = r"""
import json, sys
import pycrfsuite
n = int(sys.argv[1])
model = sys.stdin.buffer.read()  # crfsuite keeps a pointer into these bytes: they must stay alive
tagger = pycrfsuite.Tagger()
tagger.open_inmemory(model)
labels = tagger.labels()
item = {f"f{i}": 0.5 for i in range(n)}
item["bias"] = 1.0
tagger.set([item, item, item])
tagger.tag()
print(json.dumps({"labels": labels, "p": [tagger.marginal(label, 2) for label in labels]}))
"""
_SMOKED: set[str] = set()  # sha256 of models a child opened and tagged cleanly in this process
SMOKE_TIMEOUT_S = 60


def smoke_crfsuite_in_child(data: bytes, num_features: int, source) -> None:
    """Open and tag the model once in a child process: crfsuite's crash or hang kills the child only."""
    digest = sha256_bytes(data)
    if digest in _SMOKED:
        return
    try:
        done = subprocess.run([sys.executable, "-c", _SMOKE, str(num_features)], input=data, capture_output=True,
                              timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AdaInferError(f"{source}: corrupt crfsuite model (crfsuite did not finish reading it in "
                            f"{SMOKE_TIMEOUT_S} s); retrain it or restore the shipped file") from None
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1][:200]
        how = (f"crfsuite crashed reading it: signal {-done.returncode}" if done.returncode < 0
               else f"crfsuite could not use it: {last or f'exit code {done.returncode}'}")
        raise AdaInferError(f"{source}: corrupt crfsuite model ({how}); retrain it or restore the shipped file")
    try:
        result = json.loads(done.stdout)
        ok = sorted(result["labels"]) == sorted([STOP, GO]) and all(finite(p) and 0 <= p <= 1 for p in result["p"])
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise AdaInferError(f"{source}: corrupt crfsuite model (its labels or probabilities are not a stop/go "
                            f"model's: {done.stdout[:120]!r})")
    _SMOKED.add(digest)


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
    if meta["min_layer"] >= model.num_layers:
        raise AdaInferError(f"{source}: min_layer {meta['min_layer']} is not below the model's {model.num_layers} layers")

