"""A corrupt model cache is detected: checksums written at conversion, checked at every load.

Uses the fake GGUF pipeline of test_model_zoo (no download, no weights).
"""

from __future__ import annotations

import json
import os

import pytest
from test_model_zoo import _fake_convert, _fake_download, _fake_spec

from adainfer_lmeval.offline.models import cache_folder, table
from adainfer_lmeval.offline.models import fetch as model_fetch
from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.offline.models import cli as models_cli


@pytest.fixture
def fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path / "cache"))
    spec = _fake_spec()
    monkeypatch.setitem(table.MODELS, spec.name, spec)
    monkeypatch.setattr(model_fetch, "_download", _fake_download)
    monkeypatch.setattr(model_fetch, "_convert", _fake_convert)
    monkeypatch.setattr(model_fetch, "_smoke", lambda folder: " Paris")
    return model_fetch.fetch_model(spec.name)


@pytest.fixture
def hashes(monkeypatch):
    """The files hashed (sha256) since the fixture was taken."""
    seen = []
    real = cache_folder.sha256_file

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(cache_folder, "sha256_file", counting)
    return seen


def damaged(fn) -> str:
    with pytest.raises(AdaInferError) as error:
        fn()
    message = str(error.value)
    assert "\n" not in message and "adainfer-eval models fetch fake-tiny --force" in message and "damaged" in message
    return message


def test_conversion_writes_checksums_and_an_unchanged_cache_loads_without_hashing(fetched, hashes):
    marker = json.loads((fetched / cache_folder.MARKER_FILE).read_text())
    assert set(marker["files"]) == {"config.json", "model.safetensors", "LICENSE"}
    assert all(len(f["sha256"]) == 64 for f in marker["files"].values())
    assert model_fetch.resolve_pretrained("fake-tiny") == str(fetched)
    assert model_fetch.fetch_model("fake-tiny") == fetched
    assert hashes == []  # size + stat checks only


def test_a_truncated_file_is_refused_in_one_line(fetched):
    weights = fetched / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4])
    message = damaged(lambda: model_fetch.resolve_pretrained("fake-tiny"))
    assert "model.safetensors is 4 bytes, was 10 at conversion" in message


def test_an_altered_file_of_the_same_size_is_refused(fetched, hashes):
    weights = fetched / "model.safetensors"
    with open(weights, "r+b") as fh:  # 4 bytes of garbage in place, like the case
        fh.seek(2)
        fh.write(b"\xff" * 4)
    assert "model.safetensors differs from its sha256" in damaged(lambda: model_fetch.fetch_model("fake-tiny"))
    assert hashes == ["model.safetensors"]  # only the file that changed is hashed again


def test_restoring_the_mtime_after_an_edit_does_not_hide_it(fetched):
    weights = fetched / "model.safetensors"
    before = weights.stat()
    weights.write_bytes(b"\x01" * 10)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # ctime still moves
    damaged(lambda: model_fetch.fetch_model("fake-tiny"))


def test_a_missing_file_or_unreadable_marker_is_refused(fetched):
    (fetched / "config.json").unlink()
    assert "config.json is missing" in damaged(lambda: model_fetch.fetch_model("fake-tiny"))
    (fetched / cache_folder.MARKER_FILE).write_text("{not json")
    assert "unreadable" in damaged(lambda: model_fetch.fetch_model("fake-tiny"))


def test_list_shows_a_damaged_model_and_force_repairs_it(fetched, capsys):
    (fetched / "model.safetensors").write_bytes(b"")
    rows = {r["name"]: r for r in models_cli.list_models()}
    assert rows["fake-tiny"]["cache"] == "damaged" and rows["fake-tiny"]["fetched"]
    assert models_cli.main(["list"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "models fetch fake-tiny --force" in out
    assert models_cli.main(["fetch", "fake-tiny"]) == 1
    assert "--force" in capsys.readouterr().err
    model_fetch.fetch_model("fake-tiny", force=True)
    assert cache_folder.check_cache("fake-tiny").state == "ok" and models_cli.main(["list"]) == 0


def test_verify_hashes_what_the_cheap_check_trusts(fetched, hashes):
    """Damage below the file system (no stat change) passes a load, not ``list --verify``."""
    weights = fetched / "model.safetensors"
    weights.write_bytes(b"\x02" * 10)
    stamps = json.loads((fetched / cache_folder.STAMP_FILE).read_text())
    stamps["stamps"]["model.safetensors"] = cache_folder._stat_key(weights)  # as if the bytes rotted in place
    (fetched / cache_folder.STAMP_FILE).write_text(json.dumps(stamps))
    assert cache_folder.check_cache("fake-tiny").state == "ok" and hashes == []
    assert cache_folder.check_cache("fake-tiny", full=True).state == "damaged"
    assert models_cli.main(["list", "--verify"]) == 1


def test_a_cache_converted_before_checksums_keeps_working_and_is_protected_from_then_on(fetched, capsys):
    marker = json.loads((fetched / cache_folder.MARKER_FILE).read_text())
    del marker["files"]  # as fetch wrote it before checksums
    (fetched / cache_folder.MARKER_FILE).write_text(json.dumps(marker))
    (fetched / cache_folder.STAMP_FILE).unlink()
    assert {r["name"]: r for r in models_cli.list_models()}["fake-tiny"]["cache"] == "unverified"
    assert model_fetch.fetch_model("fake-tiny") == fetched  # still loads
    assert "recorded them now" in capsys.readouterr().err
    assert (fetched / cache_folder.MANIFEST_FILE).is_file() and cache_folder.check_cache("fake-tiny").state == "ok"
    (fetched / "model.safetensors").write_bytes(b"\x03" * 3)
    assert "was 10 at first load" in damaged(lambda: model_fetch.fetch_model("fake-tiny"))
