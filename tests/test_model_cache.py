"""A corrupt model cache is detected: checksums written at conversion, checked at every load.

Uses the fake GGUF pipeline of test_model_zoo (no download, no weights).
"""

from __future__ import annotations

import json
import os

import pytest
from test_model_zoo import _fake_convert, _fake_download, _fake_spec

from adainfer_lmeval.offline import model_zoo as mz
from adainfer_lmeval.errors import AdaInferError


@pytest.fixture
def fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path / "cache"))
    spec = _fake_spec()
    monkeypatch.setitem(mz.MODELS, spec.name, spec)
    monkeypatch.setattr(mz, "_download", _fake_download)
    monkeypatch.setattr(mz, "_convert", _fake_convert)
    monkeypatch.setattr(mz, "_smoke", lambda folder: " Paris")
    return mz.fetch_model(spec.name)


@pytest.fixture
def hashes(monkeypatch):
    """The files hashed (sha256) since the fixture was taken."""
    seen = []
    real = mz.sha256_file

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(mz, "sha256_file", counting)
    return seen


def damaged(fn) -> str:
    with pytest.raises(AdaInferError) as error:
        fn()
    message = str(error.value)
    assert "\n" not in message and "adainfer-eval models fetch fake-tiny --force" in message and "damaged" in message
    return message


def test_conversion_writes_checksums_and_an_unchanged_cache_loads_without_hashing(fetched, hashes):
    marker = json.loads((fetched / mz.MARKER_FILE).read_text())
    assert set(marker["files"]) == {"config.json", "model.safetensors", "LICENSE"}
    assert all(len(f["sha256"]) == 64 for f in marker["files"].values())
    assert mz.resolve_pretrained("fake-tiny") == str(fetched)
    assert mz.fetch_model("fake-tiny") == fetched
    assert hashes == []  # size + stat checks only


def test_a_truncated_file_is_refused_in_one_line(fetched):
    weights = fetched / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4])
    message = damaged(lambda: mz.resolve_pretrained("fake-tiny"))
    assert "model.safetensors is 4 bytes, was 10 at conversion" in message


def test_an_altered_file_of_the_same_size_is_refused(fetched, hashes):
    weights = fetched / "model.safetensors"
    with open(weights, "r+b") as fh:  # 4 bytes of garbage in place, like the case
        fh.seek(2)
        fh.write(b"\xff" * 4)
    assert "model.safetensors differs from its sha256" in damaged(lambda: mz.fetch_model("fake-tiny"))
    assert hashes == ["model.safetensors"]  # only the file that changed is hashed again


def test_restoring_the_mtime_after_an_edit_does_not_hide_it(fetched):
    weights = fetched / "model.safetensors"
    before = weights.stat()
    weights.write_bytes(b"\x01" * 10)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # ctime still moves
    damaged(lambda: mz.fetch_model("fake-tiny"))


def test_a_missing_file_or_unreadable_marker_is_refused(fetched):
    (fetched / "config.json").unlink()
    assert "config.json is missing" in damaged(lambda: mz.fetch_model("fake-tiny"))
    (fetched / mz.MARKER_FILE).write_text("{not json")
    assert "unreadable" in damaged(lambda: mz.fetch_model("fake-tiny"))


def test_list_shows_a_damaged_model_and_force_repairs_it(fetched, capsys):
    (fetched / "model.safetensors").write_bytes(b"")
    rows = {r["name"]: r for r in mz.list_models()}
    assert rows["fake-tiny"]["cache"] == "damaged" and rows["fake-tiny"]["fetched"]
    assert mz.main(["list"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "models fetch fake-tiny --force" in out
    assert mz.main(["fetch", "fake-tiny"]) == 1
    assert "--force" in capsys.readouterr().err
    mz.fetch_model("fake-tiny", force=True)
    assert mz.check_cache("fake-tiny").state == "ok" and mz.main(["list"]) == 0


def test_verify_hashes_what_the_cheap_check_trusts(fetched, hashes):
    """Damage below the file system (no stat change) passes a load, not ``list --verify``."""
    weights = fetched / "model.safetensors"
    weights.write_bytes(b"\x02" * 10)
    stamps = json.loads((fetched / mz.STAMP_FILE).read_text())
    stamps["stamps"]["model.safetensors"] = mz._stat_key(weights)  # as if the bytes rotted in place
    (fetched / mz.STAMP_FILE).write_text(json.dumps(stamps))
    assert mz.check_cache("fake-tiny").state == "ok" and hashes == []
    assert mz.check_cache("fake-tiny", full=True).state == "damaged"
    assert mz.main(["list", "--verify"]) == 1


def test_a_cache_converted_before_checksums_keeps_working_and_is_protected_from_then_on(fetched, capsys):
    marker = json.loads((fetched / mz.MARKER_FILE).read_text())
    del marker["files"]  # as fetch wrote it before checksums
    (fetched / mz.MARKER_FILE).write_text(json.dumps(marker))
    (fetched / mz.STAMP_FILE).unlink()
    assert {r["name"]: r for r in mz.list_models()}["fake-tiny"]["cache"] == "unverified"
    assert mz.fetch_model("fake-tiny") == fetched  # still loads
    assert "recorded them now" in capsys.readouterr().err
    assert (fetched / mz.MANIFEST_FILE).is_file() and mz.check_cache("fake-tiny").state == "ok"
    (fetched / "model.safetensors").write_bytes(b"\x03" * 3)
    assert "was 10 at first load" in damaged(lambda: mz.fetch_model("fake-tiny"))
