"""crfsuite model files, checked before crfsuite may open them in this process.

crfsuite trusts every size and offset in its file (a bad one is a segfault, not an error), so a
CRF policy's model is checked first (size, magic, the sha256 its JSON names), then parsed in
Python (header, feature table, both string databases, both reference tables: every offset, size,
count and index against the file's real length), and finally opened and tagged once by crfsuite
in a child process, whose crash or hang is a refusal. Every refusal is one line
(:class:`AdaInferError`).
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies.files import finite, looks_like_pickle, read_small_file, sha256_bytes

CRF_MAGIC = b"lCRF"
STOP, GO = "stop", "go"

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
