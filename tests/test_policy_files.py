"""Policy files can't crash the process: crafted crfsuite models, odd paths, bad numbers.

Every bad file is refused with a one-line AdaInferError. crfsuite trusts the sizes and offsets
in its model file, so a crafted one (right magic, matching sha256 in its JSON) would kill the
process with a segfault if it reached crfsuite; here each is made from the shipped SmolLM2 CRF.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adainfer_lmeval.paths import shipped_dir
from adainfer_lmeval.policies import crfsuite_check
from adainfer_lmeval.policies.learned.crf import CrfKind
from adainfer_lmeval.policies.learned.svm import SvmKind
from adainfer_lmeval.cli import policy as policy_cli
from adainfer_lmeval.policies import files as policy_files
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.policies import build_policy

from conftest import POLICIES_BEFORE_OPTION_SIGNALS

SHIPPED = shipped_dir("policies") / "smollm2-135m"
HEADER_FIELDS = ["size", "type", "version", "num_features", "num_labels", "num_attrs", "off_features", "off_labels",
                 "off_attrs", "off_labelrefs", "off_attrrefs"]


def _shipped() -> Path:
    folder = policy_files.shipped_path("smollm2-135m", "crf").parent
    return folder if (folder / "crf.crfsuite").is_file() else SHIPPED


@pytest.fixture
def crf_dir(tmp_path):
    """A copy of the shipped SmolLM2 CRF (crf.json + crf.crfsuite) and SVM."""
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    for name in ("crf.json", "crf.crfsuite", "svm.json"):
        shutil.copy(_shipped() / name, folder / name)
    return folder


def write_model(folder: Path, data: bytes) -> Path:
    """Replace the crfsuite model and fix up its sha256 in crf.json (what a careful forger does)."""
    (folder / "crf.crfsuite").write_bytes(data)
    meta = json.loads((folder / "crf.json").read_text())
    meta["crfsuite_sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "crf.json").write_text(json.dumps(meta))
    return folder / "crf.json"


def edit_json(path: Path, **changes) -> Path:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))
    return path


def with_u32(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<I", out, offset, value)
    return bytes(out)


def header_field(data: bytes, field: str, value: int) -> bytes:
    return with_u32(data, 4 + 4 * HEADER_FIELDS.index(field), value)


def one_line_refusal(fn, match: str) -> str:
    with pytest.raises(AdaInferError) as error:
        fn()
    message = str(error.value)
    assert match in message and "\n" not in message, message
    return message


def test_the_shipped_crf_loads_and_its_child_check_runs_once(crf_dir, monkeypatch):
    policy = CrfKind.policy(path=str(crf_dir / "crf.json"))
    p = policy.estimator.decision_function(torch.zeros(1, 3, len(policy.features)))
    assert ((0.0 <= p) & (p <= 1.0)).all()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a model checked once is not checked again"))
    CrfKind.policy(path=str(crf_dir / "crf.json"))


def test_a_segfaulting_crfsuite_file_is_refused_and_the_process_survives(crf_dir):
    """Right magic, matching sha256, truncated body: crfsuite would segfault (rc 139) on it."""
    data = (crf_dir / "crf.crfsuite").read_bytes()
    path = write_model(crf_dir, data[: len(data) // 2])
    code = ("import sys; from adainfer_lmeval.policies.learned.crf import CrfKind; from adainfer_lmeval.errors import AdaInferError\n"
            "try:\n    CrfKind.policy(path=sys.argv[1])\nexcept AdaInferError as e:\n    print(e); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 3, (done.returncode, done.stderr[-500:])
    assert len(done.stdout.strip().splitlines()) == 1 and "truncated or altered" in done.stdout


@pytest.mark.parametrize("field, value, match", [
    ("size", 9999, "header says 9999 bytes"),  # loaded silently before
    ("version", 7, "version 100"),  # loaded silently before
    ("num_features", 0x7FFFFF00, "the header counts"),  # loaded silently before
    ("num_attrs", 0x7FFFFF00, "do not fit"),  # loaded silently before
    ("num_labels", 5, "the header counts 5"),  # segfault before
    ("num_labels", 0x7FFFFF00, "do not fit"),
    ("off_features", 0x7FFFFF00, "past the end"),
    ("off_labels", 0x7FFFFF00, "past the end"),
    ("off_attrs", 0x7FFFFF00, "past the end"),
    ("off_labelrefs", 0x7FFFFF00, "past the end"),
    ("off_attrrefs", 0x7FFFFF00, "past the end"),
    ("off_attrrefs", 0x30, "not a AFRF table"),
])
def test_a_tampered_header_is_refused(crf_dir, field, value, match):
    data = (crf_dir / "crf.crfsuite").read_bytes()
    path = write_model(crf_dir, header_field(data, field, value))
    one_line_refusal(lambda: CrfKind.policy(path=str(path)), match)


@pytest.mark.parametrize("where, value, match", [
    (24 + 8 * 3 + 4, 0xFFFFFFFF, "empty hash table 3 claims"),  # a count in an empty hash table: segfault before
    (24 + 8 * 256 + 4, 0xFFFFFFFF, "name that runs past"),  # a name's length
    (16, 0, "id -> name array"),  # the backward array's size
])
def test_a_tampered_string_table_is_refused(crf_dir, where, value, match):
    data = (crf_dir / "crf.crfsuite").read_bytes()
    labels_table = struct.unpack_from("<I", data, 4 + 4 * HEADER_FIELDS.index("off_labels"))[0]
    assert data[labels_table : labels_table + 4] == b"CQDB"  # the label string table (stop, go) is there
    path = write_model(crf_dir, with_u32(data, labels_table + where, value))
    one_line_refusal(lambda: CrfKind.policy(path=str(path)), "corrupt crfsuite model")
    one_line_refusal(lambda: CrfKind.policy(path=str(path)), match)


def test_what_the_structure_check_misses_the_child_process_catches(crf_dir, monkeypatch):
    monkeypatch.setattr(crfsuite_check, "check_crfsuite_structure", lambda data, source: None)
    data = (crf_dir / "crf.crfsuite").read_bytes()
    path = write_model(crf_dir, header_field(data, "off_attrrefs", 0x7FFFFF00))
    one_line_refusal(lambda: CrfKind.policy(path=str(path)), "crfsuite crashed reading it: signal 11")


def test_a_feature_with_a_non_finite_weight_is_refused(crf_dir):
    data = bytearray((crf_dir / "crf.crfsuite").read_bytes())
    off = struct.unpack_from("<I", data, 4 + 4 * HEADER_FIELDS.index("off_features"))[0]
    struct.pack_into("<d", data, off + 12 + 12, float("nan"))  # feature 0's weight
    path = write_model(crf_dir, bytes(data))
    one_line_refusal(lambda: CrfKind.policy(path=str(path)), "feature 0")


# ---- paths that are not files ----------------------------------------------------------------


def test_a_directory_is_refused(crf_dir, tmp_path):
    (tmp_path / "dir.json").mkdir()
    one_line_refusal(lambda: policy_files.read_policy_json(tmp_path / "dir.json"), "is a directory")
    (crf_dir / "crf.crfsuite").unlink()
    (crf_dir / "crf.crfsuite").mkdir()
    one_line_refusal(lambda: CrfKind.policy(path=str(crf_dir / "crf.json")), "is a directory")


def test_a_symlink_loop_is_refused(crf_dir, tmp_path):
    os.symlink(tmp_path / "b.json", tmp_path / "a.json")
    os.symlink(tmp_path / "a.json", tmp_path / "b.json")
    one_line_refusal(lambda: policy_files.read_policy_json(tmp_path / "a.json"), "cannot be read")
    one_line_refusal(lambda: build_policy("file", {"path": str(tmp_path / "a.json")}), "cannot be read")
    (crf_dir / "crf.crfsuite").unlink()
    os.symlink(crf_dir / "crf.crfsuite", crf_dir / "crf.crfsuite")
    one_line_refusal(lambda: CrfKind.policy(path=str(crf_dir / "crf.json")), "cannot be read")


# ---- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", 1.5, 0, True, None])
def test_a_bad_seq_start_is_refused(crf_dir, value):
    path = edit_json(crf_dir / "crf.json", seq_start=value)
    one_line_refusal(lambda: CrfKind.policy(path=str(path)), "'seq_start' must be an integer >= 1")


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "1e999", "1" + "0" * 400, "1e300", '"0.5"'])
def test_non_finite_or_overflowing_coefficients_are_refused(crf_dir, raw):
    path = crf_dir / "svm.json"
    meta = json.loads(path.read_text())
    meta["coef"][0] = "__X__"
    path.write_text(json.dumps(meta).replace('"__X__"', raw))
    one_line_refusal(lambda: SvmKind.policy(path=str(path)), "'coef' must be")


@pytest.mark.parametrize("raw", ["NaN", "-Infinity", "1" + "0" * 400])
def test_a_non_finite_threshold_in_the_file_is_refused(crf_dir, raw):
    path = crf_dir / "svm.json"
    path.write_text(path.read_text().replace('"threshold": ', f'"threshold": {raw}, "old_threshold": ', 1))
    one_line_refusal(lambda: SvmKind.policy(path=str(path)), "'threshold' must be a finite number")


@pytest.mark.parametrize("kind", ["svm", "crf"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_threshold_nan_as_a_model_arg_is_refused(crf_dir, kind, value):
    args = {"threshold": value, "path": str(crf_dir / f"{kind}.json")}
    one_line_refusal(lambda: build_policy(kind, args), "must be a finite number")
    one_line_refusal(lambda: build_policy(kind, {"threshold": value}), "must be a finite number")  # shipped, bound later


@pytest.mark.parametrize("key, value", [("num_layers", "30"), ("hidden_size", -1)])
def test_a_bad_model_shape_is_refused(crf_dir, key, value):
    path = crf_dir / "svm.json"
    meta = json.loads(path.read_text())
    meta["model"][key] = value
    path.write_text(json.dumps(meta))
    one_line_refusal(lambda: policy_files.read_policy_json(path), f"'{key}' must be an integer >= 1")


# ---- `adainfer-eval policy list` -------------------------------------------------------------


def test_policy_list_survives_bad_entries_and_names_them(crf_dir, tmp_path, monkeypatch, capsys):
    root = crf_dir.parent
    monkeypatch.setattr(policy_files, "policies_dir", lambda: root)
    bad = root / "bad-model"
    bad.mkdir()
    (bad / "dir.json").mkdir()
    os.symlink(bad / "loop2.json", bad / "loop.json")
    os.symlink(bad / "loop.json", bad / "loop2.json")
    shutil.copy(crf_dir / "crf.json", bad / "crf.json")
    shutil.copy(crf_dir / "crf.crfsuite", bad / "crf.crfsuite")
    data = (bad / "crf.crfsuite").read_bytes()
    write_model(bad, header_field(data, "off_attrrefs", 0x7FFFFF00))
    edit_json(shutil.copy(crf_dir / "svm.json", bad / "svm.json"), validation={"full_acc": "high"})
    assert policy_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    broken = [line for line in out.splitlines() if line.startswith("BROKEN")]
    for name in ("dir.json", "loop.json", "loop2.json", "bad-model/crf.json", "bad-model/svm.json"):
        assert any(name in line for line in broken), (name, broken)
    assert "smollm2-135m/crf.json" in out and "smollm2-135m/svm.json" in out  # the good ones still listed
    assert not any("smollm2-135m" in line for line in broken)


@pytest.mark.parametrize("kind", ["svm", "crf"])
def test_a_file_from_before_the_guarantee_loads_as_it_is(kind):
    """Files written before the guarantee carry no guarantee fields (their operating point is an
    empirical one): they load with the stored point and features, and the listing still reads them."""
    crf_dir = POLICIES_BEFORE_OPTION_SIGNALS / "smollm2-135m"
    meta = policy_files.read_policy_json(crf_dir / f"{kind}.json")
    assert not set(policy_files.GUARANTEE_FIELDS) & set(meta["operating_point"])
    assert meta["operating_point"]["criterion"] in ("agreement", "accuracy")
    policy = build_policy(kind, {"path": str(crf_dir / f"{kind}.json")})
    assert (policy.threshold, policy.min_layer, list(policy.features)) == (meta["threshold"], meta["min_layer"],
                                                                         meta["features"])
    assert policy_cli._row(crf_dir / f"{kind}.json", meta)[7] == f"thr={meta['threshold']:.3g} min_layer={meta['min_layer']}"
